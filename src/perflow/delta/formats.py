"""Models on disk: a delta merged into model, pipeline and single-file (LDM) checkpoints, extracted from
folders, and merged pipelines loaded.

- A **model folder** is a diffusers model saved with ``save_pretrained``:
  ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (sharded or not).
- A **pipeline folder** has ``model_index.json`` and the denoiser in ``unet/``; a
  class-conditional teacher folder (``unet/`` + ``label_encoder/`` + ``scheduler/``)
  is treated the same way.
- A **single-file checkpoint** is one ``.safetensors`` in the original LDM/SD layout
  (``model.diffusion_model.*`` for the UNet, plus VAE and text-encoder keys).
  The diffusers-to-LDM key map is derived from diffusers' own converter
  (``convert_ldm_unet_checkpoint``) run on tagged scalars, so every layout diffusers
  reads (SD1.x, SD2.x, SDXL) is handled without a hand-written table.

A merged pipeline's ``model_index.json`` names the scheduler as
``["perflow.scheduler", "PeRFlowScheduler"]``, which
``DiffusionPipeline.from_pretrained`` resolves by itself when perflow is
installed. :func:`load_pipeline` also loads released merged pipelines whose
``model_index.json`` names ``["diffusers", "PeRFlowScheduler"]`` (a class diffusers
does not have) or an ordinary diffusers scheduler over a PeRFlow scheduler config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from perflow.io import (
    atomic_folder,
    check_output_path,
    output_mode,
    read_json,
    read_safetensors,
    read_scheduler_config,
    remove_stale_temps,
    safetensors_header,
    save_safetensors,
)

from .io import load_delta, model_folder, read_model_folder, read_weights, save_delta, weight_files
from .keys import BETA_KEYS, StateDict, config_differences, config_fingerprint, is_perflow_scheduler_config
from .merge import (
    MergeReport,
    check_base_config,
    check_family,
    check_scale,
    extract_delta,
    merge_state_dict,
    perflow_scheduler_from_metadata,
)
from .metadata import base_model_info, scheduler_metadata

LDM_UNET_PREFIX = "model.diffusion_model."
SCHEDULER_ENTRY = ["perflow.scheduler", "PeRFlowScheduler"]


# ----------------------------------------------------------------------------- model folders


def _write_model_weights(files: list[Path], sd: StateDict) -> None:
    """Rewrite safetensors shards with ``sd``, keeping each shard's keys and metadata."""
    for f in files:
        keys, meta = safetensors_header(f)
        save_safetensors({k: sd[k] for k in keys}, f, meta)


# ----------------------------------------------------------------------------- pipelines


