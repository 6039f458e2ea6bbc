"""Named tensors: which model they belong to, how two sets of them match, their fingerprints and files.

Helpers of :mod:`perflow.delta`: a model's denoiser and its state dict, the comparison
of two key sets (missing, extra, shape mismatches) and the matching of a delta to a
model that may carry adapter tensors (IP-Adapter, unfused LoRA), SHA-256
fingerprints of a config, a key set and a set of weights, the one reader of
safetensors files (errors name the file and the fix) and the checks and atomic
writes of output paths (temporary siblings, permissions from the umask, stale
temporaries of killed runs removed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]

# Keys that adapters add on top of a base UNet (IP-Adapter processors and projection,
# unfused peft LoRA layers): the delta leaves them alone instead of calling them "extra".
_ADDON_PATTERNS = (
    re.compile(r"(^|\.)processor\."),
    re.compile(r"^encoder_hid_proj\."),
    re.compile(r"\.lora_(A|B|magnitude_vector|embedding_A|embedding_B)\."),
)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "_use_default_values", "_commit_hash"}
_MAX_LISTED = 12

# ----------------------------------------------------------------------------- state dicts


def _denoiser(model: Any) -> Any:
    """The denoiser of ``model``: a pipeline's ``unet`` (or ``transformer``), else ``model`` itself."""
    if isinstance(model, Mapping) or isinstance(model, nn.Module):
        return model
    for name in ("unet", "transformer"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise TypeError(
        f"expected an nn.Module, a state dict or a diffusers pipeline with a UNet, got {type(model).__name__}"
    )


def state_dict_of(model: Any) -> dict[str, torch.Tensor]:
    """The denoiser's tensors by name (a module's ``state_dict()``, a mapping as is)."""
    model = _denoiser(model)
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    bad = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict values must be tensors; not tensors: {_listing(bad)}")
    return dict(model)


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"{shown} ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else shown


def _is_addon(key: str) -> bool:
    return any(p.search(key) for p in _ADDON_PATTERNS)


def _base_key(key: str) -> str:
    """``a.to_q.base_layer.weight -> a.to_q.weight`` (a peft-wrapped layer's base weight)."""
    return key.replace(".base_layer.", ".")


@dataclass
class KeyReport:
    """How two key sets compare: keys only in the delta, only in the model, and shape mismatches."""

    missing: list[str] = field(default_factory=list)  # in the delta/student, not in the model/teacher
    extra: list[str] = field(default_factory=list)  # in the model/teacher, not in the delta/student
    shape: list[str] = field(default_factory=list)  # "key: (a, b) vs (c, d)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.shape)

    def describe(self, left: str, right: str) -> str:
        lines = []
        if self.missing:
            lines.append(f"{len(self.missing)} key(s) in the {left} but not in the {right}: {_listing(self.missing)}")
        if self.extra:
            lines.append(f"{len(self.extra)} key(s) in the {right} but not in the {left}: {_listing(self.extra)}")
        if self.shape:
            lines.append(f"{len(self.shape)} shape mismatch(es): {_listing(self.shape)}")
        return "; ".join(lines)


def compare_keys(left: StateDict, right: StateDict) -> KeyReport:
    """Keys of ``left`` missing from ``right``, keys of ``right`` missing from ``left``, shape mismatches."""
    report = KeyReport(
        missing=[k for k in left if k not in right],
        extra=[k for k in right if k not in left],
    )
    for k in left:
        if k in right and tuple(left[k].shape) != tuple(right[k].shape):
            report.shape.append(f"{k}: {tuple(left[k].shape)} vs {tuple(right[k].shape)}")
    return report


def plan_merge(
    model_sd: StateDict, delta: StateDict, partial: bool = False
) -> tuple[dict[str, str], KeyReport, list[str], list[str]]:
    """Match delta keys to model keys.

    Returns ``(mapping delta key -> model key, problems, add-on keys, uncovered keys)``.
    A model tensor the delta does not cover is a problem ("extra") unless the delta is
    ``partial`` by design (the non-LoRA rest of a LoRA export), then it is listed as
    uncovered. Model keys of adapters (IP-Adapter processors, ``encoder_hid_proj``,
    unfused LoRA layers) are add-ons the delta does not touch; a peft-wrapped
    ``x.base_layer.weight`` takes the delta of ``x.weight``.
    """
    by_base: dict[str, str] = {}
    addons: list[str] = []
    for k in model_sd:
        if _is_addon(k):
            addons.append(k)
        else:
            by_base[_base_key(k)] = k
    mapping: dict[str, str] = {}
    report = KeyReport()
    for k, d in delta.items():
        mk = by_base.get(k)
        if mk is None:
            report.missing.append(k)
        elif tuple(model_sd[mk].shape) != tuple(d.shape):
            report.shape.append(f"{k}: delta {tuple(d.shape)} vs model {tuple(model_sd[mk].shape)}")
        else:
            mapping[k] = mk
    skip = {by_base[k] for k in delta if k in by_base} | set(addons)
    uncovered = [mk for mk, v in model_sd.items() if mk not in skip and v.is_floating_point()]
    if not partial:
        report.extra, uncovered = uncovered, []
    return mapping, report, addons, uncovered


# ----------------------------------------------------------------------------- fingerprints


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a diffusers model config, ignoring paths and library versions."""
    clean = {k: v for k, v in dict(config).items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def keys_fingerprint(sd: StateDict) -> str:
    """SHA-256 (16 hex digits) of the sorted ``name:shape`` list: the architecture as the weights see it."""
    blob = "\n".join(f"{k}:{tuple(sd[k].shape)}" for k in sorted(sd)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_sha256(sd: StateDict) -> str:
    """SHA-256 (16 hex digits) over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def config_differences(left: Mapping[str, Any], right: Mapping[str, Any]) -> list[str]:
    """Sorted config fields (paths and library versions ignored) whose values differ between two configs."""
    keys = (set(left) | set(right)) - _VOLATILE_CONFIG_KEYS

    def enc(config: Mapping[str, Any], k: str) -> str:
        return json.dumps(config.get(k), sort_keys=True, default=str)

    return sorted(k for k in keys if enc(left, k) != enc(right, k))


def is_perflow_scheduler_config(config: Any) -> bool:
    """Whether a scheduler config dict configures a ``PeRFlowScheduler``.

    True when its ``_class_name`` names PeRFlow, or, since ``dict(scheduler.config)`` carries
    no class name, when its keys are PeRFlow's own: a PeRFlow ``prediction_type``
    (``diff_eps``, ``ddim_eps``, ``velocity``) together with ``num_time_windows`` or
    ``window_boundaries``.
    """
    from perflow.windows import PREDICTION_TYPES

    if not isinstance(config, Mapping):
        return False
    if "PeRFlow" in str(config.get("_class_name") or ""):
        return True
    has_windows = config.get("num_time_windows") is not None or config.get("window_boundaries") is not None
    return config.get("prediction_type") in PREDICTION_TYPES and has_windows


# ----------------------------------------------------------------------------- files

REEXPORT_HINT = "the file is truncated or not a safetensors file: re-download or re-export it"


class WeightsFileError(ValueError):
    """A weights file that cannot be read (empty, truncated, not safetensors); the message names it."""


class OutputError(OSError):
    """An output that cannot be written (disk full, read-only, below a file); one line naming the path and the fix."""

    def __init__(self, path: str | os.PathLike, code: int | None, reason: str):
        self.message = f"cannot write {str(path)!r}: {reason}"
        super().__init__(code, self.message, str(path))

    def __str__(self) -> str:
        return self.message


_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk (nothing was replaced)",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere (nothing was replaced)",
    errno.EROFS: "the file system is read-only; choose a writable output location",
    errno.EACCES: "permission denied; choose a writable output location",
    errno.EPERM: "permission denied; choose a writable output location",
    errno.ENOTDIR: "a part of the path is a regular file, not a folder; choose another output location",
    errno.EISDIR: "it is a folder; give a file path",
}


