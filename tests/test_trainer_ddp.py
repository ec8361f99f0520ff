"""Two CPU processes (torchrun, gloo): ranks end identical and match one process on the same global batch.

(`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15; torchrun is
what starts real CPU ranks, and the Trainer then runs DDP through accelerate as on GPUs.)"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddp_worker import run

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ranks_identical_and_match_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    single = run(tmp_path / "single", per_device_batch=8)
    ref = single.model.state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], ref[k], atol=1e-5, rtol=1e-4)
    assert single.bargainer.num_steps == 2
