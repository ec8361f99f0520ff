#!/usr/bin/env python
"""Class forgetting on a real, self-trained SD-structured model: forget one handwritten digit.

    python eval/digits_sd_experiment.py --output_dir runs/digits_forget3

1. builds (or reuses from the cache) the digits pipeline + classifier (hf_munba.testing.digits);
2. writes D_f (real images of the forgotten digit) and D_r (the other digits) as imagefolders;
3. per method (munba = the recommended configuration, munba-paper, weighted-<lambda> for each
   lambda of the sweep or any other lambda > 0, weighted-ga, retain) x variant (full
   cross-attention, LoRA) x seed, runs ``training/train_munba_sd.py`` (the forgotten digit's
   prompt remapped to the next digit, as the paper does with Imagenette classes) with a
   checkpoint every ``--eval_every`` steps, then evaluates the original model and every
   checkpoint in one process (``hf_munba.testing.digits_unlearning.evaluate_checkpoints``:
   generate every digit prompt, classify);
4. writes results.md / results.json (every curve point; end-of-run forgetting and retained
   accuracy and, beside them, the retained accuracy at the first evaluation with forget accuracy
   <= 5% and the best one among those, mean +- std over seeds; the best lambda named; the
   verdict munba vs the best-lambda weighted sum), curves.png and grid.png.

Runs go ``--num_workers`` at a time, each single-threaded: on a small CPU that beats one job
with several threads (the tiny models are too small to split well across threads).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_munba.testing.digits_unlearning import FORGET_THRESHOLD, METHODS, method_name  # noqa: E402

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
    p.add_argument("--methods", nargs="+", default=list(METHODS), type=method_name,
                   help="rows to run: %s, or weighted-<λ> for any λ > 0" % ", ".join(METHODS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_params", default="xattn",
                   help="UNet subset trained (full variant) / carrying LoRA (lora variant); "
                        "xattn = the paper's class-wise setting")
    p.add_argument("--max_train_steps", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=20,
                   help="evaluate every so many training steps (and at the end)")
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="full variant")
    p.add_argument("--lora_learning_rate", type=float, default=3e-3, help="lora variant")
    p.add_argument("--munba_flags", default="",
                   help="extra training-script flags for the munba method only, one string (to "
                        "explore the satisfied-player rule, e.g. --munba_flags \"--forget_target "
                        "0.1 --forget_target_hysteresis 2\")")
    p.add_argument("--retain_objective", choices=("distill", "denoise"), default=None,
                   help="the retain player's loss for every method but munba-paper (the paper's "
                        "own: denoise) and retain (fine-tuning: denoise); default: the training "
                        "script's (distill)")
    p.add_argument("--forget_threshold", type=float, default=FORGET_THRESHOLD,
                   help="forget accuracy (%%) at or below which the digit counts as forgotten")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--guidance_scale", type=float, default=2.0,
                   help="moderate on purpose: at >= 3 a class's samples are nearly identical")
    p.add_argument("--num_images_per_prompt", type=int, default=10)
    p.add_argument("--num_inference_steps", type=int, default=10,
                   help="DDIM steps of the evaluation images (10 keeps a curve point cheap)")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--grid_images", type=int, default=6,
                   help="images of the forgotten digit per grid row (plus one per other digit)")
    args = p.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "num_images_per_prompt",
                 "num_inference_steps", "num_workers", "rank", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.forget_digit <= 9:
        p.error("--forget_digit must be a digit 0..9")
    remap = (args.forget_digit + 1) % 10 if args.remap_digit is None else args.remap_digit
    if not 0 <= remap <= 9 or remap == args.forget_digit:
        p.error("--remap_digit must be a digit 0..9 other than --forget_digit")
    args.remap_digit = remap
    import shlex

    args.munba_flags = shlex.split(args.munba_flags)
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


def _single_thread():
    import torch

    torch.set_num_threads(1)


def eval_points(args, arts, checkpoints, lora, grid_dir=None):
    """In a worker process: the curve points of one run (see evaluate_checkpoints)."""
    from hf_munba.testing.digits_unlearning import evaluate_checkpoints

    t = time.perf_counter()
    points = evaluate_checkpoints(
        arts["pipeline"], arts["classifier"], checkpoints, lora=lora,
        forget_digit=args.forget_digit, num_images_per_prompt=args.num_images_per_prompt,
        guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
        grid_dir=grid_dir, grid_images=args.grid_images)
    return points, time.perf_counter() - t


def base_job(args, arts, out):
    (point,), secs = eval_points(args, arts, [(0, None)], lora=False,
                                 grid_dir=str(out / "runs" / "original_grid"))
    return {"name": "original", **point, "eval_seconds": secs,
            "images_dir": str(out / "runs" / "original_grid")}


def method_flags(args, method):
    """The experiment-wide flags a method's run gets on top of its METHODS row."""
    flags = list(args.munba_flags) if method == "munba" else []
    if args.retain_objective is not None and method not in ("munba-paper", "retain"):
        flags += ["--retain_objective", args.retain_objective]
    return flags


