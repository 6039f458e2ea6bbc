"""Resumable checkpoints: accelerate's state plus the data position, the RNG and the EMA.

A checkpoint ``<output_dir>/checkpoints/checkpoint-<step>/`` holds

- accelerate's ``save_state``: ``model.safetensors`` (the fp32 student), ``optimizer.bin``,
  ``scheduler.bin`` and ``random_states_<rank>.pkl`` (read back by accelerate with
  ``torch.load(weights_only=True)``);
- ``ema.safetensors``: the EMA's shadow weights by parameter name;
- ``generator_<rank>.safetensors``: each rank's training generator (noise, ``t``, dropout);
- ``perflow_state.json``: optimizer step, data micro-step and its ``(epoch, index)``, EMA step,
  the loss history and the config.

It is written into ``.tmp-checkpoint-<step>`` and renamed into place once every rank has
written its part, so a crash never leaves a half-written checkpoint; the newest
``keep_checkpoints`` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "perflow_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (None if there is none yet) or a path."""
    if resume is None or resume == "":
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a perflow checkpoint (no {STATE_FILE}); use --resume latest or a "
            f"checkpoint-<step> folder under {Path(output_dir) / 'checkpoints'}"
        )
    return path


def _named_shadow(ema, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, state: dict[str, Any], ema, param_names: list[str],
    generator: torch.Generator, keep: int,
) -> Path:
    """Save a checkpoint for optimizer step ``step`` (call on every rank)."""
    from safetensors.torch import save_file

    root = Path(output_dir) / "checkpoints"
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    rank = accelerator.process_index
    save_file({"state": generator.get_state()}, str(tmp / f"generator_{rank}.safetensors"))
    if accelerator.is_main_process:
        if ema is not None:
            save_file(_named_shadow(ema, param_names), str(tmp / "ema.safetensors"))
            state = {**state, "ema_optimization_step": int(ema.optimization_step)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema, param_names: list[str], generator: torch.Generator) -> dict[str, Any]:
    """Restore accelerate's state, the EMA and this rank's generator; returns the saved state dict."""
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    gen_file = path / f"generator_{accelerator.process_index}.safetensors"
    if not gen_file.is_file():
        raise FileNotFoundError(
            f"{gen_file} is missing: the checkpoint was written by fewer processes than this run uses; "
            "resume with the same number of processes"
        )
    generator.set_state(load_file(str(gen_file))["state"])
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{ema_file} is missing; the checkpoint was saved without EMA (set training.ema_decay 0)")
        shadow = load_file(str(ema_file))
        for name, p in zip(param_names, ema.shadow_params):
            p.data.copy_(shadow[name].to(p.device, p.dtype))
        ema.optimization_step = int(state.get("ema_optimization_step", 0))
    return state
