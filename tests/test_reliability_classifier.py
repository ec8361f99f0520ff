"""train_munba_classifier.py under failure: a real SIGKILL in the middle of the final save, resumed
with ``--resume_from_checkpoint latest`` (bitwise the uninterrupted run), and two real gloo ranks
launched by ``accelerate launch`` (identical ranks, the single-process run's steps).

tiny-resnet on scikit-learn digits (offline), SGD, 4 optimizer steps, a checkpoint every 2.
"""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from reliability_helpers import (CLASSIFIER_SCRIPT, LAUNCHER, ROOT, accelerate_launch_2_cpu,
                                 assert_bitwise, build_once, run_script, script_env)


def cls_args(out, batch=32):
    return ["--model_name_or_path", "tiny-vit", "--forget_loss", "neg_ce", "--dataset", "digits",
            "--forget_classes", "3", "--method", "munba", "--output_dir", out, "--max_steps", 4, "--save_steps", 2,
            "--per_device_train_batch_size", batch, "--learning_rate", 0.05, "--optim", "sgd",
            "--lr_scheduler_type", "constant", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "true", "--seed", 0,
            "--logging_steps", 1, "--eval_batch_size", 512, "--dataloader_drop_last", "true"]


def weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (batch 32), built once per session."""
    folder = build_once(tmp_path_factory, "reliability_cls",
                        lambda d: run_script(CLASSIFIER_SCRIPT, cls_args(d / "reference")))
    return folder / "reference"


def test_crash_mid_final_save_then_resume_is_bitwise_identical(tmp_path, reference):
    """A SIGKILL half-way through the final weights file leaves nothing loadable; resuming the
    finished run (checkpoint-4 = max_steps) only restores and saves: the Trainer alone would run
    one more forward/backward/step (constant lr here) and end with other weights.
    (A SIGKILL mid-training: tests/test_classifier_resume_sigkill.py.)"""
    from transformers import AutoModelForImageClassification

    out = tmp_path / "killed"
    args = cls_args(out)
    ckpts = out / "checkpoints"
    # 1. trains steps 1-4, writes checkpoint-4, then crashes half-way through the final weights
    resume = args + ["--resume_from_checkpoint", "latest"]
    proc = subprocess.run([sys.executable, str(LAUNCHER), str(CLASSIFIER_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env=script_env(RELIABILITY_CRASH_IN_FINAL_SAVE=1))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (ckpts / "checkpoint-4").is_dir() and list(out.glob(".staging-*/model.safetensors"))
    with pytest.raises(Exception):  # nothing loadable was left behind
        AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)
    # 2. resumed from checkpoint-4: only the evaluation and the final save are left
    run_script(CLASSIFIER_SCRIPT, resume)
    assert_bitwise(weights(reference), weights(out))
    assert not list(out.glob(".staging-*")), "stale half-written staging left"
    metrics = json.loads((out / "unlearning_metrics.json").read_text())["metrics"]
    ref_metrics = json.loads((reference / "unlearning_metrics.json").read_text())["metrics"]
    for key in ("acc_forget", "acc_retain", "acc_test"):
        assert metrics[key] == ref_metrics[key], key
    AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)


def test_two_gloo_ranks_match_each_other_and_the_single_process_run(tmp_path, reference):
    """accelerate launch, 2 CPU ranks x batch 16 against 1 process x batch 32.

    tiny-vit (LayerNorm: BatchNorm normalises each rank's batch on its own, a different forward
    pass) and the negated-CE forget loss (random labels are drawn per rank).
    """
    out, dump = tmp_path / "ddp", tmp_path / "ranks"
    accelerate_launch_2_cpu(CLASSIFIER_SCRIPT, cls_args(out, batch=16), dump)
    r0, r1 = (load_file(str(dump / f"rank{i}.safetensors")) for i in (0, 1))
    assert_bitwise(r0, r1)
    single, ddp = weights(reference), weights(out)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_vit_resume_restores_every_weight(tmp_path):
    """transformers 5 saves ViT under legacy parameter names that only from_pretrained renames:
    the Trainer's own resume would silently keep the fresh encoder weights."""
    from hf_munba.testing import tiny_vit_classifier
    from hf_munba.classification.trainer import MunbaTrainer
    from trainer_helpers import params_vector, targs, tiny_classification_data

    forget, retain = tiny_classification_data()
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)

    def trainer(out):
        return MunbaTrainer(model=tiny_vit_classifier(num_labels=4), args=targs(out, **kw),
                            train_dataset=retain, forget_dataset=forget)

    full = trainer(tmp_path / "a")
    full.train()
    resumed = trainer(tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert torch.equal(params_vector(resumed.model), params_vector(full.model))
    finished = trainer(tmp_path / "a")  # resuming the finished run restores its weights
    finished.train(resume_from_checkpoint="latest")
    assert torch.equal(params_vector(finished.model), params_vector(full.model))
