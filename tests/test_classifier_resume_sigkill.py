"""A classifier run killed with SIGKILL after a checkpoint and resumed ends bitwise identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_munba.classification.trainer import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_munba_classifier.py"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cmd(out, *extra):
    return [sys.executable, str(SCRIPT), "--model_name_or_path", "tiny-resnet", "--dataset", "digits",
            "--forget_classes", "3", "--output_dir", str(out), "--max_steps", "100", "--save_steps", "10",
            "--per_device_train_batch_size", "16", "--learning_rate", "0.05", "--optim", "sgd",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0", *extra]


def _run_in_process(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_munba_classifier", SCRIPT)
    if spec.name not in sys.modules:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    sys.modules[spec.name].main(argv)


def test_sigkill_then_resume_latest_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same kernels, same bits
    _run_in_process(_cmd(tmp_path / "full")[2:])  # the uninterrupted reference, without a 2nd start-up

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and last_complete_checkpoint(str(out / "checkpoints")) is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    ckpt = last_complete_checkpoint(str(out / "checkpoints"))
    assert ckpt is not None and not ckpt.endswith("-100")
    assert not (out / "config.json").exists()  # nothing loadable was published

    res = subprocess.run(_cmd(out, "--resume_from_checkpoint", "latest"), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_partial_checkpoint_is_not_resumed(tmp_path):
    good, bad = tmp_path / "checkpoint-10", tmp_path / "checkpoint-20"
    for d in (good, bad):
        d.mkdir()
        (d / "munba_state.json").write_text("{}")
    (good / "trainer_state.json").write_text("{}")
    (bad / "trainer_state.json").write_text('{"trunc')
    assert last_complete_checkpoint(str(tmp_path)) == str(good)