def _error_code(err: BaseException) -> int | None:
    """The errno of an OSError, of a ``shutil.Error`` (first copy failure) or of a safetensors I/O error."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = re.search(r"\[Errno (\d+)\]|os error (\d+)", str(err))
    return int(match.group(1) or match.group(2)) if match else None


def output_error(path: str | os.PathLike, err: BaseException) -> OutputError:
    """One-line :class:`OutputError` for a failed write of ``path``."""
    code = _error_code(err)
    reason = _FIXES.get(code) or (os.strerror(code) if code else str(err).splitlines()[0] if str(err) else type(err).__name__)
    return OutputError(path, code, reason)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure while writing ``path`` (OSError, ``shutil.Error``, safetensors' I/O error) into an :class:`OutputError`."""
    from safetensors import SafetensorError

    try:
        yield
    except OutputError:
        raise
    except (OSError, SafetensorError) as err:
        if isinstance(err, SafetensorError) and _error_code(err) is None:
            raise
        raise output_error(path, err) from err


def check_output_path(path: str | os.PathLike, folder: bool = False) -> Path:
    """Fail now, before any long work, if ``path`` cannot be written.

    The nearest existing folder above ``path`` must be a folder (not a regular file on the way)
    where a probe file can be created and removed (not read-only, not full of inodes, permitted).
    ``folder``: ``path`` is an output folder (an existing regular file there is refused; an
    existing folder is probed too).
    """
    path = Path(path)
    if folder and path.is_file():
        raise OutputError(path, errno.ENOTDIR, "it is a regular file; give a folder path")
    if not folder and path.is_dir():
        raise OutputError(path, errno.EISDIR, _FIXES[errno.EISDIR])
    anc = path.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(path, errno.ENOTDIR, f"{str(anc)!r} is a regular file, not a folder; choose another output location")
    for where in (anc, path) if folder and path.is_dir() else (anc,):  # an existing output folder is written into
        try:
            fd, probe = tempfile.mkstemp(prefix=".perflow-write-test-", dir=where)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise output_error(path, err) from err
    return path


