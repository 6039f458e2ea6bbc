"""Resumable checkpoints: accelerate's state plus the data position, the RNG and the EMA.

A checkpoint ``<output_dir>/checkpoints/checkpoint-<step>/`` holds

- accelerate's ``save_state``: ``model.safetensors`` (the fp32 student), ``optimizer.bin``,
  ``scheduler.bin`` and ``random_states_<rank>.pkl`` (read back by accelerate with
  ``torch.load(weights_only=True)``);
- ``ema.safetensors``: the EMA's shadow weights by parameter name;
- ``generator_<rank>.safetensors``: each rank's training generator (noise, ``t``, dropout);
- ``perflow_state.json``: optimizer step, data micro-step and its ``(epoch, index)``, EMA step,
  the loss history, the config, the run id, the number of processes and the size and sha256 of
  every other file (written last).

It is written into ``.tmp-checkpoint-<step>`` and renamed into place once every rank has
written its part, so a crash never leaves a half-written checkpoint (a failed write removes the
temporary folder and raises :class:`CheckpointWriteError`); the newest ``keep_checkpoints`` of
the run that writes are kept, other runs' checkpoints are never deleted. On resume,
:func:`verify_checkpoint` checks ``perflow_state.json`` (its fields, and its step against the folder
name) and every file against the recorded sizes, the structure of safetensors and torch zip files
and the recorded sha256 (checkpoints written before hashes were recorded are checked without them);
``latest`` falls back to the newest intact checkpoint. A file that passes these checks and still
cannot be loaded is named by :func:`load_checkpoint`.
"""

from __future__ import annotations

import hashlib
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
    if f.suffix in (".bin", ".pkl") and not head.startswith(b"PK\x03\x04"):
        return "is not a torch file: its header is damaged"  # accelerate writes them with torch.save's zip format
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(f) as z:
                if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                    return "is truncated"
        except (zipfile.BadZipFile, OSError):
            return "is truncated (no zip directory)"
    return None


