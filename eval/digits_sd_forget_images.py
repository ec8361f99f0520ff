#!/usr/bin/env python
"""Which images of the forgotten prompt survive unlearning, and how close to the boundary they are.

    python eval/digits_sd_forget_images.py runs/forget2 --methods munba --variants lora

The argument is an ``eval/digits_sd_experiment.py`` output directory whose runs still hold their
final weights (``runs/<name>/``). For each selected run it redraws the forgotten prompt's
evaluation images (the settings and seeded noises of the experiment's evaluation, so the same
images its forget accuracy counted) and prints the classifier's probability of the forgotten digit
per image, beside the original model and the original drawing the remap prompt from the same
noises (what a perfect remap would draw; ``hf_munba.testing.digits_forget_images``). It writes
forget_images.md / .json / .png into ``--output_dir`` (default: ``<experiment>/forget_images``),
atomically. Generates only; trains nothing.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="an eval/digits_sd_experiment.py output directory")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    p.add_argument("--variants", nargs="+", choices=["full", "lora"], default=None,
                   help="only these variants (default: both)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    p.add_argument("--models_dir", default=None,
                   help="the digits build, when it is no longer where results.json says it was")
    p.add_argument("--output_dir", default=None,
                   help="where to write forget_images.* (default: <experiment>/forget_images)")
    args = p.parse_args(argv)
    exp = Path(args.experiment)
    if not (exp / "results.json").is_file():
        p.error(f"{exp} has no results.json: is it an eval/digits_sd_experiment.py output?")
    results = json.loads((exp / "results.json").read_text())
    settings = dict(results.get("settings", {}))
    if not isinstance(settings.get("forget_digit"), int):
        p.error(f"{exp} has no single forgotten digit (several digits, or not a "
                "digits_sd_experiment.py output); this view is for one forgotten digit")
    if settings.get("remap_digit") is None:  # the experiment's default: the next digit
        settings["remap_digit"] = (settings["forget_digit"] + 1) % 10
    root = Path(args.models_dir or results["build"]["root"])
    if not (root / "build_info.json").is_file():
        p.error(f"the digits build {root} is not there (no build_info.json); give --models_dir")
    chosen = [r for r in results["runs"]
              if (args.methods is None or r["method"] in args.methods)
              and (args.variants is None or r["variant"] in args.variants)
              and (args.seeds is None or r["seed"] in args.seeds)]
    if not chosen:
        p.error(f"no run of {exp} matches --methods / --variants / --seeds")
    missing = [r["name"] for r in chosen if not (exp / "runs" / r["name"]).is_dir()]
    if missing:
        p.error(f"these runs have no final weights under {exp / 'runs'}: {', '.join(missing)}")
    return args, settings, root, chosen


def main(argv=None):
    args, s, root, chosen = parse_args(argv)
    from hf_munba.evaluation.results import atomic_write_text
    from hf_munba.testing.digits import DigitsArtifacts
    from hf_munba.testing.digits_forget_images import (forget_image_probabilities, forget_images_grid,
                                                       forget_images_markdown)

    exp = Path(args.experiment)
    build = DigitsArtifacts.from_dir(root)
    runs = [(r["name"], str(exp / "runs" / r["name"]), r["variant"] == "lora") for r in chosen]
    report, images = forget_image_probabilities(
        build.pipeline_path, build.classifier_path, runs, forget_digit=s["forget_digit"],
        remap_digit=s["remap_digit"], num_images_per_prompt=s["num_images_per_prompt"],
        guidance_scale=s["guidance_scale"], num_inference_steps=s["num_inference_steps"])
    out = Path(args.output_dir) if args.output_dir else exp / "forget_images"
    out.mkdir(parents=True, exist_ok=True)
    md = forget_images_markdown(report)
    atomic_write_text(out / "forget_images.md", md)
    atomic_write_text(out / "forget_images.json", json.dumps(report, indent=2) + "\n")
    forget_images_grid(images, out / "forget_images.png")
    print(md)


if __name__ == "__main__":
    main()
