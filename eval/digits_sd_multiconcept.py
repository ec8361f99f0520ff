#!/usr/bin/env python
"""Forget several handwritten digits at once: players per concept vs pooled vs one after the other.

    python eval/digits_sd_multiconcept.py --output_dir runs/digits_multi_3_7 --forget_digits 3 7

The digits testbed of ``eval/digits_sd_experiment.py`` (same model, data, evaluation and
trade-off numbers), with several forgotten digits, each remapped to the next digit that is not
forgotten (3 -> 4, 7 -> 8). Per method (munba = the recommended configuration, and the
weighted sum's small lambda search) x variant (full, LoRA) x seed, three ways to unlearn them:

* ``per_concept``: one run, ``--forget_manifest`` with ``--forget_players per_concept``: K = 1 +
  the number of digits players, each digit its own forget player and satisfied-player rule;
* ``pooled``: the same run with ``--forget_players pooled``: every digit's images in one
  forget player (one loss, one rule);
* ``sequential``: one run per digit, each starting from the previous run's model (LoRA: the
  previous run's fused pipeline), the same total number of steps split evenly.

Every run is evaluated every ``--eval_every`` steps (sequential: along the chain, step counted
from the first run's start) on images of all ten prompts; a point's forget accuracy is the
highest of the forgotten digits' (so "forget <= 5%" means every digit is forgotten), the
per-digit values are kept, and retained accuracy pools the digits not forgotten. results.md /
results.json are rewritten after every finished run, so a stopped experiment keeps its numbers;
re-running the same command reuses the finished runs (``runs/<name>.result.json``).
"""

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

from digits_sd_experiment import _single_thread, run  # noqa: E402
from hf_munba.testing.digits_unlearning import (CONCEPT_MODES, FORGET_THRESHOLD,  # noqa: E402
                                                method_name)

VARIANTS = ("full", "lora")
DEFAULT_METHODS = ("munba", "weighted-0.1", "weighted-0.3", "weighted-1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--models_dir", default=None,
                   help="a finished digits build (default: the cached default recipe)")
    p.add_argument("--cache_dir", default=None, help="cache of the built digits models")
    p.add_argument("--forget_digits", type=int, nargs="+", default=[3, 7])
    p.add_argument("--modes", nargs="+", default=list(CONCEPT_MODES), choices=CONCEPT_MODES)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), type=method_name)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train_params", default="xattn")
    p.add_argument("--max_train_steps", type=int, default=100,
                   help="total optimizer steps (sequential: split evenly over the digits)")
    p.add_argument("--eval_every", type=int, default=25,
                   help="evaluate every so many steps; must divide each sequential run's steps")
    p.add_argument("--train_batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=3e-4, help="full variant")
    p.add_argument("--lora_learning_rate", type=float, default=3e-3, help="lora variant")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--forget_threshold", type=float, default=FORGET_THRESHOLD)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--num_images_per_prompt", type=int, default=10)
    p.add_argument("--num_inference_steps", type=int, default=10)
    p.add_argument("--num_workers", type=int, default=1)
    args = p.parse_args(argv)
    from hf_munba.testing.digits_unlearning import concept_remaps

    try:
        concept_remaps(args.forget_digits)
    except ValueError as e:
        p.error(str(e))
    if len(args.forget_digits) < 2:
        p.error("--forget_digits needs at least two digits (one digit: digits_sd_experiment.py)")
    per_run = args.max_train_steps // len(args.forget_digits)
    if "sequential" in args.modes and (args.max_train_steps % len(args.forget_digits)
                                       or per_run % args.eval_every):
        p.error(f"sequential splits --max_train_steps {args.max_train_steps} over "
                f"{len(args.forget_digits)} digits: each run's steps must be a multiple of "
                f"--eval_every {args.eval_every}")
    if args.models_dir is not None and not (Path(args.models_dir) / "build_info.json").is_file():
        p.error(f"--models_dir {args.models_dir} is not a finished digits build")
    return args


def _points(args, pipeline, classifier, checkpoints, lora, offset=0):
    from hf_munba.testing.digits_unlearning import evaluate_checkpoints

    pts = evaluate_checkpoints(pipeline, classifier, checkpoints, lora=lora,
                               forget_digit=args.forget_digits,
                               num_images_per_prompt=args.num_images_per_prompt,
                               guidance_scale=args.guidance_scale,
                               num_inference_steps=args.num_inference_steps)
    for p in pts:
        p["step"] += offset
    return pts


def _checkpoints(run_dir, steps, every):
    cks = [(s, str(run_dir / f"checkpoint-{s}")) for s in range(every, steps, every)]
    return cks + [(steps, str(run_dir))]


def _clean(run_dir, steps, every):
    for s in range(every, steps, every):
        shutil.rmtree(run_dir / f"checkpoint-{s}", ignore_errors=True)


def base_job(args, arts, out):
    (point,) = _points(args, arts["pipeline"], arts["classifier"], [(0, None)], lora=False)
    return {"name": "original", **point}