def output_mode(folder: bool = False) -> int:
    """Permission bits of a new file (``0o666``) or folder (``0o777``) under the process umask (0644/0755 for umask 022)."""
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of this process's temporary siblings of ``path``: ``.NAME.perflow-PID-``."""
    return f".{Path(path).name}.perflow-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of ``path`` left by killed runs (their process is gone); returns them."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.perflow-(\d+)-")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` (``os.replace``).

    The file gets the permissions a new file would (``0o666`` less the umask); write errors
    become an :class:`OutputError`; the temporary never outlives the call, and those of
    killed runs are removed first. ``suffix``: the temporary's suffix (default ``path``'s).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix or path.suffix, dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            os.chmod(tmp, output_mode())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no file at {str(path)!r}")
    if path.is_dir():
        raise WeightsFileError(f"{str(path)!r} is a folder; expected a .safetensors file")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    from safetensors import SafetensorError

    _check_readable(path)
    try:
        yield
    except SafetensorError as err:
        raise WeightsFileError(f"cannot read {str(path)!r} ({err}); {REEXPORT_HINT}") from None


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({name: shape}, raw metadata)`` of a safetensors file; checks its layout (header and length), reads no values."""
    from safetensors import safe_open

    path = Path(path)
    with _reading(path), safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, raw metadata)`` of a safetensors file; a damaged file is a :class:`WeightsFileError` naming it."""
    from safetensors import safe_open

    path = Path(path)
    with _reading(path), safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a config file; a damaged file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); restore or re-export it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not an object; restore or re-export it")
    return data


def check_weight_files(folder: str | os.PathLike) -> None:
    """Check every ``*.safetensors`` in ``folder`` and its subfolders (one level) before a library loads them."""
    folder = Path(folder)
    for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        safetensors_header(f)
