"""Two processes (gloo, CPU) train one student: every rank ends with the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    '''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from perflow.builtin.digits import load_digits_dataset
    from perflow.training import train
    from perflow.tiny import tiny_class_teacher

    out = sys.argv[1]
    data = torch.utils.data.Subset(load_digits_dataset("train", 8), list(range(64)))
    result = train(
        "digits", teacher=tiny_class_teacher(), dataset=data, max_steps=3, batch_size=4, num_solver_steps=2,
        learning_rate=1e-3, lr_warmup_steps=0, output_dir=out, checkpoint_every=2, validation_every=0,
        tracker="none", progress=False, save_delta=False, ema_decay=0.0,
    )
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    h = hashlib.sha256()
    for k, v in sorted(result.student.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    teacher = tiny_class_teacher().unet.state_dict()
    changed = any(not torch.equal(teacher[k], v.cpu()) for k, v in result.student.state_dict().items())
    sums = [None] * world
    dist.all_gather_object(sums, h.hexdigest())
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": world, "processes": result.num_processes, "sums": sums, "changed": changed, "losses": result.losses}, f)
    dist.barrier()
    dist.destroy_process_group()  # a gloo group left to the interpreter's exit can abort the process
    '''
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_process_run_keeps_ranks_in_sync(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["world"] == 2 and rep["processes"] == 2 and rep["changed"]
        assert rep["sums"][0] == rep["sums"][1]  # all ranks hold the same weights
    assert reports[0]["losses"] == reports[1]["losses"]  # the logged loss is the mean over ranks
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "generator_0.safetensors").is_file() and (ckpt / "generator_1.safetensors").is_file()
