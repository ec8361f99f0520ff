#!/usr/bin/env python
"""Evaluate one or more (unlearned) text-to-image pipelines on a prompt set.

Example (the paper's nudity table, base vs. unlearned, 1,000 images each):

    python eval/evaluate_generation.py \
        --model sd14=/models/sd-v1-4 --model munba=/models/sd-v1-4-munba-nudity \
        --prompts nudity --num_images_per_prompt 250 --metrics nudity \
        --output_dir eval_out/nudity --model_card munba

A LoRA on a base pipeline: ``--model munba=/models/sd-v1-4 --lora munba=/out/munba-lora``.
See docs/evaluation_generation.md for every metric and its inputs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_munba.evaluation.cli import add_model_arguments, model_specs  # noqa: E402
from hf_munba.evaluation.generative import (METRICS, GenerativeEvalConfig,  # noqa: E402
                                            evaluate_generation)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, "a saved diffusers pipeline; repeat for several models side by side")
    p.add_argument("--prompts", required=True,
                   help="nudity | clothed | imagenette | prompts.txt | prompts.csv (I2P/COCO "
                        "columns prompt, evaluation_seed, evaluation_guidance, case_number, "
                        "categories, label)")
    p.add_argument("--metrics", nargs="+", default=["nudity"], choices=METRICS)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--seed", type=int, default=0,
                   help="image i of a set without evaluation_seed gets seed + i")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="default when a prompt has no evaluation_guidance")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--nudenet_threshold", type=float, default=0.6)
    p.add_argument("--classifier", default=None, help="AutoModelForImageClassification directory")
    p.add_argument("--forget_classes", nargs="*", default=[],
                   help="class names counted as forgotten in the classification table")
    p.add_argument("--clip_model", default=None, help="CLIPModel directory for the CLIP score")
    p.add_argument("--fid_reference_dir", default=None, help="folder of real reference images")
    p.add_argument("--fid_feature_extractor", default=None,
                   help="pytorch-fid:/path/pt_inception-2015-12-05-6726825d.pth or hf:/model_dir")
    p.add_argument("--grid_images", type=int, default=8, help="images per model in grid.png")
    p.add_argument("--model_card", nargs="*", default=[], metavar="NAME",
                   help="write the tables into these models' README.md (LoRA dir if given)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--resume", action="store_true", help="continue a run in output_dir")
    p.add_argument("--overwrite_output_dir", action="store_true")
    return p.parse_args(argv)


def config_from_args(args) -> GenerativeEvalConfig:
    return GenerativeEvalConfig(
        models=model_specs(args.model, args.lora), prompt_set=args.prompts,
        output_dir=args.output_dir, metrics=args.metrics,
        num_images_per_prompt=args.num_images_per_prompt, max_prompts=args.max_prompts,
        seed=args.seed, guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
        batch_size=args.batch_size, nudenet_threshold=args.nudenet_threshold,
        classifier=args.classifier, forget_classes=args.forget_classes,
        clip_model=args.clip_model, fid_reference_dir=args.fid_reference_dir,
        fid_feature_extractor=args.fid_feature_extractor, grid_images=args.grid_images,
        model_card=args.model_card, device=args.device, dtype=args.dtype,
        overwrite_output_dir=args.overwrite_output_dir, resume=args.resume)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    results = evaluate_generation(cfg)
    print(f"wrote {Path(cfg.output_dir) / 'results.md'} and results.json "
          f"({len(results['models'])} models, {results['num_images']} images each)")


if __name__ == "__main__":
    main()