def file_digests(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """The sha256 (hex) of each file in ``folder`` (or of ``names`` in it), by file name; what a checkpoint
    records so that a resume finds bytes damaged after the write even where the size is unchanged."""
    folder = Path(folder)
    if names is None:
        names = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.name != STATE_FILE]
    return {name: _sha256(folder / name) for name in names}


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# optional fields of perflow_state.json the trainer reads, and what they must hold
_STATE_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "epoch": ("a count", _is_count),
    "batch_index": ("a count", _is_count),
    "dataset_size": ("a count", lambda v: v is None or _is_count(v)),
    "num_processes": ("a count", lambda v: _is_count(v) and v > 0),
    "ema_optimization_step": ("a count", _is_count),
    "missing_captions": ("a count", _is_count),
    "nonfinite_skips": ("a count", _is_count),
    "fidelity": ("a list of [step, error] pairs",
                 lambda v: isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 and all(map(_is_number, x)) for x in v)),
    "best_step": ("a step count", lambda v: v is None or _is_count(v)),
    "best_fidelity": ("a number", lambda v: v is None or _is_number(v)),
    "losses": ("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
    "bad_images": ("a list of names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "window_weights": ("a list of numbers", lambda v: v is None or (isinstance(v, list) and all(_is_number(x) for x in v))),
    "solver_steps": ("a step count or a list of them",
                     lambda v: v is None or _is_count(v) or (isinstance(v, list) and all(_is_count(x) for x in v))),
    "config": ("an object", lambda v: v is None or isinstance(v, dict)),
    "run_id": ("a string", lambda v: v is None or isinstance(v, str)),
    "files": ("an object of file sizes", lambda v: isinstance(v, dict) and all(_is_count(x) for x in v.values())),
    "sha256": ("an object of file hashes", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
}


def _state_problem(state: dict[str, Any], path: Path) -> str | None:
    """Why a checkpoint's ``perflow_state.json`` cannot be resumed from (a missing or mistyped field, a step
    that is not the folder's), or None."""
    for key in ("global_step", "micro_step"):
        if key not in state:
            return f"{STATE_FILE} has no {key}"
        if not _is_count(state[key]):
            return f"{STATE_FILE} has {key} {state[key]!r}, not a step count"
    for key, (what, ok) in _STATE_FIELDS.items():
        if key in state and not ok(state[key]):
            return f"{STATE_FILE} has {key} {_short(state[key])}, not {what}"
    if (m := _CKPT.match(path.name)) and int(m.group(1)) != state["global_step"]:
        return f"{STATE_FILE} is for step {state['global_step']}, not step {m.group(1)} of the folder name"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def verify_checkpoint(path: str | Path) -> str | None:
    """None when a checkpoint folder is complete, else why not: an unreadable or inconsistent
    ``perflow_state.json``, a missing file, a size that differs from the one recorded at save time, a
    truncated safetensors / torch file, or bytes that differ from the recorded sha256."""
    path = Path(path)
    state = read_state(path)
    if state is None:
        return f"{STATE_FILE} is missing or unreadable"
    if problem := _state_problem(state, path):
        return problem
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
    digests = state.get("sha256")
    if isinstance(digests, dict):  # absent in checkpoints written before hashes were recorded
        for name, digest in digests.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if _sha256(path / name) != digest:
                return f"{name} differs from the sha256 recorded when it was written: its bytes are damaged"
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
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save a checkpoint for optimizer step ``step`` (call on every rank); then delete the oldest of
    the checkpoints whose ``run_id`` is in ``run_ids`` beyond the newest ``keep``. ``extra``: more
    safetensors files the main process writes (file name -> named tensors), e.g. the best checked student."""
    root = Path(output_dir) / "checkpoints"
    tmp = root / f".tmp-checkpoint-{step}"
    final = root / f"checkpoint-{step}"
    try:
        _write_checkpoint(accelerator, tmp, state, ema, param_names, generator, extra)
    except (*WRITE_ERRORS, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        message = _io_message(err, root, _largest_file(tmp))  # before the partial files go: the space they hold counts
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write {final}: {message}; free space and resume with --resume latest") from err
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


def _write_checkpoint(accelerator, tmp: Path, state: dict[str, Any], ema, param_names: list[str], generator,
                      extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
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
    if accelerator.is_main_process:
        for name, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        state = {**state, "files": files, "sha256": file_digests(tmp, files)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        match_umask(tmp)


def _run_id(path: Path) -> Any:
    state = read_state(path)
    return state.get("run_id") if state is not None else "<unreadable>"


def _largest_file(folder: Path) -> int:
    try:
        return max((f.stat().st_size for f in folder.iterdir() if f.is_file()), default=0)
    except OSError:
        return 0


def _io_message(err: BaseException, folder: Path, needed: int = 0) -> str:
    """One line for a write error, with the free space left on the disk. An error that does not say the disk is
    full (torch.save's ``[enforce fail at inline_container.cc] ... unexpected pos``) while less space is free than
    64 MiB or ``needed`` bytes (the largest file of the checkpoint written so far) is named as a full disk."""
    import errno

    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return msg
    full = getattr(err, "errno", None) == errno.ENOSPC or "no space left" in msg.lower()
    if not full and free < max(64 * 2**20, needed):
        return f"{msg}: most likely no space left on the device ({free / 2**20:.0f} MiB free there)"
    return msg + f" ({free / 2**20:.0f} MiB free there)"


def load_checkpoint(accelerator, path: Path, ema, param_names: list[str], generator: torch.Generator) -> dict[str, Any]:
    """Restore accelerate's state, the EMA and this rank's generator; returns the saved state dict. A file
    that cannot be loaded (damaged in a way :func:`verify_checkpoint` cannot see, e.g. in a checkpoint
    without recorded hashes) is a :class:`CheckpointError` naming it."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved_procs = state.get("num_processes", accelerator.num_processes)
    if saved_procs != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {saved_procs} processes and this run uses {accelerator.num_processes}; "
            "resume with the same number of processes"
        )
    gen_file = path / f"generator_{accelerator.process_index}.safetensors"
    if not gen_file.is_file():
        raise FileNotFoundError(
            f"{gen_file} is missing: the checkpoint was written by fewer processes than this run uses; "
            "resume with the same number of processes"
        )
    ema_file = path / "ema.safetensors"
    if ema is not None and not ema_file.is_file():
        raise FileNotFoundError(f"{ema_file} is missing; the checkpoint was saved without EMA (set training.ema_decay 0)")
    try:
        accelerator.load_state(str(path))
        generator.set_state(load_file(str(gen_file))["state"])
        shadow = load_file(str(ema_file)) if ema is not None else {}
    except Exception as err:  # noqa: BLE001 - re-raised unless a file of the checkpoint is found unloadable
        if (bad := _unloadable_file(path)) is None:
            raise
        raise CheckpointError(_damaged(path, f"{bad[0]} cannot be loaded: {bad[1]}")) from err
    if ema is not None:
        for name, p in zip(param_names, ema.shadow_params):
            if name not in shadow or shadow[name].shape != p.shape:
                why = "lacks" if name not in shadow else f"has another shape {list(shadow[name].shape)} for"
                raise CheckpointError(_damaged(path, f"ema.safetensors {why} the parameter {name}"))
            p.data.copy_(shadow[name].to(p.device, p.dtype))
        ema.optimization_step = int(state.get("ema_optimization_step", 0))
    return state


def load_extra(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The named tensors of a file :func:`save_checkpoint` wrote from ``extra`` (e.g. the best checked student); a
    missing or unreadable file is a :class:`CheckpointError` naming the checkpoint and the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path / name))
    except Exception as err:  # noqa: BLE001 - a missing or damaged file names the checkpoint
        raise CheckpointError(_damaged(path, f"{name} cannot be loaded: {type(err).__name__}")) from err


def _damaged(path: Path, problem: str) -> str:
    return (f"checkpoint {path} is damaged ({problem}); delete that folder and resume with --resume latest (the newest "
            "intact checkpoint), or start afresh with --overwrite true")


def _unloadable_file(path: Path) -> tuple[str, str] | None:
    """The first file of a checkpoint that cannot be loaded, and why (the error's first line); None if all load."""
    from accelerate.utils.other import load as torch_load  # torch.load as accelerate reads them (its safe globals)
    from safetensors.torch import load_file

    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name == STATE_FILE:
            continue
        try:
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pkl"):
                torch_load(str(f), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any failure names the file
            line = (str(err).strip().splitlines() or [""])[0]
            line = re.split(r"(?<=\w)\. ", line)[0][:160]  # its first sentence
            why = f"{type(err).__name__}: {line}" if line else type(err).__name__
            return f.name, why
    return None
