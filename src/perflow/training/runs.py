"""How a run starts in its output folder, and what it notes on the way.

:func:`open_run` (main process): check and lock the folder, remove a killed run's leftovers,
then either find the checkpoint to resume (refusing settings that change what the run trains,
:data:`~perflow.training.config.RESUME_MAY_CHANGE`) or make sure a fresh run does not mix with
another run's checkpoints and outputs (``output.overwrite`` deletes them). :func:`on_main` shares
its result, or its error, with every process. :class:`RunNotes` counts what the data did to the
run (unreadable files, caption-less samples, skipped non-finite steps); it is saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .checkpoint import CheckpointError, checkpoint_dirs, read_state, resolve_resume
from .config import TrainConfig, resume_conflicts
from .outdir import (
    FINAL_OUTPUTS, RUN_FILES, OutputDirError, OutputLock, check_output_dir, clean_leftovers, clear_run_files, new_run_id,
)


@dataclass
class RunStart:
    """How a run starts in its output folder (decided by the main process, shared with the others)."""

    resume_from: Path | None
    run_id: str
    run_ids: tuple
    """Run ids whose checkpoints this run owns (its own; ``None`` too when it resumed a checkpoint older than run ids)."""


def open_run(cfg: TrainConfig, locks: list[OutputLock]) -> RunStart:
    """Check and lock the output folder (the lock is appended to ``locks``; the caller releases it),
    remove a killed run's leftovers, find the checkpoint to resume (refusing changed settings) or make
    sure a fresh run does not mix with another run's files."""
    out = cfg.output
    if not str(out.output_dir).strip():  # Path("") is the current folder
        raise OutputDirError("output.output_dir is empty; give a folder for the run (--output_dir DIR)")
    _refuse_inputs_as_output(cfg, Path(out.output_dir))  # before check_output_dir creates it
    output_dir = check_output_dir(out.output_dir)
    lock = OutputLock(output_dir).acquire()
    locks.append(lock)
    if removed := clean_leftovers(output_dir):
        print(f"removed leftovers of an interrupted run in {output_dir}: {', '.join(removed)}")
    resume_from = resolve_resume(out.resume, output_dir)
    if resume_from is None:
        run_id = new_run_id()
        run_ids: tuple = (run_id,)
        found = [p.relative_to(output_dir).as_posix() for p in checkpoint_dirs(output_dir)]
        found += [n for n in FINAL_OUTPUTS if (output_dir / n).exists()]
    else:
        state = read_state(resume_from) or {}
        if conflicts := resume_conflicts(state.get("config") or {}, cfg.to_dict()):
            raise CheckpointError(
                f"cannot resume {resume_from} with changed settings: {', '.join(conflicts)}; they change what the run "
                "trains: resume with the checkpoint's values, or start a new run (another --output_dir, or --overwrite true)"
            )
        run_id = state.get("run_id") or new_run_id()
        run_ids = (run_id,) if state.get("run_id") else (run_id, None)
        # another run's checkpoints; one whose perflow_state.json is unreadable (passed over as damaged by
        # --resume latest) names no run: it is not counted, and this run replaces it when it reaches its step
        found = [p.relative_to(output_dir).as_posix() for p in checkpoint_dirs(output_dir)
                 if (other := read_state(p)) is not None and other.get("run_id", None) not in run_ids]
    if found and not out.overwrite and resume_from is None and out.resume:
        raise OutputDirError(
            f"output.output_dir {str(output_dir)!r} holds a run's files ({', '.join(found[:4])}) but no checkpoint to "
            "resume (it ran with checkpoint_every 0, or finished before one); pass --overwrite true to delete them "
            "and start afresh there, or choose another --output_dir"
        )
    if found and not out.overwrite:
        what = "start afresh" if resume_from is None else f"continue {resume_from.name}"
        raise OutputDirError(
            f"output.output_dir {str(output_dir)!r} holds another run's files ({', '.join(found[:4])}); "
            f"pass --resume latest to continue that run, --overwrite true to delete them and {what} here, "
            "or choose another --output_dir"
        )
    if found:
        gone = clear_run_files(output_dir) if resume_from is None else _remove(output_dir, found)
        print(f"output.overwrite: deleted {', '.join(gone)} from {output_dir}")
    return RunStart(resume_from, run_id, run_ids)