def perflow_scheduler_config(metadata: Mapping[str, Any], base_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``PeRFlowScheduler`` config dict (``_class_name`` included) for a merged pipeline."""
    sched = perflow_scheduler_from_metadata(metadata, base_config)
    return {"_class_name": "PeRFlowScheduler", **{k: v for k, v in dict(sched.config).items() if not k.startswith("_")}}


def load_pipeline(path: str | os.PathLike, **kwargs: Any):
    """Load a PeRFlow pipeline folder (merged by perflow or released) with a ``PeRFlowScheduler``.

    ``DiffusionPipeline.from_pretrained(path, scheduler=PeRFlowScheduler.from_pretrained(path,
    subfolder="scheduler"), **kwargs)``, except that a ``model_index.json`` naming a scheduler
    class diffusers cannot import (``["diffusers", "PeRFlowScheduler"]``) is read through a
    temporary view of the folder whose index names ``perflow.scheduler`` instead.
    """
    from diffusers import DiffusionPipeline

    from perflow.scheduler import PeRFlowScheduler

    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{str(path)!r} is not a pipeline folder (no model_index.json)")
    sched_cfg = read_scheduler_config(path)
    if not is_perflow_scheduler_config(sched_cfg):
        raise ValueError(
            f"{str(path)!r} has no PeRFlow scheduler config (scheduler/scheduler_config.json with "
            "_class_name PeRFlowScheduler); merge a delta into it first: perflow delta merge --delta D --into MODEL -o OUT"
        )
    scheduler = kwargs.pop("scheduler", None) or PeRFlowScheduler.from_config(sched_cfg)
    index = read_json(index_file)
    if index.get("scheduler") == SCHEDULER_ENTRY:
        return DiffusionPipeline.from_pretrained(str(path), scheduler=scheduler, **kwargs)
    with tempfile.TemporaryDirectory(prefix="perflow-pipe-") as view:
        for entry in path.iterdir():
            if entry.name != "model_index.json":
                os.symlink(entry.resolve(), Path(view) / entry.name)
        index["scheduler"] = SCHEDULER_ENTRY
        (Path(view) / "model_index.json").write_text(json.dumps(index, indent=2))
        return DiffusionPipeline.from_pretrained(view, scheduler=scheduler, **kwargs)


def _write_pipeline_scheduler(folder: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    base = read_scheduler_config(folder)
    config = perflow_scheduler_config(metadata, base)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file)
        index["scheduler"] = SCHEDULER_ENTRY
        index_file.write_text(json.dumps(index, indent=2))
    return config


# ----------------------------------------------------------------------------- single-file (LDM) layout


def ldm_unet_key_map(ldm_keys: list[str] | Mapping[str, Any], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{diffusers UNet key: single-file key}`` for a single-file checkpoint with these keys.

    Derived from diffusers' ``convert_ldm_unet_checkpoint``: each UNet tensor of the
    checkpoint is replaced by a scalar tagged with its index, the converter renames
    them, and each output's tag names its source key.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = [k for k in ldm_keys if k.startswith(LDM_UNET_PREFIX)]
    if not keys:
        raise ValueError(
            f"no UNet tensors (keys starting with {LDM_UNET_PREFIX!r}) in this single-file checkpoint; "
            "is it an SD-style .safetensors checkpoint?"
        )
    tagged = {k: torch.tensor(float(i), dtype=torch.float64) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(tagged, dict(unet_config))
    mapping = {}
    for dk, v in converted.items():
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            raise ValueError(f"diffusers' converter built {dk!r} from several tensors; cannot map it back")
        mapping[dk] = keys[int(v.item())]
    return mapping


def unet_to_ldm_state_dict(sd: StateDict, unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SD-family UNet state dict in the single-file layout (``model.diffusion_model.*``).

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` for UNets whose
    ``layers_per_block`` is one integer, checked by tests to round-trip exactly.
    """
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"only an integer layers_per_block is supported, got {lpb!r}")
    n = lpb + 1
    up_types = list(unet_config.get("up_block_types", []))
    fixed = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    }
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}

    def res(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return f"{resnet.get(head, head)}.{tail}"

    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        p = key.split(".")
        mod, param = ".".join(p[:-1]), p[-1]
        if mod in fixed:
            new = f"{fixed[mod]}.{param}"
        elif key == "class_embedding.weight":
            new = "label_emb.weight"
        elif p[0] == "down_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "resnets":
                new = f"input_blocks.{n * b + j + 1}.0.{res(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{n * b + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{n * (b + 1)}.0.op.{'.'.join(p[5:])}"
        elif p[0] == "mid_block":
            j, rest = int(p[2]), ".".join(p[3:])
            new = f"middle_block.{2 * j}.{res(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "resnets":
                new = f"output_blocks.{n * b + j}.0.{res(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{n * b + j}.1.{rest}"
            else:  # upsamplers.0.conv.*
                slot = 2 if "CrossAttn" in up_types[b] else 1
                new = f"output_blocks.{n * b + lpb}.{slot}.{'.'.join(p[4:])}"
        else:
            raise ValueError(f"no single-file name known for UNet key {key!r}")
        out[LDM_UNET_PREFIX + new] = v
    return out


def merge_single_file(
    path: str | os.PathLike,
    delta: StateDict,
    out: str | os.PathLike,
    unet_config: Mapping[str, Any],
    scale: float = 1.0,
    strict: bool = True,
    partial: bool = False,
) -> MergeReport:
    """Merge ``delta`` (diffusers UNet keys) into a single-file checkpoint, written in the same layout.

    UNet tensors are summed in fp32 and saved in their stored dtype; VAE, text
    encoder and any other tensors are copied unchanged, as is the file's metadata.
    """
    full, meta = read_safetensors(path)
    key_map = ldm_unet_key_map(list(full), unet_config)  # diffusers -> ldm
    mapped = {dk: full[lk] for dk, lk in key_map.items()}
    merged, report = merge_state_dict(mapped, delta, scale, strict, partial)
    for dk, lk in key_map.items():
        full[lk] = merged[dk]
    save_safetensors(full, out, meta)
    return report


# ----------------------------------------------------------------------------- merge into a path


def _unet_config_for(metadata: Mapping[str, Any], config_from: str | os.PathLike | None) -> dict[str, Any]:
    if config_from is not None:
        if Path(config_from).is_dir():
            folder = model_folder(config_from)
            return read_json(folder / "config.json")
        if not Path(config_from).is_file():
            raise FileNotFoundError(f"no UNet config at {str(config_from)!r}; give a UNet folder or its config.json")
        return read_json(config_from)
    base = metadata.get("base_model")
    if isinstance(base, Mapping) and isinstance(base.get("config"), Mapping):
        return dict(base["config"])
    if isinstance(metadata.get("unet_config"), Mapping):
        return dict(metadata["unet_config"])
    raise ValueError(
        "merging into a single-file checkpoint needs the UNet config; this delta's metadata has none: "
        "pass the teacher's UNet folder or config.json (CLI: --unet-config PATH)"
    )


def check_merge_output(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or that would clobber the model.

    ``out`` inside the model folder would copy the copy into itself; a model inside ``out``
    would be deleted by ``overwrite``; an existing ``out`` needs ``overwrite``; and the path must
    be writable (see :func:`perflow.io.check_output_path`).
    """
    model, out = Path(model), Path(out)
    m, o = model.resolve(), out.resolve()
    if model.is_dir() and m != o and m in o.parents:
        raise ValueError(f"the output {str(out)!r} lies inside the model folder {str(model)!r}; write it elsewhere")
    if o in m.parents:
        raise ValueError(f"the model {str(model)!r} lies inside the output {str(out)!r}; writing there would delete it")
    if model.is_file() and out.suffix != ".safetensors":
        raise ValueError(f"merging into a single-file checkpoint writes one .safetensors file; got -o {str(out)!r}")
    if model.is_dir() and out.suffix == ".safetensors":
        raise ValueError(f"merging into a folder writes a folder; got -o {str(out)!r} (a .safetensors name)")
    if out.exists() and not overwrite:
        what = "is the model itself; merging in place needs" if m == o else "exists; choose another output or pass"
        raise ValueError(f"{str(out)!r} {what} overwrite=True (CLI: --overwrite)")
    check_output_path(out, folder=model.is_dir())


def merge_into_path(
    model: str | os.PathLike,
    delta: StateDict | str | os.PathLike,
    out: str | os.PathLike,
    scale: float = 1.0,
    *,
    metadata: Mapping[str, Any] | None = None,
    strict: bool = True,
    unet_config: str | os.PathLike | None = None,
    overwrite: bool = False,
    variant: str | None = None,
) -> MergeReport:
    """Merge a delta into a model on disk and write the result to ``out``.

    - ``model`` a diffusers model folder: ``out`` is the same folder with merged weights.
    - ``model`` a pipeline (or class-conditional teacher) folder: ``out`` is a copy whose
      ``unet/`` is merged and whose ``scheduler/`` is the PeRFlow scheduler from the
      delta's metadata (``model_index.json`` then names ``perflow.scheduler``).
    - ``model`` a single-file ``.safetensors`` checkpoint: ``out`` is a single file in the
      same layout (needs the UNet config, from the delta metadata or ``unet_config``).

    Sums are fp32 and results keep the model's dtype. Writes are atomic: the output is
    built in a temporary sibling (``.OUT.perflow-PID-*``, removed on failure, and on the next
    run if the process was killed) and renamed into place, with the permissions a new file or
    folder gets under the umask. The output is checked before any work (see
    :func:`check_merge_output`); a model config that differs from the delta's recorded
    teacher config is warned about. ``variant`` picks the weights of a delta folder.
    """
    check_scale(scale)
    model, out = Path(model), Path(out)
    if not model.exists():
        raise FileNotFoundError(f"no model at {str(model)!r}")
    if model.is_file() and model.suffix != ".safetensors":
        raise ValueError(f"{str(model)!r} is not a .safetensors single-file checkpoint; perflow never unpickles weights")
    check_merge_output(model, out, overwrite)
    if isinstance(delta, (str, os.PathLike)):
        delta, file_meta = load_delta(delta, variant=variant)
        metadata = {**file_meta, **(metadata or {})}
    metadata = dict(metadata or {})
    partial = bool(metadata.get("partial", False))
    remove_stale_temps(out)
    if model.is_file():
        config = _unet_config_for(metadata, unet_config)
        check_base_config(config, metadata)
        return merge_single_file(model, delta, out, config, scale, strict, partial)
    src = model_folder(model)
    if src != model and not partial and is_perflow_scheduler_config(read_scheduler_config(model)):
        raise ValueError(f"{str(model)!r} already samples with the PeRFlow scheduler: a delta is merged into it already, "
                         "and merging again would add it twice; merge into the original model folder")
    model_config = read_json(src / "config.json")
    check_family(model_config.get("_class_name"), metadata)
    check_base_config(model_config, metadata)
    groups = weight_files(src)
    # every weight variant (plain, fp16, ...) is merged; the plain one's report is returned
    merges = {v: merge_state_dict(read_weights(files), delta, scale, strict, partial) for v, files in groups.items()}
    report = merges["" if "" in merges else next(iter(merges))][1]
    with atomic_folder(out, overwrite) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
        os.chmod(tmp, output_mode(folder=True))  # copytree gave it the model folder's mode; the writes below need ours
        dst = tmp / src.relative_to(model)
        for stale in dst.glob("diffusion_pytorch_model*.bin"):
            warnings.warn(f"dropping unmerged pickled weights {stale.name} from the output", stacklevel=2)
            stale.unlink()
        for v, files in groups.items():
            _write_model_weights([dst / f.name for f in files], merges[v][0])
        if src != model:  # a pipeline or teacher folder: also its scheduler
            _write_pipeline_scheduler(tmp, metadata)
    if report.untouched_addons:
        warnings.warn(f"{len(report.untouched_addons)} adapter tensor(s) left unchanged", stacklevel=2)
    return report


# ----------------------------------------------------------------------------- extract from folders


def scheduler_metadata_for(
    student: str | os.PathLike,
    teacher: str | os.PathLike,
    num_time_windows: int | None = None,
    prediction_type: str | None = None,
    window_boundaries: list[float] | None = None,
) -> dict[str, Any]:
    """``num_time_windows``, ``prediction_type``, ``window_boundaries`` and ``scheduler_config`` of a student.

    Taken from the student folder's ``scheduler/`` when it holds a PeRFlow scheduler
    config (explicit arguments must then agree with it); otherwise built from the
    arguments and the teacher's (or student's) beta schedule.
    """
    from perflow.scheduler import PeRFlowScheduler

    given = {"num_time_windows": num_time_windows, "prediction_type": prediction_type,
             "window_boundaries": window_boundaries}
    given = {k: v for k, v in given.items() if v is not None}
    student_cfg = read_scheduler_config(student)
    if is_perflow_scheduler_config(student_cfg):
        sched = PeRFlowScheduler.from_config(student_cfg)
        found = {"num_time_windows": sched.config.num_time_windows, "prediction_type": sched.config.prediction_type,
                 "window_boundaries": sched.config.window_boundaries}
        clash = [f"{k}={v!r} (student scheduler: {found[k]!r})" for k, v in given.items() if v != found[k]]
        if clash:
            raise ValueError(
                f"the student's scheduler/ config disagrees with the options given: {', '.join(clash)}; "
                "drop the options to use the student's own settings"
            )
    else:
        if "prediction_type" not in given or ("num_time_windows" not in given and "window_boundaries" not in given):
            raise ValueError(
                "the student folder has no PeRFlow scheduler config (scheduler/scheduler_config.json naming "
                "PeRFlowScheduler): say how it was trained with --num-time-windows K and --prediction-type "
                "{diff_eps,ddim_eps,velocity} (or --window-boundaries)"
            )
        base = read_scheduler_config(teacher) or student_cfg or {}
        sched = PeRFlowScheduler(**{k: base[k] for k in BETA_KEYS if k in base}, **given)
    config = {"_class_name": "PeRFlowScheduler",
              **{k: v for k, v in dict(sched.config).items() if not k.startswith("_")}}
    meta = scheduler_metadata(config)
    meta.setdefault("window_boundaries", sched.boundaries.tolist())
    return meta


def extract_from_folders(
    student: str | os.PathLike,
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_time_windows: int | None = None,
    prediction_type: str | None = None,
    window_boundaries: list[float] | None = None,
    cfg_mode: str | None = None,
    base_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``perflow delta extract``: the delta of two model/pipeline/teacher folders, saved with metadata."""
    if cfg_mode is not None and cfg_mode not in ("sync", "fixed"):
        raise ValueError(f"cfg_mode must be 'sync' or 'fixed', got {cfg_mode!r}")
    s_sd, s_cfg = read_model_folder(student)
    t_sd, t_cfg = read_model_folder(teacher)
    if config_fingerprint(s_cfg) != config_fingerprint(t_cfg):
        warnings.warn(f"student and teacher configs differ in {config_differences(s_cfg, t_cfg)}", stacklevel=2)
    meta: dict[str, Any] = scheduler_metadata_for(student, teacher, num_time_windows, prediction_type, window_boundaries)
    delta = extract_delta(s_sd, t_sd, dtype=dtype)
    meta["base_model"] = base_model_info(t_sd, name=base_name or str(Path(teacher).resolve()), config=t_cfg)
    teacher_sched = read_scheduler_config(teacher)
    if teacher_sched and "prediction_type" in teacher_sched:
        meta["teacher_prediction_type"] = teacher_sched["prediction_type"]
    if cfg_mode is not None:
        meta["cfg_mode"] = cfg_mode
    meta["delta_dtype"] = str(dtype).replace("torch.", "")
    save_delta(delta, out, meta)
    return delta, meta
