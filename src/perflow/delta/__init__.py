"""The plug-and-play accelerator: ``delta = student - teacher`` (``docs/delta.md``).

The student starts as a copy of the teacher; after training

    delta[name] = student[name] - teacher[name]        (fp32, tensor by tensor, whole denoiser)

and adding ``scale * delta`` to another model of the same architecture and
lineage (a fine-tune, the UNet of a ControlNet or IP-Adapter pipeline) makes it
a few-step PeRFlow model, sampled with the PeRFlow scheduler of the same ``K``
and prediction type:

    merged[name] = cast_to_model_dtype(fp32(target[name]) + scale * delta[name])

Files are safetensors; the header metadata records what the delta was learned
on (a fingerprint of the teacher's config, key set and weights), ``K``, the
prediction type, the CFG mode and the PeRFlow scheduler config, each value a
JSON-encoded string.

The package's modules import one way only, each from those above it:

- :mod:`~perflow.delta.keys`: state dicts, key matching, fingerprints, config differences;
- :mod:`~perflow.delta.metadata`: what a delta file's header records, and its encoding;
- :mod:`~perflow.delta.lora`: a delta as a LoRA (truncated SVD) and back;
- :mod:`~perflow.delta.io`: delta files, released delta folders, model folders (:func:`load_delta`);
- :mod:`~perflow.delta.merge`: :func:`extract_delta`, :func:`merge_delta` and their checks;
- :mod:`~perflow.delta.formats`: models on disk (model, pipeline and single-file checkpoints):
  :func:`merge_into_path`, :func:`extract_from_folders`, :func:`load_pipeline`.

File helpers (atomic writes, output checks, readers) are :mod:`perflow.io`'s.
"""

from __future__ import annotations

from .formats import check_merge_output, extract_from_folders, load_pipeline, merge_into_path
from .io import load_delta, save_delta
from .keys import KeyReport, compare_keys, state_dict_of, weights_sha256
from .lora import LoraExport, delta_to_lora, error_table, lora_prefix, lora_to_delta, save_lora
from .merge import MergeReport, extract_delta, merge_delta, perflow_scheduler_from_metadata
from .metadata import FORMAT, base_model_info, decode_metadata, encode_metadata, recorded_config

__all__ = [
    "FORMAT",
    "KeyReport",
    "LoraExport",
    "MergeReport",
    "base_model_info",
    "check_merge_output",
    "compare_keys",
    "decode_metadata",
    "delta_to_lora",
    "encode_metadata",
    "error_table",
    "extract_delta",
    "extract_from_folders",
    "load_delta",
    "load_pipeline",
    "lora_prefix",
    "lora_to_delta",
    "merge_delta",
    "merge_into_path",
    "perflow_scheduler_from_metadata",
    "recorded_config",
    "save_delta",
    "save_lora",
    "state_dict_of",
    "weights_sha256",
]
