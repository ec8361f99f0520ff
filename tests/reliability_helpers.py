"""Shared pieces of the tests/test_reliability_*.py files: run a training script in a
subprocess, kill it with SIGKILL right after it wrote a checkpoint, launch it on 2 CPU ranks."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD_SCRIPT = ROOT / "training" / "train_munba_sd.py"
CLASSIFIER_SCRIPT = ROOT / "training" / "train_munba_classifier.py"
LAUNCHER = Path(__file__).resolve().parent / "reliability_launcher.py"


def script_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script, args, expect_ok=True, env=None, timeout=300):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, env=env or script_env(), cwd=str(ROOT), timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def kill_after_checkpoint(script, args, checkpoint_ready, slow_backward_s=0.25, timeout=240):
    """Start ``script``, SIGKILL it as soon as ``checkpoint_ready()`` is true; return its log.

    Every backward pass sleeps ``slow_backward_s`` (tests/reliability_launcher.py), so the
    steps after the checkpoint take long enough to be interrupted for real: the kill lands in the
    middle of training, never after the final save.
    """
    log = open(Path(args[args.index("--output_dir") + 1]).parent / "killed_run.log", "w+")
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), str(script), *map(str, args)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env=script_env(RELIABILITY_SLOW_BACKWARD=slow_backward_s))
    deadline = time.monotonic() + timeout
    try:
        while not checkpoint_ready():
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the run ended ({proc.returncode}) before its checkpoint:\n"
                                     f"{log.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint before the timeout")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    return log.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_2_cpu(script, args, dump_dir, timeout=300):
    """``accelerate launch --multi_gpu --num_processes 2`` with ACCELERATE_USE_CPU=true: two
    real gloo ranks on CPU (``--cpu --num_processes 2`` would start only one process). Each rank
    writes its final trainable weights to ``dump_dir/rank<i>.safetensors``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(LAUNCHER), str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                          env=script_env(RELIABILITY_DUMP_WEIGHTS=dump_dir),
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"2-process run failed ({proc.returncode}):\n{proc.stderr[-20000:]}")
    return proc


def build_once(tmp_path_factory, name, build):
    """``build(folder)`` once per test session, even when pytest-xdist runs the tests that need
    it on several workers (they wait on a file lock and reuse the folder); returns the folder."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by this session's workers only
    folder, done = base / name, base / f"{name}.done"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.write_text("ok")
    return folder


def assert_bitwise(a, b):
    """Two state dicts hold the same tensors, bit for bit (and are not empty)."""
    import torch

    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