def train_job(args, arts, data, out, method, variant, seed):
    from hf_munba.testing.digits_unlearning import train_script_args

    name = f"{method}-{variant}-s{seed}"
    run_dir = out / "runs" / name
    lora = variant == "lora"
    targs = train_script_args(
        method=method, pretrained=arts["pipeline"], data=data, output_dir=str(run_dir),
        forget_digit=args.forget_digit, remap_digit=args.remap_digit, seed=seed,
        use_lora=lora, train_params=args.train_params, max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.lora_learning_rate if lora else args.learning_rate, rank=args.rank,
        checkpointing_steps=args.eval_every,
        extra_args=method_flags(args, method))
    # The run is the CLI in a subprocess, not hf_munba.diffusion.train(config) in this worker:
    # train() sets process-wide state (accelerate's AcceleratorState singleton, logging handlers
    # bound to the first run's stream, the global RNG via set_seed), so consecutive runs in one
    # pool worker would share it; the subprocess also gives each run its own log file and a
    # wall-clock time that includes start-up, as a user's run has. The method rows
    # (hf_munba.testing.digits_unlearning.METHODS) are CLI argument lists for the same reason.
    secs = run([ROOT / "training/train_munba_sd.py", *targs], out / "runs" / f"{name}.train.log")
    steps = list(range(args.eval_every, args.max_train_steps, args.eval_every))
    checkpoints = [(s, str(run_dir / f"checkpoint-{s}")) for s in steps]
    checkpoints.append((args.max_train_steps, str(run_dir)))  # the final model
    grid_dir = str(out / "runs" / f"{name}_grid") if seed == args.seeds[0] else None
    points, eval_secs = eval_points(args, arts, checkpoints, lora, grid_dir)
    for s in steps + [args.max_train_steps]:  # the curve is kept; the checkpoints are not
        shutil.rmtree(run_dir / f"checkpoint-{s}", ignore_errors=True)
    metrics = json.loads((run_dir / "training_metrics.json").read_text())
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines() if l]
    left = [h["step"] for h in history if h.get("munba/power_forget", 1.0) == 0.0]
    final = points[-1]
    result = {"name": name, "method": method, "variant": variant, "seed": seed,
            "seconds": secs, "eval_seconds": eval_secs, "training_metrics": metrics,
            "forget_accuracy": final["forget_accuracy"],
            "retain_accuracy": final["retain_accuracy"], "per_class": final["per_class"],
            "forget_player_out_steps": len(left), "forget_player_first_out": left[0] if left else None,
            "images_dir": grid_dir, "points": points}
    # each run's numbers on disk as soon as it ends, so a long experiment that is stopped keeps them
    (out / "runs" / f"{name}.result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    from hf_munba.testing.digits import DigitsArtifacts, DigitsRecipe, digit_prompt, load_or_build_digits_models
    from hf_munba.testing.digits_unlearning import (best_weighted, curve_markdown, plot_tradeoff_curves,
                                            summarize_curves, summarize_runs, summary_markdown,
                                            write_digit_imagefolders)
    from hf_munba.evaluation.report import atomic_write_text, image_grid

    out = Path(args.output_dir)
    if out.exists() and args.overwrite_output_dir:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.models_dir is not None:
        built = DigitsArtifacts.from_dir(args.models_dir)
    else:
        recipe = DigitsRecipe(seed=args.build_seed)
        if args.build_unet_steps is not None:
            import dataclasses

            recipe = dataclasses.replace(recipe, unet_steps=args.build_unet_steps)
        built = load_or_build_digits_models(recipe, cache_dir=args.cache_dir)
    arts = {"pipeline": str(built.pipeline_path), "classifier": str(built.classifier_path)}
    t_build = time.perf_counter() - t0
    data = write_digit_imagefolders(out / "data", args.forget_digit)
    (out / "runs").mkdir(exist_ok=True)

    jobs = [(base_job, (args, arts, out))] + [
        (train_job, (args, arts, data, out, m, v, s))
        for v in args.variants for m in args.methods for s in args.seeds]
    t1 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.num_workers, mp_context=ctx,
                             initializer=_single_thread) as pool:
        futures = [pool.submit(fn, *a) for fn, a in jobs]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['name']}: forget acc "
                  f"{r['forget_accuracy']:.1f}%, retained acc {r['retain_accuracy']:.1f}%", flush=True)
    t_runs = time.perf_counter() - t1
    base, runs = results[0], results[1:]
    base_point = {"step": 0, "forget_accuracy": base["forget_accuracy"],
                  "retain_accuracy": base["retain_accuracy"]}
    for r in runs:
        r["curve"] = [base_point] + r.pop("points")
    rows = summarize_runs(runs, base)
    curves = summarize_curves(runs, args.forget_threshold)
    verdict = {}
    for v in args.variants:
        mine = next((c for c in curves if c["variant"] == v and c["method"] == "munba"), None)
        entry = {}
        for key in ("first_retain", "best_retain"):
            best = best_weighted(curves, v, key)
            entry[key] = {
                "best_weighted": None if best is None else best["method"],
                "best_weighted_value": None if best is None else best[key],
                "munba": None if mine is None else mine[key],
                "munba_reached": None if mine is None else f"{mine['reached']}/{mine['seeds']}",
                "met": (None if mine is None or best is None else
                        bool(mine["reached"] == mine["seeds"] and mine[key] is not None
                             and mine[key] >= best[key]))}
        verdict[v] = entry

    first_seed = args.seeds[0]

    def grid_files(images_dir):
        man = [json.loads(l) for l in (Path(images_dir) / "metadata.jsonl").read_text().splitlines()
               if l.strip()]
        return [Path(images_dir) / m["file_name"] for m in man]

    grid_rows = {"original": grid_files(base["images_dir"])}
    for r in runs:
        if r["seed"] == first_seed and r["images_dir"]:
            grid_rows[f"{r['method']} {r['variant']}"] = grid_files(r["images_dir"])
    image_grid(grid_rows, out / "grid.png", cell=48, label_width=130)
    plot_tradeoff_curves(curves, base, out / "curves.png", args.forget_threshold,
                         title=f"forget {args.forget_digit}")

    total = time.perf_counter() - t0
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite_output_dir",)}
    summary = {"settings": settings, "build": {"root": built.root, "metrics": built.metrics},
               "original": base, "runs": runs, "summary": rows, "curves": curves,
               "verdict": verdict,
               "seconds": {"build_or_cache": t_build, "runs": t_runs, "total": total}}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")

    def fmt(x):
        return "–" if x is None else f"{x:.1f}"

    verdict_md = []
    for v, e in verdict.items():
        for key, what in (("first_retain", "first point"), ("best_retain", "best point")):
            x = e[key]
            verdict_md.append(
                f"- {v}, {what} with forget ≤ {args.forget_threshold:g}%: munba {fmt(x['munba'])} "
                f"({x['munba_reached']} seeds) vs best weighted {x['best_weighted']} "
                f"{fmt(x['best_weighted_value'])}: "
                f"{'met' if x['met'] else 'NOT met' if x['met'] is not None else 'n/a'}")
    md = [f"# Forgetting the digit {args.forget_digit} (prompt \"{digit_prompt(args.forget_digit)}\" "
          f"remapped to \"{digit_prompt(args.remap_digit)}\")", "",
          f"Forget acc: share of images generated from the forgotten prompt that the classifier "
          f"calls {args.forget_digit}; retained acc: the same for the other nine prompts (pooled). "
          f"{args.num_images_per_prompt} images per prompt, guidance {args.guidance_scale}, "
          f"DDIM {args.num_inference_steps} steps, evaluated every {args.eval_every} steps; "
          f"{args.max_train_steps} steps of batch {args.train_batch_size} on `{args.train_params}` "
          f"(full: lr {args.learning_rate}, LoRA rank {args.rank}: lr {args.lora_learning_rate}); "
          f"retain loss {args.retain_objective or 'distill'} (munba-paper: denoise, the paper's); "
          f"mean ± std over seeds {args.seeds} (trade-off numbers: over the seeds that reach "
          f"forget ≤ {args.forget_threshold:g}%).", "",
          curve_markdown(curves, rows, base),
          "Does recommended munba keep at least the best-lambda weighted sum's retained accuracy?",
          "", *verdict_md, "", "End of run (today's summary):", "", summary_markdown(rows, base),
          f"Wall time: {total / 60:.1f} min (build/cache {t_build / 60:.1f} min, runs "
          f"{t_runs / 60:.1f} min, {args.num_workers} workers).", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
