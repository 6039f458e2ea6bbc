"""perflow.io, the one home of file helpers, and the layout of the delta package (issue 9)."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from perflow.io import (
    OutputError,
    atomic_folder,
    read_safetensors,
    read_scheduler_config,
    save_safetensors,
    write_bytes,
    write_text,
)

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "perflow"
DELTA_ORDER = ["keys", "metadata", "lora", "io", "merge", "formats"]  # each imports only from those before it


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ----------------------------------------------------------------------------- atomic writes


def test_file_writes_are_complete_with_umask_modes_and_leave_no_temporary(tmp_path, umask_022):
    write_text(tmp_path / "a.md", "text\n")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()}  # not contiguous
    save_safetensors(tensors, tmp_path / "c.safetensors", {"k": "v"})
    assert (tmp_path / "a.md").read_text() == "text\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    back, meta = read_safetensors(tmp_path / "c.safetensors")
    assert torch.equal(back["w"], tensors["w"]) and meta == {"k": "v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.bin", "c.safetensors"]
    assert {mode(p) for p in tmp_path.iterdir()} == {0o644}


def test_atomic_folder_replaces_only_when_complete_and_asked(tmp_path, umask_022):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "f.txt").write_text("one")
        assert not out.exists()  # nothing at the output until the body is done
    assert (out / "f.txt").read_text() == "one" and mode(out) == 0o755

    with pytest.raises(ValueError, match="overwrite"):
        with atomic_folder(out) as tmp:
            (tmp / "f.txt").write_text("two")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "f.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "f.txt").read_text() == "one"  # the old output survives both failures

    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "g.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["g.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_atomic_folder_below_a_regular_file_is_an_output_error(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputError, match="a-file"):
        with atomic_folder(tmp_path / "a-file" / "out"):
            pass


# ----------------------------------------------------------------------------- the scheduler-config reader


def test_read_scheduler_config_from_a_folder_or_a_file(tmp_path):
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    f = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps(config))
    assert read_scheduler_config(tmp_path / "pipe") == config
    assert read_scheduler_config(f) == config
    assert read_scheduler_config(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "scheduler" / "scheduler_config.json")):
        read_scheduler_config(tmp_path, required=True)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json.*not valid JSON"):
        read_scheduler_config(tmp_path / "pipe")


# ----------------------------------------------------------------------------- layout


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, names)`` of every import in a file, inside functions too."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
    return out


def test_delta_package_imports_one_way_and_takes_no_private_names():
    for i, name in enumerate(DELTA_ORDER):
        later = {f"perflow.delta.{m}" for m in DELTA_ORDER[i:]} | {"perflow.delta"}
        for line, target, names in _imports(PACKAGE / "delta" / f"{name}.py"):
            subs = {f"{target}.{n}" for n in names}
            assert target not in later and not subs & later, f"delta/{name}.py:{line} imports {target} {names}"
    for path in [PACKAGE / "io.py", *sorted((PACKAGE / "delta").glob("*.py"))]:
        for line, target, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            assert not (target.startswith("perflow") and private), f"{path.name}:{line} takes {target}.{private}"


def test_old_delta_modules_are_gone_and_the_public_api_stays():
    import perflow
    import perflow.delta

    for old in ("state_dicts", "checkpoint_formats", "lora"):
        assert not (PACKAGE / f"{old}.py").exists()
    assert not (PACKAGE / "delta.py").exists()
    for name in ("extract_delta", "merge_delta", "load_delta", "save_delta", "delta_to_lora", "load_pipeline"):
        assert getattr(perflow, name) is getattr(perflow.delta, name)
    assert sorted(perflow.delta.__all__) == perflow.delta.__all__
    assert all(hasattr(perflow.delta, n) for n in perflow.delta.__all__)
