#!/usr/bin/env python
"""Class forgetting on a real, self-trained SD-structured model: forget one handwritten digit.

    python eval/digits_sd_experiment.py --output_dir runs/digits_forget3

1. builds (or reuses from the cache) the digits pipeline + classifier (hf_munba.digits);
2. writes D_f (real images of the forgotten digit) and D_r (the other digits) as imagefolders;
3. per method (munba, weighted, ga, retain) x variant (full cross-attention, LoRA) x seed, runs
   ``training/train_munba_sd.py`` (the forgotten digit's prompt remapped to the next digit, as the
   paper does with Imagenette classes), then ``eval/evaluate_generation.py`` (generate every digit
   prompt, classify the images);
4. writes results.md / results.json (forgetting and retained accuracy, mean +- std over seeds,
   before and after) and grid.png.

Runs go ``--num_workers`` at a time, each single-threaded: on a small CPU that beats one job
with several threads (the tiny models are too small to split well across threads).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_munba.digits_unlearning import METHODS  # noqa: E402

VARIANTS = ("full", "lora")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--cache_dir", default=None,
                   help="cache of the built digits models (default ~/.cache/hf_munba/digits)")
    p.add_argument("--models_dir", default=None,
                   help="use this finished build (training/build_digits_sd.py --output_dir) "
                        "instead of the cached default recipe")
    p.add_argument("--build_seed", type=int, default=0)
    p.add_argument("--build_unet_steps", type=int, default=None,
                   help="override the build recipe's UNet steps (quick trials only)")
    p.add_argument("--forget_digit", type=int, default=3)
    p.add_argument("--remap_digit", type=int, default=None, help="default: the next digit")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_params", default="xattn",
                   help="UNet subset trained (full variant) / carrying LoRA (lora variant); "
                        "xattn = the paper's class-wise setting")
    p.add_argument("--max_train_steps", type=int, default=100)
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="full variant")
    p.add_argument("--lora_learning_rate", type=float, default=1e-2, help="lora variant")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--guidance_scale", type=float, default=2.0,
                   help="moderate on purpose: at >= 3 a class's samples are nearly identical")
    p.add_argument("--num_images_per_prompt", type=int, default=20)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--grid_images", type=int, default=6,
                   help="images of the forgotten digit per grid row (plus one per other digit)")
    args = p.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "num_images_per_prompt",
                 "num_inference_steps", "num_workers", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.forget_digit <= 9:
        p.error("--forget_digit must be a digit 0..9")
    remap = (args.forget_digit + 1) % 10 if args.remap_digit is None else args.remap_digit
    if not 0 <= remap <= 9 or remap == args.forget_digit:
        p.error("--remap_digit must be a digit 0..9 other than --forget_digit")
    args.remap_digit = remap
    if args.models_dir is not None and not (Path(args.models_dir) / "build_info.json").is_file():
        p.error(f"--models_dir {args.models_dir} is not a finished digits build (no build_info.json)")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite_output_dir)):
        p.error(f"--output_dir {out} is not empty; pass --overwrite_output_dir to start over")
    return args


def run(cmd, log_path):
    """A subprocess, single-threaded, its output in ``log_path``; raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, *map(str, cmd)], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed (see {log_path}):\n{tail}")
    return time.perf_counter() - t


