"""A PeRFlow delta as a LoRA: truncated SVD of each linear and convolution weight delta.

For a weight delta ``D`` of a linear layer ``(out, in)`` or a convolution
``(out, in, k, k)`` reshaped to ``(out, in k k)``, with ``D = U S V^T``:

    B = U[:, :r] sqrt(S[:r])          (out, r)            -> lora_B (out, r) or (out, r, 1, 1)
    A = sqrt(S[:r]) V[:, :r]^T        (r, in k k)         -> lora_A (r, in) or (r, in, k, k)
    D ~ B A,  relative error ||D - B A||_F / ||D||_F = sqrt(sum_{i > r} S_i^2 / sum_i S_i^2)

(Eckart-Young: the best rank-``r`` approximation). The file uses diffusers' peft
LoRA keys ``<role>.<module>.lora_A.weight`` / ``lora_B.weight`` with
``lora_alpha = rank`` per module (scale 1), so ``pipe.load_lora_weights(path,
adapter_name=...)``, ``set_adapters``, ``fuse_lora`` work as for any LoRA. ``<role>``
is the denoiser's name in its pipeline, ``unet`` for UNets and ``transformer`` for
transformers (SD3, Flux): a pipeline's ``load_lora_weights`` silently skips keys
under the other name.

Tensors that are not linear or convolution weights (biases, norms, embeddings)
cannot be LoRA'd; :func:`delta_to_lora` returns them as ``rest``, with their share
of the delta's norm, to be stored in a companion delta file and merged with
:func:`perflow.delta.merge_delta`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from perflow.io import save_safetensors

from .metadata import decode_metadata, encode_metadata

LORA_PREFIX = "unet"  # the default role: a UNet denoiser
LORA_ROLES = ("unet", "transformer")
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraExport:
    """A delta split into a LoRA and the rest.

    ``lora``: peft/diffusers keys -> factors (fp32). ``rest``: delta keys that are not
    LoRA-able -> their delta. ``singular_values``: per LoRA'd module, every singular
    value of its delta (for error tables at any rank). ``ranks``: the rank stored per module.
    """

    rank: int
    prefix: str = LORA_PREFIX
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    rest: dict[str, torch.Tensor] = field(default_factory=dict)
    singular_values: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    delta_norm_sq: float = 0.0

    @property
    def rest_share(self) -> float:
        """``||rest||_F / ||delta||_F``: the part of the delta the LoRA cannot carry."""
        rest_sq = sum(float(v.double().pow(2).sum()) for v in self.rest.values())
        return math.sqrt(rest_sq / self.delta_norm_sq) if self.delta_norm_sq > 0 else 0.0

    def layer_error(self, module: str, rank: int) -> float:
        """``||D - D_r||_F / ||D||_F`` for one module at ``rank``."""
        s2 = self.singular_values[module].double().pow(2)
        total = float(s2.sum())
        return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0

    def overall_error(self, rank: int, rest: str = "none") -> float:
        """Relative Frobenius error at ``rank``.

        ``rest="none"``: over the LoRA'd weights only; ``"stored"``: over the whole delta
        with the rest kept exactly (companion file); ``"dropped"``: over the whole delta
        with the rest lost.
        """
        resid = sum(float(s.double().pow(2)[rank:].sum()) for s in self.singular_values.values())
        total = sum(float(s.double().pow(2).sum()) for s in self.singular_values.values())
        if rest in ("stored", "dropped"):
            rest_sq = sum(float(v.double().pow(2).sum()) for v in self.rest.values())
            resid, total = resid + (rest_sq if rest == "dropped" else 0.0), self.delta_norm_sq
        elif rest != "none":
            raise ValueError(f"rest must be 'none', 'stored' or 'dropped', got {rest!r}")
        return math.sqrt(resid / total) if total > 0 else 0.0

    def adapter_config(self) -> dict[str, Any]:
        """The peft ``LoraConfig`` fields diffusers reads from the file (alpha = rank: scale 1).

        peft matches a ``rank_pattern`` key ``k`` to every module named ``k`` or ``*.k``, first key first; a
        module name that is also the ending of another target (Flux's top-level ``proj_out`` and
        ``single_transformer_blocks.0.proj_out``) is anchored as ``^k`` so that it matches only itself.
        """
        names = set(self.ranks)
        anchored = {m: (f"^{m}" if any(o.endswith("." + m) for o in names) else m) for m in names}
        pattern = {anchored[m]: r for m, r in self.ranks.items() if r != self.rank}
        return {
            "r": self.rank,
            "lora_alpha": self.rank,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "target_modules": sorted(self.ranks),
            "use_dora": False,
            "lora_bias": False,
        }


def lora_prefix(model: Any) -> str:
    """The key prefix of a denoiser's LoRA: ``transformer`` for a transformer (a module, or its class
    name, e.g. ``SD3Transformer2DModel``), else ``unet``."""
    name = model if isinstance(model, str) else type(model).__name__
    return "transformer" if "Transformer" in name else LORA_PREFIX


def lora_targets(delta: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> list[str]:
    """Delta keys of linear and convolution weights.

    With ``model``, a key ``<m>.weight`` qualifies when module ``<m>`` is an
    ``nn.Linear`` or ``nn.Conv2d``; without, when the tensor is 2-D or 4-D and not
    named like an embedding table (a shape-only guess).
    """
    keys = [k for k in delta if k.endswith(".weight")]
    if model is not None:
        modules = dict(model.named_modules())
        return [k for k in keys if isinstance(modules.get(k[: -len(".weight")]), (nn.Linear, nn.Conv2d))]
    return [k for k in keys if delta[k].ndim in (2, 4) and "embedding.weight" not in k and "emb.weight" not in k]


def delta_to_lora(
    delta: Mapping[str, torch.Tensor],
    rank: int,
    model: nn.Module | None = None,
    progress: bool = True,
    prefix: str | None = None,
) -> LoraExport:
    """Rank-``rank`` LoRA of every linear/conv weight delta by truncated SVD (computed in fp64).

    Each module gets rank ``min(rank, out, in k k)``. See the module docstring for
    the factorisation and the error formula. ``prefix``: the denoiser's role, ``unet`` or
    ``transformer`` (default: from ``model``'s class, else ``unet``).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    prefix = prefix or (lora_prefix(model) if model is not None else LORA_PREFIX)
    if prefix not in LORA_ROLES:
        raise ValueError(f"prefix must be one of {LORA_ROLES} (the denoiser's name in its pipeline), got {prefix!r}")
    targets = set(lora_targets(delta, model))
    if not targets:
        raise ValueError("the delta has no linear or convolution weights to turn into a LoRA")
    out = LoraExport(rank=rank, prefix=prefix)
    out.delta_norm_sq = sum(float(v.double().pow(2).sum()) for v in delta.values())
    for key in tqdm(sorted(delta), desc="SVD", disable=not progress):
        d = delta[key]
        if key not in targets:
            out.rest[key] = d
            continue
        module = key[: -len(".weight")]
        mat = d.double().reshape(d.shape[0], -1)  # (out, in k k)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b = (u[:, :r] * root).float()  # (out, r)
        a = (root[:, None] * vh[:r]).float()  # (r, in k k)
        if d.ndim == 4:
            a = a.reshape(r, *d.shape[1:])  # (r, in, k, k)
            b = b.reshape(d.shape[0], r, 1, 1)  # (out, r, 1, 1)
        out.lora[f"{prefix}.{module}.lora_A.weight"] = a.contiguous()
        out.lora[f"{prefix}.{module}.lora_B.weight"] = b.contiguous()
        out.singular_values[module] = s.float()
        out.ranks[module] = r
    return out


def lora_to_delta(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``delta[<m>.weight] = B A`` (reshaped back) for a LoRA in this module's format, at scale 1."""
    out = {}
    for k, a in lora.items():
        if not k.endswith(".lora_A.weight"):
            continue
        role, _, rest = k.partition(".")
        module = rest[: -len(".lora_A.weight")]
        b = lora[f"{role}.{module}.lora_B.weight"]
        prod = b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()
        out[f"{module}.weight"] = prod.reshape(b.shape[0], *a.shape[1:]).float()
    return out


def lora_file_to_delta(
    tensors: Mapping[str, torch.Tensor], raw_metadata: Mapping[str, str], path: Any = "LoRA"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A LoRA file of this module's format as a (partial) delta ``scale_m B A`` per module.

    ``scale_m = lora_alpha_m / r_m`` from the file's ``lora_adapter_metadata`` (1 when absent,
    diffusers' own default). Other LoRA layouts (kohya ``lora_down``/``lora_up``, text-encoder
    LoRAs) are refused: load those with ``pipe.load_lora_weights``.
    """
    roles = {k.partition(".")[0] for k in tensors}
    role = next(iter(roles)) if len(roles) == 1 else None
    foreign = [k for k in tensors if role not in LORA_ROLES or ".lora_down." in k]
    if foreign:
        raise ValueError(
            f"{path} is a LoRA in a layout perflow does not merge (e.g. {sorted(foreign)[0]!r}); "
            "load it with pipe.load_lora_weights(...) and pipe.fuse_lora() instead"
        )
    try:
        adapter = json.loads(raw_metadata.get(LORA_METADATA_KEY, "{}"))
    except ValueError:
        raise ValueError(f"{path}: its {LORA_METADATA_KEY} header is not JSON; re-export the LoRA") from None
    r0, a0 = adapter.get(f"{role}.r"), adapter.get(f"{role}.lora_alpha")
    # a key anchored as "^name" (adapter_config) names the module "name" itself
    ranks = {k.removeprefix("^"): v for k, v in (adapter.get(f"{role}.rank_pattern") or {}).items()}
    alphas = {k.removeprefix("^"): v for k, v in (adapter.get(f"{role}.alpha_pattern") or {}).items()}
    delta = lora_to_delta(tensors)
    for key in delta:
        module = key[: -len(".weight")]
        r, alpha = ranks.get(module, r0), alphas.get(module, a0)
        if r and alpha and alpha != r:
            delta[key] = delta[key] * (alpha / r)
    meta = {k: v for k, v in decode_metadata(raw_metadata).items() if k != LORA_METADATA_KEY}
    meta.update({"format": "perflow.lora.v1 (as a low-rank delta)", "partial": True})
    return delta, meta


def save_lora(export: LoraExport, path: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write the LoRA as one safetensors file diffusers' ``load_lora_weights`` reads (atomic).

    The header carries diffusers' ``lora_adapter_metadata`` (the peft config, prefixed by
    the denoiser's role, ``unet.`` or ``transformer.``) and perflow's own metadata
    (JSON-encoded values). ``path`` must end in ``.safetensors``.
    """
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"a LoRA is written as safetensors: give a path ending in .safetensors, got {str(path)!r}")
    adapter = {f"{export.prefix}.{k}": v for k, v in export.adapter_config().items()}
    meta = encode_metadata({**(metadata or {}), "lora_rank": export.rank, "lora_rest_share": export.rest_share})
    meta["format"] = "pt"  # what diffusers writes; perflow's format tag is in perflow_format
    meta["perflow_format"] = json.dumps("perflow.lora.v1")
    meta[LORA_METADATA_KEY] = json.dumps(adapter, sort_keys=True)
    save_safetensors(export.lora, path, meta)


def error_table(export: LoraExport, ranks: Sequence[int], per_layer: bool = True) -> str:
    """A Markdown table of relative approximation errors per rank: per module and overall."""
    ranks = sorted(set(int(r) for r in ranks))
    head = "| module | shape rank | " + " | ".join(f"r={r}" for r in ranks) + " |"
    sep = "| --- | --- | " + " | ".join("---" for _ in ranks) + " |"
    rows = [head, sep]
    if per_layer:
        for m in sorted(export.singular_values):
            errs = " | ".join(f"{export.layer_error(m, r):.4f}" for r in ranks)
            rows.append(f"| {m} | {export.singular_values[m].numel()} | {errs} |")
    lora_all = " | ".join(f"{export.overall_error(r):.4f}" for r in ranks)
    rows.append(f"| **all LoRA'd weights** | | {lora_all} |")
    for mode in ("stored", "dropped"):
        whole = " | ".join(f"{export.overall_error(r, rest=mode):.4f}" for r in ranks)
        rows.append(f"| **whole delta, rest {mode}** | | {whole} |")
    return "\n".join(rows)
