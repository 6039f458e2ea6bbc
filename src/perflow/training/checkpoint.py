"""Resumable checkpoints: accelerate's state plus the data position, the RNG and the EMA.

A checkpoint ``<output_dir>/checkpoints/checkpoint-<step>/`` holds

- accelerate's ``save_state``: ``model.safetensors`` (the fp32 student), ``optimizer.bin``,
  ``scheduler.bin`` and ``random_states_<rank>.pkl`` (read back by accelerate with
  ``torch.load(weights_only=True)``);
- ``ema.safetensors``: the EMA's shadow weights by parameter name;
- ``generator_<rank>.safetensors``: each rank's training generator (noise, ``t``, dropout);
- ``perflow_state.json``: optimizer step, data micro-step and its ``(epoch, index)``, EMA step,
  the loss history, the config, the run id, the number of processes and the size of every
  other file (written last).

It is written into ``.tmp-checkpoint-<step>`` and renamed into place once every rank has
written its part, so a crash never leaves a half-written checkpoint (a failed write removes the
temporary folder and raises :class:`CheckpointWriteError`); the newest ``keep_checkpoints`` of
the run that writes are kept, other runs' checkpoints are never deleted. On resume,
:func:`verify_checkpoint` checks every file against the recorded sizes (and the structure of
safetensors and torch zip files) and ``latest`` falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..io import match_umask
from .outdir import WRITE_ERRORS

STATE_FILE = "perflow_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (full disk, I/O error); no partial checkpoint is left."""


class CheckpointError(ValueError):
    """A checkpoint to resume from is damaged or does not fit this run."""


def read_state(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's ``perflow_state.json``, or None when it is missing or unreadable."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _file_problem(f: Path) -> str | None:
    """Why a checkpoint file is unusable (truncated safetensors or torch zip), or None."""
    size = f.stat().st_size
    if size == 0:
        return "is empty"
    with open(f, "rb") as fh:
        head = fh.read(8)
        if f.suffix == ".safetensors":
            if len(head) < 8:
                return "is truncated"
            n = struct.unpack("<Q", head)[0]
            try:
                header = json.loads(fh.read(n)) if 8 + n <= size else None
            except ValueError:
                header = None
            if header is None:
                return "has a damaged header"
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
            if 8 + n + end > size:
                return f"is truncated ({size} of {8 + n + end} bytes)"
            return None
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(f) as z:
                if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                    return "is truncated"
        except (zipfile.BadZipFile, OSError):
            return "is truncated (no zip directory)"
    return None


def verify_checkpoint(path: str | Path) -> str | None:
    """None when a checkpoint folder is complete, else why not: a missing file, a size that differs from
    the one recorded at save time, or a truncated safetensors / torch file."""
    path = Path(path)
    state = read_state(path)
    if state is None:
        return f"{STATE_FILE} is missing or unreadable"
    recorded = state.get("files")
    if isinstance(recorded, dict):
        for name, size in recorded.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if (actual := (path / name).stat().st_size) != size:
                return f"{name} has {actual} of {size} bytes"
    elif not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        return "the model weights are missing"
    for f in sorted(path.iterdir()):
        if f.is_file() and (problem := _file_problem(f)):
            return f"{f.name} {problem}"
    return None


def resolve_resume(resume: str | None, output_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint folder to resume from: ``latest`` (the newest intact one, None if there is none
    yet; damaged ones are named through ``log`` and passed over) or a path, which must be intact."""
    if resume is None or resume == "":
        return None
    if resume == "latest":
        damaged = []
        for path in reversed(checkpoint_dirs(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                if damaged:
                    log(f"resuming from {path.name} instead: {'; '.join(damaged)}")
                return path
            damaged.append(f"{path.name} is damaged ({problem})")
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {Path(output_dir) / 'checkpoints'}: {'; '.join(damaged)}; "
                "delete them, or start afresh without --resume and with --overwrite true"
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a perflow checkpoint (no {STATE_FILE}); use --resume latest or a "
            f"checkpoint-<step> folder under {Path(output_dir) / 'checkpoints'}"
        )
    if problem := verify_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); resume from an older one or --resume latest")
    return path


def _named_shadow(ema, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)}


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, state: dict[str, Any], ema, param_names: list[str],
    generator: torch.Generator, keep: int, run_ids: Iterable[str | None] = (None,),
) -> Path:
    """Save a checkpoint for optimizer step ``step`` (call on every rank); then delete the oldest of
    the checkpoints whose ``run_id`` is in ``run_ids`` beyond the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    try:
        _write_checkpoint(accelerator, tmp, state, ema, param_names, generator)
    except (*WRITE_ERRORS, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write {final}: {_io_message(err, root)}; free space and resume with --resume latest") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ours = [p for p in checkpoint_dirs(output_dir) if p != final and _run_id(p) in set(run_ids)]
        for old in ours[: max(0, len(ours) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(accelerator, tmp: Path, state: dict[str, Any], ema, param_names: list[str], generator) -> None:
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    save_file({"state": generator.get_state()}, str(tmp / f"generator_{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process and ema is not None:
        save_file(_named_shadow(ema, param_names), str(tmp / "ema.safetensors"))
        state = {**state, "ema_optimization_step": int(ema.optimization_step)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=1))
        match_umask(tmp)


def _run_id(path: Path) -> Any:
    state = read_state(path)
    return state.get("run_id") if state is not None else "<unreadable>"


def _io_message(err: BaseException, folder: Path) -> str:
    """One line for a write error, with the free space left on the disk."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        msg += f" ({free / 2**20:.0f} MiB free there)"
    except OSError:
        pass
    return msg



def load_checkpoint(accelerator, path: Path, ema, param_names: list[str], generator: torch.Generator) -> dict[str, Any]:
    """Restore accelerate's state, the EMA and this rank's generator; returns the saved state dict."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved_procs = state.get("num_processes", accelerator.num_processes)
    if saved_procs != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {saved_procs} processes and this run uses {accelerator.num_processes}; "
            "resume with the same number of processes"
        )
    accelerator.load_state(str(path))
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
