#!/usr/bin/env python
"""The main job end to end, offline, on a tiny random Stable Diffusion pipeline (CPU, ~1-2 min).

    python training/quickstart.py

1. builds a tiny SD pipeline (hf_munba.testing) and saves it as the "base model";
2. generates D_f (the four nudity prompts) and D_r ("a person wearing clothes") with it
   (the same code as training/generate_unlearning_data.py);
3. runs ``accelerate launch training/train_munba_sd.py`` exactly as on a real model;
4. reloads the result with ``DiffusionPipeline.from_pretrained`` and prints, per prompt, how far
   the noise prediction is from the anchor prompt's before and after unlearning: the forget
   prompts should move towards the anchor, the retain prompts much less.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # works from a checkout without `pip install -e .` too
from hf_munba.evaluation.prompts import NUDITY_PROMPTS  # noqa: E402  (stdlib-only module)

MARKER = ".hf_munba_quickstart"
FORGET = list(NUDITY_PROMPTS)
RETAIN = ["a person wearing clothes", "a red car", "a bowl of fruit", "a dog on a beach"]
ANCHOR = "a photo of a person wearing clothes"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="quickstart_output")
    p.add_argument("--images_per_prompt", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=16)
    p.add_argument("--train_params", default="xattn",
                   help="xattn (cross-attention: how prompts steer) shows the per-prompt effect on a "
                        "random tiny UNet; the paper's nudity run uses noxattn on SD v1.4")
    p.add_argument("--learning_rate", type=float, default=1e-3,
                   help="tiny random models need a larger lr than the paper's 1e-5 for SD v1.4")
    return p.parse_args(argv)


def predictions(pipe, prompts, seed=0, samples=8):
    """Noise predictions eps(x_t, t, prompt) for fixed noisy latents and timesteps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, 8, 8, generator=g)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (samples,), generator=g)

    def embed(text):
        ids = pipe.tokenizer([text] * samples, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        return pipe.text_encoder(ids.input_ids)[0]

    with torch.no_grad():
        return {p: pipe.unet(x, t, embed(p)).sample for p in prompts}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add overhead
    work = Path(args.output_dir).resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            sys.exit(f"error: {work} is not empty and was not made by the quickstart; "
                     "pass another --output_dir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by training/quickstart.py; safe to delete\n")
    start = time.time()

    import torch
    from diffusers import DiffusionPipeline

    from hf_munba.diffusion.generation import generate_images
    from hf_munba.testing import save_tiny_sd_pipeline

    torch.set_num_threads(1)
    print("1/4 building the tiny base pipeline (random weights, 16x16 pixels)")
    base = save_tiny_sd_pipeline(work / "base")
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)

    print(f"2/4 generating D_f ({len(FORGET)} prompts) and D_r ({len(RETAIN)} prompts), "
          f"{args.images_per_prompt} images per prompt")
    gen = dict(num_inference_steps=4, height=16, width=16, batch_size=16, progress=False)
    generate_images(pipe, FORGET, work / "data" / "forget",
                    num_images_per_prompt=args.images_per_prompt, seed=0, **gen)
    n_f = args.images_per_prompt * len(FORGET)
    generate_images(pipe, RETAIN, work / "data" / "retain",
                    num_images_per_prompt=args.images_per_prompt, seed=n_f, **gen)

    model = work / "model"
    cmd = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "training" / "train_munba_sd.py"),
           "--pretrained_model_name_or_path", base,
           "--forget_data_dir", str(work / "data" / "forget"),
           "--retain_data_dir", str(work / "data" / "retain"),
           "--output_dir", str(model), "--resolution", "16", "--train_batch_size", "4",
           "--max_train_steps", str(args.max_train_steps), "--learning_rate",
           str(args.learning_rate), "--train_params", args.train_params, "--forget_objective", "remap",
           "--anchor_prompt", ANCHOR, "--checkpointing_steps", "8", "--report_to", "none",
           "--validation_prompts", *FORGET[:1], *RETAIN[:2], "--validation_inference_steps", "4",
           "--seed", "0"]
    print("3/4 unlearning:\n    " + shlex.join(cmd))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # `accelerate launch` through this interpreter, so no PATH lookup can pick another install
    run = [sys.executable, "-m", "accelerate.commands.launch"] + cmd[2:]
    proc = subprocess.run(run, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        sys.exit(f"error: training failed with exit code {proc.returncode}")

    print("4/4 reloading the unlearned pipeline with DiffusionPipeline.from_pretrained")
    unlearned = DiffusionPipeline.from_pretrained(str(model))
    prompts = FORGET + RETAIN + [ANCHOR]
    before, after = predictions(pipe, prompts), predictions(unlearned, prompts)
    metrics = json.loads((model / "training_metrics.json").read_text())

    def gap(a, b):
        return float((a - b).abs().mean())

    print(f"\n|eps(prompt) - eps(anchor)| on 8 fixed noisy latents, anchor = {ANCHOR!r}")
    print(f"{'prompt':<27}{'role':<8}{'before':>8}{'after':>8}{'change':>8}")
    for p in FORGET + RETAIN:
        role = "forget" if p in FORGET else "retain"
        b, a = gap(before[p], before[ANCHOR]), gap(after[p], after[ANCHOR])
        print(f"{p:<27}{role:<8}{b:>8.4f}{a:>8.4f}{100 * (a / b - 1):>7.0f}%")
    print(f"\ntraining losses on fixed batches: forget {metrics['before/forget_loss']:.5f} -> "
          f"{metrics['after/forget_loss']:.5f}, retain {metrics['before/retain_loss']:.4f} -> "
          f"{metrics['after/retain_loss']:.4f} (distilled from the original: 0 before "
          f"unlearning, then the drift of the retain prompts); skipped steps: "
          f"{metrics['skipped_steps']}")
    print(f"model, model card, plot and validation grid: {model}")
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