def train_job(args, arts, data, out, mode, method, variant, seed):
    """One (mode, method, variant, seed): its training run(s) and its curve."""
    from hf_munba.testing.digits_unlearning import concept_remaps, concept_train_script_args

    name = f"{mode}-{method}-{variant}-s{seed}"
    lora = variant == "lora"
    common = dict(method=method, retain_dir=data["retain"], seed=seed, use_lora=lora,
                  train_params=args.train_params, train_batch_size=args.train_batch_size,
                  learning_rate=args.lora_learning_rate if lora else args.learning_rate,
                  rank=args.rank, checkpointing_steps=args.eval_every)
    t0 = time.perf_counter()
    secs, points, histories = 0.0, [], []
    if mode != "sequential":
        run_dir = out / "runs" / name
        targs = concept_train_script_args(pretrained=arts["pipeline"], output_dir=str(run_dir),
                                          manifest=data["manifest"], forget_players=mode,
                                          max_train_steps=args.max_train_steps, **common)
        secs += run([ROOT / "training/train_munba_sd.py", *targs], out / "runs" / f"{name}.log")
        points = _points(args, arts["pipeline"], arts["classifier"],
                         _checkpoints(run_dir, args.max_train_steps, args.eval_every), lora)
        _clean(run_dir, args.max_train_steps, args.eval_every)
        histories.append(run_dir / "history.jsonl")
    else:  # one digit after the other, each run from the last one's model
        remap = concept_remaps(args.forget_digits)
        steps = args.max_train_steps // len(args.forget_digits)
        pipeline = arts["pipeline"]
        for k, d in enumerate(args.forget_digits):
            run_dir = out / "runs" / f"{name}-{k}"
            last = k == len(args.forget_digits) - 1
            targs = concept_train_script_args(
                pretrained=pipeline, output_dir=str(run_dir),
                single=(data["forget"][d], d, remap[d]), max_train_steps=steps,
                fuse_lora=lora and not last, **common)
            secs += run([ROOT / "training/train_munba_sd.py", *targs],
                        out / "runs" / f"{name}-{k}.log")
            points += _points(args, pipeline, arts["classifier"],
                              _checkpoints(run_dir, steps, args.eval_every), lora,
                              offset=k * steps)
            _clean(run_dir, steps, args.eval_every)
            histories.append(run_dir / "history.jsonl")
            pipeline = str(run_dir)  # full: the saved pipeline; LoRA: the fused one
    left = {}
    for path in histories:
        for line in Path(path).read_text().splitlines():
            h = json.loads(line)
            for key, v in h.items():
                if key.startswith("munba/power_forget") and v <= 0.01 + 1e-12:
                    left[key] = left.get(key, 0) + 1
    final = points[-1]
    result = {"name": name, "mode": mode, "method": method, "variant": f"{variant}/{mode}",
              "params": variant, "seed": seed, "seconds": secs,
              "total_seconds": time.perf_counter() - t0,
              "forget_accuracy": final["forget_accuracy"],
              "retain_accuracy": final["retain_accuracy"],
              "forget_accuracy_per_digit": final.get("forget_accuracy_per_digit"),
              "per_class": final["per_class"], "satisfied_steps": left, "points": points}
    (out / "runs" / f"{name}.result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(args, out, base, runs, t0):
    """results.json / results.md from the runs finished so far (rewritten after each run)."""
    from hf_munba.evaluation.report import atomic_write_text
    from hf_munba.evaluation.results import markdown_table
    from hf_munba.testing.digits import digit_prompt
    from hf_munba.testing.digits_unlearning import (_mean_std, _pm, best_weighted,
                                                    concept_remaps, summarize_curves,
                                                    summarize_runs)

    base_point = {"step": 0, "forget_accuracy": base["forget_accuracy"],
                  "retain_accuracy": base["retain_accuracy"]}
    runs = [dict(r, curve=[base_point] + r["points"]) for r in runs]
    # every finished run counts; a row says over how many seeds it is (a stopped experiment)
    complete = {}
    for r in runs:
        complete.setdefault((r["variant"], r["method"]), []).append(r)
    done = runs
    rows = {(r["variant"], r["method"]): r for r in summarize_runs(done, base)}
    curves = summarize_curves(done, args.forget_threshold) if done else []
    digits = args.forget_digits
    table = []
    for c in sorted(curves, key=lambda c: (c["variant"].split("/")[0],
                                           args.modes.index(c["variant"].split("/")[1]),
                                           args.methods.index(c["method"]))):
        rs = complete[(c["variant"], c["method"])]
        per = [_pm(*_mean_std([r["forget_accuracy_per_digit"][str(d)] for r in rs]))
               for d in digits]
        e = rows[(c["variant"], c["method"])]
        table.append([c["method"], *c["variant"].split("/"), *per,
                      _pm(e["retain_accuracy"], e["retain_accuracy_std"]),
                      _pm(c["first_retain"], c["first_retain_std"]),
                      "–" if c["first_step"] is None else f"{c['first_step']:.0f}",
                      _pm(c["best_retain"], c["best_retain_std"]),
                      f"{c['reached']}/{c['seeds']}",
                      "–" if e["seconds"] is None else f"{e['seconds']:.0f}"])
    thr = args.forget_threshold
    head = ["method", "params", "players", *[f"end: forget acc {d} (%) ↓" for d in digits],
            "end: retained acc (%) ↑", f"first point with every digit ≤ {thr:g}%: retained (%) ↑",
            "its step", f"best retained (%) with every digit ≤ {thr:g}% ↑", "seeds reaching it",
            "train s / run"]
    best = []
    variants = sorted({c["variant"] for c in curves},
                      key=lambda v: (v.split("/")[0], args.modes.index(v.split("/")[1])))
    for v in variants:
        mine = next((c for c in curves if c["variant"] == v and c["method"] == "munba"), None)
        for key, what in (("first_retain", "first"), ("best_retain", "best")):
            w = best_weighted(curves, v, key)
            best.append({"variant": v, "which": what,
                         "munba": None if mine is None else mine[key],
                         "munba_reached": None if mine is None else
                         f"{mine['reached']}/{mine['seeds']}",
                         "best_weighted": None if w is None else w["method"],
                         "best_weighted_value": None if w is None else w[key]})
    fmt = (lambda x: "–" if x is None else f"{x:.1f}")
    best_md = [f"- {b['variant']}, {b['which']} point: munba {fmt(b['munba'])} "
               f"({b['munba_reached']} seeds) vs best weighted {b['best_weighted']} "
               f"{fmt(b['best_weighted_value'])}" for b in best]
    remap = concept_remaps(digits)
    total = time.perf_counter() - t0
    md = ["# Forgetting the digits " + ", ".join(
              f"{d} (\"{digit_prompt(d)}\" -> \"{digit_prompt(remap[d])}\")" for d in digits), "",
          f"Original: retained acc {base['retain_accuracy']:.1f}%, forget acc per digit "
          + ", ".join(f"{d}: {base['forget_accuracy_per_digit'][str(d)]:.1f}%" for d in digits)
          + f". {args.max_train_steps} steps in all of batch {args.train_batch_size} on "
          f"`{args.train_params}` (full lr {args.learning_rate}, LoRA rank {args.rank} lr "
          f"{args.lora_learning_rate}), evaluated every {args.eval_every} steps, "
          f"{args.num_images_per_prompt} images per prompt; mean ± std over seeds {args.seeds} "
          f"(trade-off numbers over the seeds that reach it). {len(runs)} of "
          f"{len(args.seeds) * len(args.modes) * len(args.methods) * len(args.variants)} runs "
          f"finished.", "",
          markdown_table(head, table), "", *best_md, "",
          f"Wall time so far: {total / 60:.1f} min ({args.num_workers} worker(s)).", ""]
    summary = {"settings": vars(args), "original": base, "runs": runs,
               "summary": list(rows.values()), "curves": curves, "comparison": best,
               "seconds": total}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "results.md", "\n".join(md))
    return "\n".join(md)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    from hf_munba.testing.digits import DigitsArtifacts, DigitsRecipe, load_or_build_digits_models
    from hf_munba.testing.digits_unlearning import (write_concept_imagefolders,
                                                    write_concept_manifest)

    out = Path(args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    built = (DigitsArtifacts.from_dir(args.models_dir) if args.models_dir else
             load_or_build_digits_models(DigitsRecipe(), cache_dir=args.cache_dir))
    arts = {"pipeline": str(built.pipeline_path), "classifier": str(built.classifier_path)}
    data = write_concept_imagefolders(out / "data", args.forget_digits)
    data["manifest"] = write_concept_manifest(out / "data" / "concepts.json", data,
                                              args.forget_digits)
    base_file = out / "runs" / "original.result.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base = base_job(args, arts, out)
        base_file.write_text(json.dumps(base, indent=2) + "\n")
    # seeds outermost: a stopped experiment has every cell with fewer seeds, not some cells
    jobs = [(mode, m, v, s) for s in args.seeds for v in args.variants for mode in args.modes
            for m in args.methods]
    runs = []
    todo = []
    for job in jobs:
        f = out / "runs" / f"{job[0]}-{job[1]}-{job[2]}-s{job[3]}.result.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
        else:
            todo.append(job)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.num_workers, mp_context=ctx,
                             initializer=_single_thread) as pool:
        futures = [pool.submit(train_job, args, arts, data, out, *job) for job in todo]
        for fut in as_completed(futures):
            r = fut.result()
            runs.append(r)
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['name']}: forget acc per digit "
                  f"{r['forget_accuracy_per_digit']}, retained {r['retain_accuracy']:.1f}%",
                  flush=True)
            report(args, out, base, runs, t0)
    print(report(args, out, base, runs, t0))


if __name__ == "__main__":
    main()
