"""The output folder of a run: checked up front, locked, owned by one run, left clean.

- :func:`check_output_dir` refuses a path below a regular file or on a read-only location before
  anything expensive happens.
- :class:`OutputLock`: ``fcntl.flock`` on ``<output_dir>/.perflow.lock``; a second run into the
  same folder is refused with the holder's pid. The kernel drops the lock when its process dies,
  so a lock file left by a killed run is simply taken over.
- Every run has an id (:func:`new_run_id`), recorded in its checkpoints and summary; a new run
  refuses a folder holding another run's checkpoints or outputs unless it resumes or overwrites.
- :func:`clean_leftovers`: temporary files and folders of a killed run (``.tmp-*``, the
  ``.tmpXXXXXX`` of safetensors, ``.<output>.XXXXXXXX`` of older versions) are removed on the next start.
- Files are written with the permissions the umask gives (:func:`perflow.io.match_umask`), not the owner-only
  ones of ``tempfile`` and safetensors' temporary files.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

try:
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover
    SafetensorError = OSError

WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, SafetensorError)
"""What a failed write raises (a full disk, an I/O error): ``OSError``, or safetensors' own error."""
LOCK_FILE = ".perflow.lock"
SUMMARY_FILE = "perflow_training.json"
FINAL_OUTPUTS = ("unet", "transformer", SUMMARY_FILE, "delta.safetensors")
"""Entries whose presence means a run has finished (or exported) here."""
RUN_FILES = FINAL_OUTPUTS + (
    "checkpoints", "logs", "validation", "scheduler", "label_encoder", "model_index.json", "vae",
    "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
)
"""Everything a run writes into its output folder (``output.overwrite`` deletes these, nothing else)."""
_OUTPUT_NAMES = "|".join(re.escape(n) for n in RUN_FILES if "." not in n) + "|model_index"
LEFTOVER = re.compile(
    r"^\.tmp-.+$"                                    # perflow's own temporaries
    r"|^\.tmp[A-Za-z0-9]{6}$"                        # safetensors' save_file temporaries
    r"|^\..+\.[A-Za-z0-9_]{8}\.(?:tmp|png)$"         # mkstemp(prefix=".name.", suffix=".tmp"/".png")
    rf"|^\.(?:{_OUTPUT_NAMES})\.(?:old\.)?[A-Za-z0-9_]{{8}}$"  # replace_dir temporaries of older versions
)


class OutputDirError(ValueError):
    """The output folder cannot be used (not writable, in use, or holding another run)."""


def new_run_id() -> str:
    """A fresh run id: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def check_output_dir(output_dir: str | Path) -> Path:
    """Create ``output_dir`` (and its parents) or raise :class:`OutputDirError` in one line naming why."""
    path = Path(output_dir)
    existing = next(p for p in [path.absolute(), *path.absolute().parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        what = "is" if existing == path.absolute() else f"lies below {existing}, which is"
        raise OutputDirError(f"output.output_dir {str(path)!r} {what} a regular file, not a folder; choose another --output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(
            f"output.output_dir {str(path)!r} cannot be created ({err.strerror}); choose a writable --output_dir"
        ) from None
    return path


class OutputLock:
    """An exclusive ``flock`` on ``<output_dir>/.perflow.lock`` for the life of a run (a no-op where
    ``fcntl`` is missing). The file holds the holder's pid and host, for the refusal message."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputDirError(
                f"output.output_dir {str(self.path.parent)!r} is not writable ({err.strerror}); choose a writable --output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(
                f"output.output_dir {str(self.path.parent)!r} is in use by another perflow run ({holder}); "
                "wait for it to finish or choose another --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_leftovers(output_dir: str | Path) -> list[str]:
    """Remove temporaries a killed run left in ``output_dir``, ``checkpoints/`` and ``validation/``; returns their names."""
    root = Path(output_dir)
    removed = []
    for folder in (root, root / "checkpoints", root / "validation"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if LEFTOVER.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(root)) + ("/" if p.is_dir() else ""))
    return removed


def clear_run_files(output_dir: str | Path) -> list[str]:
    """Delete what a run writes (:data:`RUN_FILES`) from ``output_dir`` (``output.overwrite``); returns the names."""
    root = Path(output_dir)
    gone = []
    for name in RUN_FILES:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        gone.append(name)
    return gone


__all__ = [
    "OutputDirError", "OutputLock", "check_output_dir", "clean_leftovers", "clear_run_files",
    "new_run_id", "LEFTOVER", "RUN_FILES", "FINAL_OUTPUTS", "SUMMARY_FILE", "WRITE_ERRORS",
]
