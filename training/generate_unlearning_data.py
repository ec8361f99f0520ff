#!/usr/bin/env python
"""Build D_f and D_r for SD unlearning with the base pipeline (seeded, batched, resumable).

    python training/generate_unlearning_data.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
        --output_dir data --num_images_per_prompt 100          # nudity: data/forget, data/retain

    python training/generate_unlearning_data.py ... --class_names tench "English springer" ... \
        --forget_class "English springer"                      # class-wise (Imagenette)

    python training/generate_unlearning_data.py ... --forget_concepts nudity=nudity nudity=naked \
        violence=violence violence=blood                        # several concepts

Writes ``OUTPUT/forget`` and ``OUTPUT/retain`` imagefolders (images + metadata.jsonl with
file_name, text, seed, guidance_scale, num_inference_steps) that train_munba_sd.py reads with
--forget_data_dir / --retain_data_dir; with --forget_concepts one ``OUTPUT/forget_<name>`` per
concept and ``OUTPUT/concepts.json`` for train_munba_sd.py --forget_manifest (each concept its
own bargaining player). Re-running the same command resumes a killed run. The work is
:func:`hf_munba.diffusion.generation.generate_unlearning_data`, which ``hf_munba.unlearn`` also
calls when it is given prompts only.
"""

import argparse
import sys
from pathlib import Path

import torch

from hf_munba.diffusion.data import class_prompts, remap_class
from hf_munba.evaluation.prompts import NUDITY_PROMPTS

DEFAULT_FORGET = list(NUDITY_PROMPTS)
DEFAULT_RETAIN = ["a person wearing clothes"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True,
      help="the base pipeline (SD 1.x/2.x, SDXL, SD 3, Flux): a Hub repo id (org/name) or a "
           "local folder")
    a("--revision", default=None, help="Hub revision of the base pipeline")
    a("--variant", default=None, help='weight file variant, e.g. "fp16"')
    a("--output_dir", required=True, help="writes OUTPUT/forget and OUTPUT/retain imagefolders")
    a("--forget_prompts", nargs="+", default=None, help=f"default: {DEFAULT_FORGET}")
    a("--forget_concepts", nargs="+", action="extend", default=None, metavar="NAME=PROMPT",
      help="several concepts, each its own D_f: NAME=PROMPT entries (a name given again adds a "
           "prompt to that concept); instead of --forget_prompts")
    a("--retain_prompts", nargs="+", default=None, help=f"default: {DEFAULT_RETAIN}")
    a("--class_names", nargs="+", default=None, help="class-wise: all class names")
    a("--forget_class", default=None, help="class-wise: the class whose images form D_f")
    a("--prompt_template", default="an image of a {}", help="class-wise prompt template")
    a("--num_images_per_prompt", type=int, default=100, help="images per forget prompt")
    a("--num_retain_images_per_prompt", type=int, default=None,
      help="default: num_images_per_prompt (x number of forget prompts for the nudity default, "
           "so |D_r| = |D_f| as in the paper)")
    a("--seed", type=int, default=0, help="image k is generated with seed + k")
    a("--batch_size", type=int, default=4, help="images per pipeline call")
    a("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    a("--num_inference_steps", type=int, default=50, help="denoising steps per image")
    a("--resolution", type=int, default=None, help="image size (default: the pipeline's)")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
      help="pipeline dtype")
    a("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.class_names:
        if not args.forget_class:
            sys.exit("error: --class_names needs --forget_class")
        try:
            remap_class(args.class_names, args.forget_class)
            prompts = class_prompts(args.class_names, args.prompt_template)
        except ValueError as e:
            sys.exit(f"error: {e}")
        i = args.class_names.index(args.forget_class)
        forget, retain = [prompts[i]], prompts[:i] + prompts[i + 1:]
        if args.forget_concepts:
            sys.exit("error: --forget_concepts and --class_names are two ways to name D_f; "
                     "give one")
    elif args.forget_concepts:
        if args.forget_prompts:
            sys.exit("error: give --forget_concepts or --forget_prompts, not both")
        forget = {}
        for entry in args.forget_concepts:
            name, sep, prompt = entry.partition("=")
            if not sep or not name.strip() or not prompt.strip():
                sys.exit(f"error: --forget_concepts entry {entry!r} is not NAME=PROMPT")
            forget.setdefault(name.strip(), []).append(prompt.strip())
        from hf_munba.unlearning.methods import check_forget_names

        try:
            check_forget_names(list(forget))
        except ValueError as e:
            sys.exit(f"error: --forget_concepts: {e}")
        retain = args.retain_prompts or DEFAULT_RETAIN
    else:
        forget = args.forget_prompts or DEFAULT_FORGET
        retain = args.retain_prompts or DEFAULT_RETAIN
    for name in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be >= 1")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available() and args.device != "mps":
        sys.exit("error: --mixed_precision fp16 needs a GPU")

    from hf_munba.diffusion.inputs import check_pretrained_pipeline

    try:  # before loading: no Hub retries for a mistyped local path, no half-made output
        check_pretrained_pipeline(args.pretrained_model_name_or_path)
    except ValueError as e:
        sys.exit(f"error: {e}")

    from hf_munba.diffusion.families import load_pipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                         variant=args.variant, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    from hf_munba.diffusion.generation import generate_unlearning_data

    out = Path(args.output_dir)
    try:
        made = generate_unlearning_data(
            pipe, out, forget=forget, retain=retain,
            num_images_per_prompt=args.num_images_per_prompt,
            num_retain_images_per_prompt=args.num_retain_images_per_prompt, seed=args.seed,
            batch_size=args.batch_size, guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps, height=args.resolution,
            width=args.resolution)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if made["manifest"]:
        print(f"wrote the concepts {', '.join(made['forget'])} to {out} and their manifest "
              f"{made['manifest']} (train_munba_sd.py --forget_manifest), D_r to {made['retain']}")
    else:
        print(f"wrote the forget images to {made['forget']} and the retain images to "
              f"{made['retain']}")

if __name__ == "__main__":
    main()
