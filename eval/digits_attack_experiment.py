#!/usr/bin/env python
"""Robustness of a digit erasure: the adversarial-prompt attack on the digits testbed, per method.

    python eval/digits_attack_experiment.py --output_dir runs/digits_attack

1. trains the unlearned models with ``eval/digits_sd_experiment.py`` (munba and weighted, full
   cross-attention and LoRA, seeds 0 1 2, forgetting "three" by remapping it to "four", the
   docs' learning rates 3e-4 / 3e-3) into ``<output_dir>/train``; an existing finished
   ``train`` folder is reused;
2. attacks the forgotten digit's prompt with ``eval/attack_unlearned.py`` (one run per model,
   ``--num_workers`` at a time, single-threaded, resumable): several prompt seeds, reference
   images from the original model, the digit classifier as detector (success: the image is
   classified as the forgotten digit); the original model is attacked too, as a check;
3. writes ``results.md`` / ``results.json`` (ASR before / after the attack per method and
   variant, pooled over training seeds x prompt seeds, and the spread between training seeds)
   and ``grid.png``.

Rerunning the same command continues an interrupted run.
"""

import argparse
import importlib.util
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_munba.testing.digits_unlearning import method_name  # noqa: E402


def _experiment_script():
    """eval/digits_sd_experiment.py as a module: its subprocess runner is reused here."""
    spec = importlib.util.spec_from_file_location("digits_sd_experiment",
                                                  ROOT / "eval" / "digits_sd_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--cache_dir", default=None, help="cache of the built digits models")
    p.add_argument("--models_dir", default=None, help="a finished digits build to use instead")
    p.add_argument("--forget_digit", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["munba", "weighted-0.01"], type=method_name,
                   help="rows of eval/digits_sd_experiment.py to train and attack; default: munba and "
                        "the weighted sum at the λ that keeps the most when forgetting three")
    p.add_argument("--variants", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=100)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="full variant")
    p.add_argument("--lora_learning_rate", type=float, default=3e-3, help="LoRA variant")
    p.add_argument("--prompt_seeds", type=int, default=5,
                   help="the forgotten prompt is attacked with seeds 0 .. N-1")
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--num_adv_tokens", type=int, default=5)
    p.add_argument("--num_blocks", type=int, default=10,
                   help="timestep blocks (the benchmark sweeps 50; fewer keep CPU time short)")
    p.add_argument("--steps_per_block", type=int, default=40)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--train_images_per_prompt", type=int, default=20,
                   help="images per digit in the training experiment's forgetting evaluation")
    args = p.parse_args(argv)
    for name in ("prompt_seeds", "num_adv_tokens", "num_blocks", "steps_per_block",
                 "num_workers", "max_train_steps", "num_inference_steps",
                 "train_images_per_prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.forget_digit <= 9:
        p.error("--forget_digit must be a digit 0..9")
    if args.models_dir is not None and not (Path(args.models_dir) / "build_info.json").is_file():
        p.error(f"--models_dir {args.models_dir} is not a finished digits build")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    return args


def _settings_file(args):
    return {k: v for k, v in vars(args).items() if k not in ("num_workers", "output_dir")}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    stamp = out / "experiment_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != _settings_file(args):
        raise SystemExit(f"error: {out} holds a run with other settings "
                         f"({stamp}); use another --output_dir")
    if not stamp.is_file() and out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty and holds no attack experiment")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    from hf_munba.testing.digits import digit_prompt
    from hf_munba.evaluation.attack import pooled_asr
    from hf_munba.evaluation.grid import image_grid
    from hf_munba.evaluation.results import atomic_write_text, markdown_table, write_results

    atomic_write_text(stamp, json.dumps(_settings_file(args), indent=2) + "\n")
    exp = _experiment_script()

    # 1. the unlearned models
    train = out / "train"
    if not (train / "results.json").is_file():
        cmd = [ROOT / "eval/digits_sd_experiment.py", "--output_dir", train,
               "--overwrite_output_dir", "--forget_digit", args.forget_digit,
               "--methods", *args.methods, "--variants", *args.variants,
               "--seeds", *args.seeds, "--max_train_steps", args.max_train_steps,
               "--learning_rate", args.learning_rate,
               "--lora_learning_rate", args.lora_learning_rate,
               "--guidance_scale", args.guidance_scale,
               "--num_inference_steps", args.num_inference_steps,
               "--num_images_per_prompt", args.train_images_per_prompt,
               "--num_workers", args.num_workers]
        if args.models_dir:
            cmd += ["--models_dir", args.models_dir]
        if args.cache_dir:
            cmd += ["--cache_dir", args.cache_dir]
        print("training the unlearned models (eval/digits_sd_experiment.py) ...", flush=True)
        exp.run(cmd, out / "train.log")
    trained = json.loads((train / "results.json").read_text())
    t_train = time.perf_counter() - t0
    build = Path(trained["build"]["root"])
    base, classifier = build / "pipeline", build / "classifier"

    # 2. the attack, one run per model
    prompts = out / "forget_prompt.txt"
    prompts.write_text(digit_prompt(args.forget_digit) + "\n", encoding="utf-8")
    models = [{"name": "original", "method": "original", "variant": "–", "seed": None,
               "model_dir": base, "lora_dir": None}]
    for r in trained["runs"]:
        run_dir = train / "runs" / r["name"]
        lora = r["variant"] == "lora"
        models.append({"name": r["name"], "method": r["method"], "variant": r["variant"],
                       "seed": r["seed"], "model_dir": base if lora else run_dir,
                       "lora_dir": run_dir if lora else None,
                       "forget_accuracy": r["forget_accuracy"],
                       "retain_accuracy": r["retain_accuracy"]})

    def attack(m):
        adir = out / "attack" / m["name"]
        cmd = [ROOT / "eval/attack_unlearned.py", "--original", base,
               "--model", f"{m['name']}={m['model_dir']}", "--prompts", prompts,
               "--num_images_per_prompt", args.prompt_seeds, "--seed", 0,
               "--guidance_scale", args.guidance_scale,
               "--num_inference_steps", args.num_inference_steps,
               "--detector", "classifier", "--classifier", classifier,
               "--forget_classes", str(args.forget_digit),
               "--num_adv_tokens", args.num_adv_tokens, "--num_blocks", args.num_blocks,
               "--steps_per_block", args.steps_per_block, "--grid_images", args.prompt_seeds,
               "--output_dir", adir]
        if m["lora_dir"] is not None:
            cmd += ["--lora", f"{m['name']}={m['lora_dir']}"]
        if (adir / "results.json").is_file():
            secs = 0.0
        else:
            if adir.exists():
                cmd += ["--resume"]
            secs = exp.run(cmd, out / "attack" / f"{m['name']}.log")
        res = json.loads((adir / "results.json").read_text())
        return {**m, **res["models"][m["name"]], "attack_seconds": secs,
                "results_dir": str(adir)}

    (out / "attack").mkdir(exist_ok=True)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.num_workers) as pool:
        rows = []
        for r in pool.map(attack, models):
            rows.append(r)
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['name']}: ASR pre {r['asr_pre']:.0f}%, "
                  f"post {r['asr_post']:.0f}% (n={r['n']})", flush=True)
    t_attack = time.perf_counter() - t1

    # 3. per method and variant
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    summary = []
    for (method, variant), rs in groups.items():
        pooled = pooled_asr(rs)
        accs = [r.get("forget_accuracy") for r in rs if r.get("forget_accuracy") is not None]
        summary.append({"method": method, "variant": variant, **pooled,
                        "forget_accuracy_mean": sum(accs) / len(accs) if accs else None,
                        "mean_steps_to_success": _mean([r["mean_steps_to_success"] for r in rs]),
                        "models_attacked": [r["name"] for r in rs]})

    def pm(m, s):
        return f"{m:.1f} ± {s:.1f}"

    table = markdown_table(
        ["method", "params", "models", "n", "forget acc (%)", "ASR pre (%)", "ASR post (%)",
         "ASR post per model (%)", "mean steps to success"],
        [[s["method"], s["variant"], s["models"], s["n"],
          s["forget_accuracy_mean"] if s["forget_accuracy_mean"] is not None else "–",
          s["asr_pre"], s["asr_post"], pm(s["asr_post_mean"], s["asr_post_std"]),
          s["mean_steps_to_success"]] for s in summary])
    total = time.perf_counter() - t0
    md = [f"# Attacking the erasure of the digit {args.forget_digit} "
          f"(prompt \"{digit_prompt(args.forget_digit)}\")", "",
          f"UnlearnDiffAtk on each unlearned model: {args.num_adv_tokens} prepended tokens, "
          f"{args.num_blocks} timestep blocks x {args.steps_per_block} steps, Adam lr 0.01, "
          f"weight decay 0.1; reference images from the original model; the digit classifier as "
          f"detector (success: the image is classified as {args.forget_digit}); prompt seeds "
          f"0..{args.prompt_seeds - 1}, guidance {args.guidance_scale}, DDIM "
          f"{args.num_inference_steps} steps. Unlearning: {args.max_train_steps} steps "
          f"(full lr {args.learning_rate}, LoRA lr {args.lora_learning_rate}), training seeds "
          f"{args.seeds}. n = training seeds x prompt seeds; ASR pooled over them; the per-model "
          f"column is the mean ± std over training seeds. Forget acc: the training experiment's "
          f"share of {args.train_images_per_prompt} images of the prompt classified as "
          f"{args.forget_digit}.", "", table, "",
          f"Wall time: {total / 60:.1f} min (training {t_train / 60:.1f} min, attacks "
          f"{t_attack / 60:.1f} min, {args.num_workers} workers).", ""]
    results = {"settings": _settings_file(args), "summary": summary, "models": rows,
               "seconds": {"training_or_reuse": t_train, "attacks": t_attack, "total": total}}
    write_results(out, results, markdown="\n".join(md), json_default=str)

    # grid: original reference images, then per method/variant (first seed) before / attacked
    grid = {}
    first = {}
    for r in rows:
        first.setdefault((r["method"], r["variant"]), r)
    for (method, variant), r in first.items():
        adir = Path(r["results_dir"])
        from hf_munba.evaluation.attack import read_per_prompt_rows

        prs = read_per_prompt_rows(adir / "attack_per_prompt.csv")
        if method == "original":
            grid["original"] = [adir / "reference" / p["file_name"] for p in prs]
            continue
        grid[f"{method} {variant} before"] = [adir / "images" / r["name"] / "pre" / p["file_name"]
                                              for p in prs]
        grid[f"{method} {variant} attacked"] = [adir / p["attack_image"] for p in prs]
    image_grid(grid, out / "grid.png", cell=48, label_width=150)
    print("\n".join(md))


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


if __name__ == "__main__":
    main()
