"""train_munba_sd.py under failure: a real SIGKILL mid-run and mid-final-save, resumed with
``--resume_from_checkpoint latest`` (bitwise the uninterrupted run, full and LoRA), and two real
gloo ranks launched by ``accelerate launch`` (identical ranks, the single-process run's steps).

Tiny pipeline at 16x16, 4 optimizer steps, a checkpoint every 2.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reliability_helpers import (LAUNCHER, ROOT, SD_SCRIPT, accelerate_launch_2_cpu, assert_bitwise,
                                 build_once, kill_after_checkpoint, run_script, script_env)


def _build_assets(root):
    from hf_munba.diffusion.generation import generate_images
    from hf_munba.testing import save_tiny_sd_pipeline, tiny_sd_pipeline

    save_tiny_sd_pipeline(root / "pipe")
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, height=16, width=16, batch_size=8, progress=False)
    generate_images(pipe, ["nudity", "naked", "erotic", "sexual"], root / "forget", **kw)
    generate_images(pipe, ["a person wearing clothes", "a dog", "a car", "a tree"],
                    root / "retain", **kw)
    run_script(SD_SCRIPT, sd_args(root, root / "reference_full"))


@pytest.fixture(scope="module")
def sd_assets(tmp_path_factory):
    """A saved tiny pipeline, D_f (4 nudity prompts), D_r (4 other prompts) and, in
    ``reference_full``, the uninterrupted single-process run (batch 2) other full runs are
    compared with; built once per session."""
    return build_once(tmp_path_factory, "reliability_sd", _build_assets)


def sd_args(root, out, batch=2, lora=False):
    args = ["--pretrained_model_name_or_path", root / "pipe", "--forget_data_dir", root / "forget",
            "--retain_data_dir", root / "retain", "--output_dir", out, "--resolution", 16,
            "--train_batch_size", batch, "--max_train_steps", 4, "--checkpointing_steps", 2,
            "--learning_rate", 1e-3, "--report_to", "none", "--seed", 0, "--eval_batches", 1,
            "--train_params", "full"]
    return args + (["--use_lora", "--rank", 2] if lora else [])


def final_weights(out, lora):
    name = "pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    return load_file(str(Path(out) / name))


def history(out):
    return [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_full(sd_assets):
    return sd_assets / "reference_full"


def test_sigkill_mid_run_and_mid_final_save_then_resume_is_bitwise_identical(sd_assets,
                                                                               reference_full):
    out = sd_assets / "killed_full"
    args = sd_args(sd_assets, out)
    # 1. killed with SIGKILL during step 3, right after checkpoint-2 was written
    kill_after_checkpoint(SD_SCRIPT, args, lambda: (out / "checkpoint-2").is_dir())
    assert not (out / "checkpoint-4").exists() and not (out / "model_index.json").exists()
    # 2. resumed; trains steps 3-4, writes checkpoint-4, then dies half-way through writing the
    #    final UNet: nothing from_pretrained would load is left in output_dir
    resume = args + ["--resume_from_checkpoint", "latest"]
    proc = subprocess.run([sys.executable, str(LAUNCHER), str(SD_SCRIPT), *map(str, resume)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env=script_env(RELIABILITY_CRASH_IN_FINAL_SAVE=1))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    assert (out / "checkpoint-4").is_dir() and not (out / "model_index.json").exists()
    half_written = list(sd_assets.glob(".killed_full.staging-*/*/*.safetensors"))
    assert half_written  # the crash really hit the final save
    from diffusers import DiffusionPipeline

    with pytest.raises(Exception):
        DiffusionPipeline.from_pretrained(str(out))
    # 3. resumed again: from checkpoint-4, only the final save is left to do
    proc = run_script(SD_SCRIPT, resume)
    assert "checkpoint-4" in proc.stderr
    assert_bitwise(final_weights(reference_full, False), final_weights(out, False))
    assert history(out) == history(reference_full)
    assert not list(sd_assets.glob(".killed_full.staging-*")), "stale half-written staging left"
    DiffusionPipeline.from_pretrained(str(out))


def test_lora_sigkill_after_checkpoint_then_resume_is_bitwise_identical(sd_assets):
    ref, out = sd_assets / "reference_lora", sd_assets / "killed_lora"
    run_script(SD_SCRIPT, sd_args(sd_assets, ref, lora=True))
    args = sd_args(sd_assets, out, lora=True)
    kill_after_checkpoint(SD_SCRIPT, args, lambda: (out / "checkpoint-2").is_dir())
    assert not (out / "checkpoint-4").exists()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    run_script(SD_SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    lora = final_weights(out, True)
    assert any("lora" in k for k in lora)
    assert_bitwise(final_weights(ref, True), lora)
    assert history(out) == history(ref)


def test_two_gloo_ranks_match_each_other_and_the_single_process_run(sd_assets, reference_full):
    """accelerate launch, 2 CPU ranks x batch 1 against 1 process x batch 2 (same global batch)."""
    out, dump = sd_assets / "ddp", sd_assets / "ddp_ranks"
    accelerate_launch_2_cpu(SD_SCRIPT, sd_args(sd_assets, out, batch=1), dump)
    r0, r1 = (load_file(str(dump / f"rank{i}.safetensors")) for i in (0, 1))
    assert_bitwise(r0, r1)
    single, ddp = final_weights(reference_full, False), final_weights(out, False)
    base = load_file(str(sd_assets / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((single[k] - base[k]).abs().max() for k in single)
    diff = max((single[k] - ddp[k]).abs().max() for k in single)
    n = sum(v.numel() for v in single.values())
    moved_mean = sum((single[k] - base[k]).abs().sum() for k in single) / n
    diff_mean = sum((single[k] - ddp[k]).abs().sum() for k in single) / n
    # Equal up to float round-off (the reduction order differs). Adam divides by sqrt(v), so on
    # the few entries whose gradient is near zero that round-off can grow to a fraction of the
    # step (seen: max diff 0.17 x max move); a different global batch or noise moves every
    # entry differently (diff ~ 2 x moved). So: the typical entry must agree closely, and no
    # entry may differ by as much as the largest move.
    assert moved > 2e-3 and diff < moved / 2, (float(diff), float(moved))
    assert diff_mean < moved_mean / 20, (float(diff_mean), float(moved_mean))
    for a, b in zip(history(reference_full), history(out)):
        assert ("munba/cos" in a) == ("munba/cos" in b)  # none at step 1: zero distilled gradient
        for key in ("loss/retain", "loss/forget", "munba/cos", "munba/weight_retain",
                    "munba/weight_forget"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)