def evaluate(args, name, model_dir, lora_dir, prompts_csv, classifier, out_dir):
    cmd = [ROOT / "eval/evaluate_generation.py", "--model", f"{name}={model_dir}",
           "--prompts", prompts_csv, "--metrics", "classification", "--classifier", classifier,
           "--forget_classes", str(args.forget_digit),
           "--num_images_per_prompt", args.num_images_per_prompt,
           "--guidance_scale", args.guidance_scale, "--num_inference_steps", args.num_inference_steps,
           "--batch_size", 100, "--grid_images", 0, "--output_dir", out_dir]
    if lora_dir is not None:
        cmd += ["--lora", f"{name}={lora_dir}"]
    secs = run(cmd, Path(out_dir).parent / f"{Path(out_dir).name}.log")
    res = json.loads((Path(out_dir) / "results.json").read_text())
    table = res["metrics"]["classification"]["table"][name]
    return {"forget_accuracy": table["forget_accuracy"], "retain_accuracy": table["retain_accuracy"],
            "per_class": table["per_class"], "eval_seconds": secs,
            "images_dir": str(Path(out_dir) / "images" / name)}


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    from hf_munba.digits import DigitsArtifacts, DigitsRecipe, load_or_build_digits_models
    from hf_munba.digits_unlearning import (summarize_runs, summary_markdown, train_script_args,
                                            write_digit_imagefolders, write_digit_prompt_csv)
    from hf_munba.evaluation.report import atomic_write_text, image_grid

    out = Path(args.output_dir)
    if out.exists() and args.overwrite_output_dir:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.models_dir is not None:
        arts = DigitsArtifacts.from_dir(args.models_dir)
    else:
        recipe = DigitsRecipe(seed=args.build_seed)
        if args.build_unet_steps is not None:
            import dataclasses

            recipe = dataclasses.replace(recipe, unet_steps=args.build_unet_steps)
        arts = load_or_build_digits_models(recipe, cache_dir=args.cache_dir)
    t_build = time.perf_counter() - t0
    data = write_digit_imagefolders(out / "data", args.forget_digit)
    prompts = write_digit_prompt_csv(out / "data" / "prompts.csv")
    (out / "runs").mkdir(exist_ok=True)

    def base_job():
        return {"name": "original", **evaluate(args, "original", arts.pipeline_path, None, prompts,
                                                arts.classifier_path, out / "runs" / "original_eval")}

    def train_job(method, variant, seed):
        name = f"{method}-{variant}-s{seed}"
        run_dir = out / "runs" / name
        lora = variant == "lora"
        targs = train_script_args(
            method=method, pretrained=arts.pipeline_path, data=data, output_dir=str(run_dir),
            forget_digit=args.forget_digit, remap_digit=args.remap_digit, seed=seed,
            use_lora=lora, train_params=args.train_params, max_train_steps=args.max_train_steps,
            train_batch_size=args.train_batch_size,
            learning_rate=args.lora_learning_rate if lora else args.learning_rate, rank=args.rank)
        secs = run([ROOT / "training/train_munba_sd.py", *targs], out / "runs" / f"{name}.train.log")
        model_dir, lora_dir = (arts.pipeline_path, run_dir) if lora else (run_dir, None)
        res = evaluate(args, name, model_dir, lora_dir, prompts, arts.classifier_path,
                       out / "runs" / f"{name}_eval")
        metrics = json.loads((run_dir / "training_metrics.json").read_text())
        return {"name": name, "method": method, "variant": variant, "seed": seed,
                "seconds": secs, "training_metrics": metrics, **res}

    jobs = [(base_job, ())] + [(train_job, (m, v, s)) for v in args.variants
                               for m in args.methods for s in args.seeds]
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.num_workers) as pool:
        futures = [pool.submit(fn, *a) for fn, a in jobs]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['name']}: forget acc "
                  f"{r['forget_accuracy']:.1f}%, retained acc {r['retain_accuracy']:.1f}%", flush=True)
    t_runs = time.perf_counter() - t1
    base, runs = results[0], results[1:]
    rows = summarize_runs(runs, base)

    # grid: one row per model (seed of the first run), forgotten digit first, then one image of
    # every other digit
    def grid_files(images_dir):
        man = [json.loads(l) for l in (Path(images_dir) / "metadata.jsonl").read_text().splitlines()
               if l.strip()]
        fg = [m for m in man if m["label"] == str(args.forget_digit)][:args.grid_images]
        others = [next(m for m in man if m["label"] == str(d)) for d in range(10)
                  if d != args.forget_digit]
        return [Path(images_dir) / m["file_name"] for m in fg + others]

    first_seed = args.seeds[0]
    grid_rows = {"original": grid_files(base["images_dir"])}
    for r in runs:
        if r["seed"] == first_seed:
            grid_rows[f"{r['method']} {r['variant']}"] = grid_files(r["images_dir"])
    image_grid(grid_rows, out / "grid.png", cell=48, label_width=110)

    total = time.perf_counter() - t0
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite_output_dir",)}
    summary = {"settings": settings, "build": {"root": arts.root, "metrics": arts.metrics},
               "original": base, "runs": runs, "summary": rows,
               "seconds": {"build_or_cache": t_build, "runs": t_runs, "total": total}}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    from hf_munba.digits import digit_prompt

    md = [f"# Forgetting the digit {args.forget_digit} (prompt \"{digit_prompt(args.forget_digit)}\" "
          f"remapped to \"{digit_prompt(args.remap_digit)}\")", "",
          f"Forget acc: share of images generated from the forgotten prompt that the classifier "
          f"calls {args.forget_digit}; retained acc: the same for the other nine prompts (pooled). "
          f"{args.num_images_per_prompt} images per prompt, guidance {args.guidance_scale}, "
          f"DDIM {args.num_inference_steps} steps; {args.max_train_steps} steps of batch "
          f"{args.train_batch_size} on `{args.train_params}` (full: lr {args.learning_rate}, "
          f"LoRA rank {args.rank}: lr {args.lora_learning_rate}); mean ± std over seeds "
          f"{args.seeds}.", "", summary_markdown(rows, base),
          f"Wall time: {total / 60:.1f} min (build/cache {t_build / 60:.1f} min, runs "
          f"{t_runs / 60:.1f} min, {args.num_workers} workers).", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
