"""Files: atomic writes, output checks and the readers of weights and configs, with one-line errors.

Every file perflow writes goes through a temporary sibling ``.NAME.perflow-PID-*`` that is
renamed into place once complete (:func:`atomic_path`, :func:`write_text`,
:func:`write_bytes`, :func:`save_safetensors`; :func:`atomic_folder` for a folder), gets the
permissions a new file or folder gets under the process umask (:func:`output_mode`), and is
removed on failure; the temporaries of killed runs are removed by the next write
(:func:`remove_stale_temps`). A failed write is an :class:`OutputError` naming the path and the
fix (disk full, read-only, permission denied, a file on the way), and
:func:`check_output_path` finds those problems before any long work.

Weights are read from safetensors only (:func:`read_safetensors`, :func:`safetensors_header`;
a damaged file is a :class:`WeightsFileError` naming it), configs from JSON
(:func:`read_json`); :func:`read_scheduler_config` is the one reader of a pipeline's
``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:  # imported by the CLI before any work: torch is not needed to check or write files
    import torch

REEXPORT_HINT = "the file is truncated or not a safetensors file: re-download or re-export it"
SCHEDULER_CONFIG = "scheduler_config.json"


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

# ----------------------------------------------------------------------------- output checks and errors


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


# ----------------------------------------------------------------------------- atomic writes


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


def match_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` (recursively) the permissions a plain ``open``/``mkdir`` would (:func:`output_mode`):
    for files written through ``tempfile``, which creates them owner-only."""
    path = Path(path)
    todo = [path]
    while todo:
        p = todo.pop()
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, output_mode(folder=True))
            todo.extend(p.iterdir())
        elif p.exists():
            os.chmod(p, output_mode())
    return path


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


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on the CPU) as a safetensors file atomically (see :func:`atomic_path`)."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".tmp") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` needs ``overwrite`` and is replaced.

    The old ``out`` is first renamed aside (``.OUT.perflow-PID-old``), so ``out`` is never
    missing for longer than between two renames, and is deleted once the new one is in place.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if not overwrite:
            raise ValueError(f"{str(out)!r} exists; choose another output or pass overwrite=True (CLI: --overwrite)")
        old = out.with_name(f"{temp_prefix(out)}old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path`` (:func:`replace_folder`).

    The folder gets the permissions a new folder would (``0o777`` less the umask) once the
    body is done (a ``copytree`` into it copies the source's); write errors become an
    :class:`OutputError`; on failure the temporary is deleted, and those of killed runs are
    removed first.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        with writing(path):
            yield tmp
            os.chmod(tmp, output_mode(folder=True))
            replace_folder(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- readers


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
        if is_pickle_file(path):
            raise WeightsFileError(f"{str(path)!r} is a pickle (torch.save) file, not safetensors; perflow never unpickles "
                                   "weights: convert it to .safetensors (safetensors.torch.save_file after a "
                                   "torch.load(..., weights_only=True))") from None
        raise WeightsFileError(f"cannot read {str(path)!r} ({err}); {REEXPORT_HINT}") from None


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def is_pickle_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a ``torch.save`` zip archive or a raw pickle (protocol 2+); never unpickles."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def require_safetensors(folder: str | os.PathLike, what: str = "the model") -> None:
    """Refuse a model folder whose weights are only pickle files (``*.bin``, ``*.ckpt``...): one line, no unpickling."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickled:
        raise WeightsFileError(f"{what} {str(folder)!r} holds only pickle weights ({', '.join(pickled[:3])}); perflow "
                               "reads safetensors only: re-save it with save_pretrained(..., safe_serialization=True)")


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


def check_weight_files(folder: str | os.PathLike) -> None:
    """Check every ``*.safetensors`` in ``folder`` and its subfolders (one level) before a library loads them."""
    folder = Path(folder)
    for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        safetensors_header(f)


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


def scheduler_config_file(path: str | os.PathLike) -> Path:
    """Where the scheduler config of ``path`` is: ``path`` itself for a file, else ``path/scheduler/scheduler_config.json``."""
    path = Path(path)
    return path if path.is_file() else path / "scheduler" / SCHEDULER_CONFIG


def read_scheduler_config(path: str | os.PathLike, required: bool = False) -> dict[str, Any] | None:
    """The scheduler config of a pipeline, teacher or student folder (its ``scheduler/scheduler_config.json``),
    or of a ``scheduler_config.json`` file given directly.

    ``None`` when there is none, unless ``required``: then a ``FileNotFoundError`` naming the
    file it looked for. A damaged file is a ``ValueError`` naming it (see :func:`read_json`).
    """
    f = scheduler_config_file(path)
    if f.is_file():
        return read_json(f)
    if required:
        raise FileNotFoundError(
            f"no scheduler config at {str(f)!r}; give a pipeline or teacher folder with scheduler/{SCHEDULER_CONFIG}"
        )
    return None
