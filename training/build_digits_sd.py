#!/usr/bin/env python
"""Train (or reuse from cache) the small SD-structured digits pipeline and its digit classifier.

    python training/build_digits_sd.py --output_dir runs/digits_models
    python training/build_digits_sd.py --cache_dir ~/.cache/hf_munba/digits   # cached by recipe

Writes ``<dir>/pipeline`` (StableDiffusionPipeline.from_pretrained), ``<dir>/classifier``
(AutoModelForImageClassification / AutoImageProcessor) and ``<dir>/build_info.json`` (recipe,
measured accuracies, wall times).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_munba.testing.digits import DigitsRecipe  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output_dir", help="write the build here (must not exist or be empty, "
                       "unless --overwrite_output_dir)")
    where.add_argument("--cache_dir", help="cache root; the build goes to <cache_dir>/<recipe hash> "
                       "and is reused when present (default: $HF_MUNBA_CACHE/digits or "
                       "~/.cache/hf_munba/digits)")
    p.add_argument("--overwrite_output_dir", action="store_true")
    defaults = DigitsRecipe()
    for name in ("seed", "vae_steps", "unet_steps", "classifier_epochs"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--num_images", type=int, default=None,
                   help="train on a seeded subset of the 1,797 digits (for quick trials)")
    p.add_argument("--eval_guidance_scales", type=float, nargs="*", default=[1.5, 3.0])
    p.add_argument("--eval_images_per_digit", type=int, default=20)
    args = p.parse_args(argv)
    if args.eval_images_per_digit < 1:
        p.error("--eval_images_per_digit must be >= 1")
    try:
        args.recipe = DigitsRecipe(seed=args.seed, vae_steps=args.vae_steps,
                                   unet_steps=args.unet_steps,
                                   classifier_epochs=args.classifier_epochs,
                                   num_images=args.num_images)
    except ValueError as e:
        p.error(str(e))
    if args.output_dir and not args.overwrite_output_dir:
        out = Path(args.output_dir)
        if out.exists() and any(out.iterdir()):
            p.error(f"--output_dir {out} is not empty; pass --overwrite_output_dir to replace it")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hf_munba.testing.digits import build_digits_models, load_or_build_digits_models

    kwargs = dict(eval_guidance_scales=args.eval_guidance_scales,
                  eval_images_per_digit=args.eval_images_per_digit)
    if args.output_dir:
        out = Path(args.output_dir)
        if out.exists() and any(out.iterdir()):  # only reachable with --overwrite_output_dir
            import shutil
            import tempfile

            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new", dir=out.parent)) / "build"
            arts = build_digits_models(staging, args.recipe, **kwargs)
            shutil.rmtree(out)
            os.replace(staging, out)
            staging.parent.rmdir()
            from hf_munba.testing.digits import DigitsArtifacts

            arts = DigitsArtifacts.from_dir(out)
        else:
            arts = build_digits_models(out, args.recipe, **kwargs)
    else:
        arts = load_or_build_digits_models(args.recipe, cache_dir=args.cache_dir, **kwargs)
    print(json.dumps({"root": arts.root, "pipeline": arts.pipeline_path,
                      "classifier": arts.classifier_path, "metrics": arts.metrics}, indent=2))


if __name__ == "__main__":
    main()