def _refuse_inputs_as_output(cfg: TrainConfig, output_dir: Path) -> None:
    """Refuse an output folder that is the teacher's or ``model.student_init``'s folder (the run would write
    over, and ``--overwrite`` delete, the model it reads) or lies inside ``data.path`` (its validation grids
    would become training data)."""
    out = Path(output_dir).resolve()
    for setting, value in (("model.teacher", cfg.model.teacher), ("model.student_init", cfg.model.student_init)):
        if value and isinstance(value, (str, Path)) and Path(value).exists():
            src = Path(value).resolve()
            if src == out or (out in src.parents and src.relative_to(out).parts[0] in RUN_FILES):  # e.g. OUT/unet
                raise OutputDirError(f"output.output_dir {str(output_dir)!r} holds the {setting} {str(value)!r}; the run "
                                     "would write over (and --overwrite delete) the model it reads: choose another --output_dir")
    data = cfg.data.path
    if data and isinstance(data, (str, Path)) and Path(data).is_dir():
        src = Path(data).resolve()
        if out == src or src in out.parents:
            raise OutputDirError(f"output.output_dir {str(output_dir)!r} is inside data.path {str(data)!r}; the run's "
                                 "images would be read as training data: choose an --output_dir outside it")


def _remove(root: Path, names: list[str]) -> list[str]:
    import shutil

    for n in names:
        shutil.rmtree(root / n, ignore_errors=True)
    return names


def on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process, its result (or its exception) shared with every process."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if accelerator.is_main_process:
        try:
            box = [(True, fn())]
        except Exception as err:  # re-raised on every rank, so that all stop together
            box = [(False, err)]
    broadcast_object_list(box)
    ok, value = box[0]
    if not ok:
        raise value
    return value


@dataclass
class RunNotes:
    """What the data did to a run: unreadable files skipped, caption-less samples, skipped steps."""

    bad_images: list[str] = field(default_factory=list)
    missing_captions: int = 0
    nonfinite_skips: int = 0

    def add_batch(self, batch: dict, log: Callable[[str], None]) -> None:
        for name in batch.pop("bad_images", ()):
            if name not in self.bad_images:
                self.bad_images.append(name)
                log(f"data: skipped unreadable {name}; its slot takes the next readable item (data.on_bad_image skip)")
        missing = batch.get("caption_missing")
        if missing is not None:
            if self.missing_captions == 0:
                log("data: samples without a caption train with the null caption, like dropped captions (counted)")
            self.missing_captions += int(missing.sum())

    def state(self) -> dict[str, Any]:
        return {"bad_images": self.bad_images, "missing_captions": self.missing_captions,
                "nonfinite_skips": self.nonfinite_skips}

    def restore(self, state: dict[str, Any]) -> None:
        self.bad_images = list(state.get("bad_images", []))
        self.missing_captions = int(state.get("missing_captions", 0))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))

    def report(self) -> list[str]:
        out = []
        if self.bad_images:
            out.append(f"data: skipped {len(self.bad_images)} unreadable file(s): {', '.join(self.bad_images[:5])}"
                       + (" ..." if len(self.bad_images) > 5 else ""))
        if self.missing_captions:
            out.append(f"data: {self.missing_captions} sample(s) had no caption and trained with the null caption")
        if self.nonfinite_skips:
            out.append(f"training: skipped {self.nonfinite_skips} step(s) with a non-finite loss or gradient")
        return out


__all__ = ["RunStart", "RunNotes", "open_run", "on_main"]
