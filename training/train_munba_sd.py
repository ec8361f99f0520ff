#!/usr/bin/env python
"""MUNBa concept / class unlearning for Stable Diffusion (diffusers example style).

    accelerate launch training/train_munba_sd.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --forget_data_dir data/forget --retain_data_dir data/retain \
      --output_dir sd-munba-nudity --train_params noxattn --learning_rate 1e-5 \
      --train_batch_size 4 --num_train_epochs 1

Each optimizer step runs two backward passes (retain player, forget player) into a
``NashBargainer``, which writes their Nash bargaining direction into ``.grad``; then clip, step.
All logic a user may want elsewhere lives in ``hf_munba`` (sd_data, sd_params, sd_unlearning,
sd_export, model_card); this file wires it together top to bottom.
"""

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from hf_munba.diffusion.data import (DataValidationError, PairedUnlearningDataset, LatentCache,
                              check_cacheable, check_disjoint, class_prompts, load_hub_dataset,
                              load_imagefolder, remap_class)
from hf_munba.diffusion.objectives import FORGET_OBJECTIVES, TARGET_MODELS
from hf_munba.utils.atomic_save import ensure_output_dir
from hf_munba.diffusion.inputs import (CHECKPOINT_RE, LR_SCHEDULERS, check_pretrained_pipeline,
                                checkpoint_step, resolve_checkpoint)
from hf_munba.diffusion.params import TEXT_ENCODER_SUBSETS, UNET_SUBSETS

logger = logging.getLogger("train_munba_sd")
DEFAULT_FORGET_PROMPTS = ["nudity", "naked", "erotic", "sexual"]


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None and False (a flag's help says what unset means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block of 70 flags would bury the message."""

    def error(self, message):
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(description="MUNBa unlearning for Stable Diffusion.",
                formatter_class=_DefaultsFormatter)
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", required=True,
      help="a diffusers Stable Diffusion 1.x/2.x pipeline: a Hub repo id (org/name) or a local "
           "folder with model_index.json")
    a("--revision", default=None, help="Hub revision (branch, tag or commit) of the base pipeline")
    a("--variant", default=None, help='weight file variant of the base pipeline, e.g. "fp16"')
    a("--cache_dir", default=None,
      help="where downloaded models and datasets are cached (default: the Hugging Face caches)")
    a("--output_dir", default="sd-munba-model",
      help="where the unlearned model, model card, logs and checkpoints are written")
    a("--overwrite_output_dir", action="store_true",
      help="replace a non-empty output_dir (its old checkpoint-* folders are deleted at start)")
    a("--seed", type=int, default=0,
      help="seeds the data order, augmentation, noise and timesteps: the same seed gives the same run")
    # data
    a("--forget_data_dir", default=None, help="imagefolder (images + metadata.jsonl) of D_f")
    a("--retain_data_dir", default=None, help="imagefolder (images + metadata.jsonl) of D_r")
    a("--forget_dataset_name", default=None, help="a datasets name/path for D_f")
    a("--retain_dataset_name", default=None, help="a datasets name/path for D_r")
    a("--dataset_split", default="train", help="split of --forget/--retain_dataset_name")
    a("--image_column", default="image", help="image column of the datasets")
    a("--caption_column", default="text", help="caption column of the datasets / metadata.jsonl")
    a("--forget_prompts", nargs="+", default=None,
      help="prompts the forget player conditions on (cycled); default: the D_f captions")
    a("--anchor_prompt", default="a photo of a person wearing clothes",
      help="remap target prompt: the forget prompts should behave like this one")
    a("--class_names", nargs="+", default=None,
      help="class-wise unlearning: all class names (the paper: the 10 Imagenette classes)")
    a("--forget_class", default=None, help="class-wise: the class to forget")
    a("--remap_class", default=None, help="class-wise: class to remap to (default: the next one)")
    a("--prompt_template", default="an image of a {}", help="class-wise prompt template")
    a("--resolution", type=int, default=512,
      help="training image size: the shorter side is resized to it, then a square is cropped")
    a("--center_crop", action="store_true",
      help="crop the centre of each image (default, as in diffusers: a random crop, seeded per "
           "item; a square image has one crop position either way)")
    a("--random_flip", action="store_true",
      help="flip each image horizontally with probability 1/2 (seeded per item; with "
           "--cache_latents both orientations are cached)")
    a("--cache_latents", action="store_true",
      help="encode D_f/D_r latents (and prompt embeddings when the UNet is trained) once; "
           "a non-square image needs --center_crop (random crops cannot be cached)")
    a("--dataloader_num_workers", type=int, default=0,
      help="DataLoader worker processes (0: load in the main process)")
    # unlearning
    a("--method", choices=("munba", "munba-paper", "weighted"), default="munba",
      help="munba: Nash bargaining with the satisfied-forget-player rule (the recommended "
           "configuration; see --forget_target); munba-paper: the paper's plain rule (equal "
           "powers, no target); weighted: L_r + lambda L_f")
    a("--forget_weight", type=float, default=1.0, help="lambda of --method weighted: L_r + lambda L_f")
    a("--forget_objective", choices=FORGET_OBJECTIVES, default="remap",
      help="remap: the forget prompts' prediction onto the anchor's; ga: gradient ascent on the "
           "denoising loss of D_f; esd: ESD negative guidance")
    a("--target_model", choices=TARGET_MODELS, default="current",
      help="model giving the remap/esd target: the current weights or the frozen original "
           "(ignored by ga, which has no target)")
    a("--negative_guidance", type=float, default=1.0, help="eta of --forget_objective esd")
    a("--train_component", choices=("unet", "text_encoder"), default="unet",
      help="which network is edited")
    a("--train_params", choices=UNET_SUBSETS, default="noxattn",
      help="parameter subset (text encoder: full or selfattn)")
    a("--use_lora", action="store_true",
      help="train a peft LoRA adapter on the subset's attention projections instead of the weights")
    a("--rank", type=int, default=4, help="LoRA rank")
    a("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    a("--fuse_lora", action="store_true", help="also write the LoRA-fused full pipeline")
    a("--opposed_tol", type=float, default=1e-4,
      help="MUNBa: when 1 + cos(g_r, g_f) is below this, no direction helps both players and the "
           "step follows the retain gradient")
    # bargaining power and the satisfied forget player (--method munba)
    a("--bargaining_power_forget", type=float, default=1.0,
      help="the forget player's bargaining power w_f (retain has 1) while it is not satisfied; "
           "only the ratio matters (hf_munba.bargaining)")
    a("--forget_target", type=float, default=None,
      help="the forget player is satisfied (its power drops to --satisfied_power_forget) once an "
           "EMA of its loss is at or below this target; default per objective: 0.25 relative for "
           "remap and esd, none for ga")
    a("--forget_target_mode", choices=("relative", "absolute"), default=None,
      help="relative: the target is a fraction of the mean loss of the first "
           "--forget_target_reference_steps steps (scale-free; the default); absolute: a loss value")
    a("--forget_target_ema", type=float, default=0.9,
      help="smoothing of the forget loss before it is compared with the target, in [0, 1)")
    a("--forget_target_hysteresis", type=float, default=1.5,
      help="a satisfied forget player comes back when the EMA exceeds this factor times the target")
    a("--forget_target_reference_steps", type=int, default=1,
      help="relative targets: how many first steps' losses make the reference")
    a("--satisfied_power_forget", type=float, default=0.01,
      help="the forget player's power while satisfied (default 0.01: the step follows retain "
           "without undoing the forgetting to first order; 0 = it leaves the game and the step "
           "follows the retain gradient alone)")
    a("--max_consecutive_skips", type=int, default=10,
      help="stop the run after this many optimizer steps in a row were skipped for non-finite "
           "losses or gradients")
    # optimisation
    a("--train_batch_size", type=int, default=4, help="forget/retain pairs per device and micro-batch")
    a("--num_train_epochs", type=int, default=1, help="passes over D_r")
    a("--max_train_steps", type=int, default=None,
      help="optimizer steps (overrides --num_train_epochs)")
    a("--gradient_accumulation_steps", type=int, default=1,
      help="micro-batches per optimizer step (bargaining happens once per step)")
    a("--gradient_checkpointing", action="store_true",
      help="recompute activations in the backward pass to save memory")
    a("--learning_rate", type=float, default=1e-5, help="AdamW learning rate")
    a("--scale_lr", action="store_true",
      help="multiply the learning rate by accumulation steps x batch size x processes")
    a("--lr_scheduler", default="constant", choices=LR_SCHEDULERS,
      help="diffusers learning-rate schedule")
    a("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    a("--adam_weight_decay", type=float, default=0.0, help="AdamW (decoupled) weight decay")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    a("--max_grad_norm", type=float, default=1.0,
      help="gradient clipping norm (a bargained direction has norm sqrt(2), so 1.0 always binds)")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
      help="compute dtype (default: the accelerate config's)")
    a("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    # logging, checkpoints, validation
    a("--report_to", default=None,
      help='tracker(s) for accelerate: tensorboard, wandb, comet_ml, all or none '
           '(default: tensorboard if installed, else none; history.jsonl and a PNG are always written)')
    a("--tracker_project_name", default="munba-sd",
      help="project name given to the trackers (accelerate init_trackers)")
    a("--logging_dir", default="logs", help="tracker log folder, inside output_dir")
    a("--checkpointing_steps", type=int, default=500,
      help="save a resumable checkpoint-N every this many optimizer steps")
    a("--checkpoints_total_limit", type=int, default=None,
      help="keep at most this many checkpoints (oldest deleted)")
    a("--resume_from_checkpoint", default=None,
      help='"latest" (the highest output_dir/checkpoint-N) or a checkpoint folder this script saved')
    a("--validation_prompts", nargs="+", default=None,
      help="prompts to generate images of during training and at the end (validation grid)")
    a("--validation_steps", type=int, default=None,
      help="generate the validation images every this many optimizer steps")
    a("--validation_epochs", type=int, default=None,
      help="generate the validation images at the end of every this many epochs")
    a("--num_validation_images", type=int, default=1, help="validation images per prompt")
    a("--validation_inference_steps", type=int, default=25,
      help="denoising steps of the validation images")
    a("--eval_batches", type=int, default=2,
      help="batches for the before/after forget and retain losses in the model card")
    a("--model_card_metrics", default=None,
      help="a JSON file of extra metrics (e.g. from the evaluation suite) for the model card")
    # hub
    a("--push_to_hub", action="store_true",
      help="upload the output folder to the Hub (access and token are checked before training)")
    a("--hub_model_id", default=None, help="Hub repo to push to, e.g. your-name/sd-munba-nudity")
    a("--hub_token", default=None,
      help="Hub token (default: the saved login); never logged or saved")
    a("--hub_private_repo", action="store_true", help="create the Hub repo as private")
    return p.parse_args(argv)


def fail(message):
    """One clear message, no traceback, before anything was loaded or written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def vae_scale_factor(args):
    """2 ** (number of VAE blocks - 1), from the VAE config only (no weights are loaded)."""
    from diffusers import AutoencoderKL

    try:
        cfg = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae",
                                        revision=args.revision, cache_dir=args.cache_dir)
    except Exception as e:
        fail(f"cannot read the VAE config of {args.pretrained_model_name_or_path}: {e}")
    return 2 ** (len(cfg.get("block_out_channels", [0])) - 1)


def check_args(args):
    """Every argument check that needs no model; returns (forget, retain) data sources."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        fail("DeepSpeed is not supported: its backward pass also steps the optimizer, but MUNBa "
             "needs two backward passes (retain, forget) per step. Use DDP (multi-GPU `accelerate "
             "config` without DeepSpeed).")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fail("FSDP is not supported by this script yet (sharded gradients need a Gram all-reduce); "
             "use DDP.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("--mixed_precision fp16 needs a CUDA GPU (none found); use bf16 or no")
    if args.use_lora and args.rank < 1:
        fail(f"--rank must be a positive integer, got {args.rank}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        fail(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if args.fuse_lora and not args.use_lora:
        fail("--fuse_lora needs --use_lora")
    if args.train_component == "text_encoder" and args.train_params not in TEXT_ENCODER_SUBSETS:
        fail(f"--train_params {args.train_params} is a UNet subset; with --train_component "
             f"text_encoder use one of {TEXT_ENCODER_SUBSETS}")
    for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                 "checkpointing_steps", "max_consecutive_skips", "num_validation_images"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("validation_steps", "validation_epochs", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")

    if args.max_train_steps is not None and args.max_train_steps < 1:
        fail(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.learning_rate <= 0:
        fail(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.method == "weighted" and args.forget_weight < 0:
        fail(f"--forget_weight must be >= 0, got {args.forget_weight}")
    if args.resolution < 1:
        fail(f"--resolution must be positive, got {args.resolution}")
    check_bargaining_args(args)
    import importlib.util

    if args.report_to is None:
        args.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    for tracker in args.report_to.split(","):
        if tracker in ("tensorboard", "wandb", "comet_ml", "mlflow") and \
                importlib.util.find_spec(tracker) is None:
            fail(f"--report_to {tracker}: the {tracker} package is not installed "
                 f"(pip install {tracker}, or --report_to none)")
    if args.model_card_metrics is not None:
        try:
            extra = json.loads(Path(args.model_card_metrics).read_text())
        except (OSError, ValueError) as e:
            fail(f"--model_card_metrics {args.model_card_metrics}: cannot read a JSON object ({e})")
        if not isinstance(extra, dict):
            fail(f"--model_card_metrics {args.model_card_metrics} must hold a JSON object")
        args.extra_metrics = extra
    if args.push_to_hub and not args.hub_model_id:
        fail("--push_to_hub needs --hub_model_id (e.g. your-name/sd-munba-nudity)")
    if args.class_names is not None:
        if len(args.class_names) < 2:
            fail("--class_names needs at least two classes")
        if args.forget_class is None:
            fail("--class_names needs --forget_class")
        try:
            target = remap_class(args.class_names, args.forget_class, args.remap_class)
            class_prompts(args.class_names, args.prompt_template)
        except ValueError as e:
            fail(str(e))
        args.anchor_prompt = args.prompt_template.format(target)
        if args.forget_prompts is None:
            args.forget_prompts = [args.prompt_template.format(args.forget_class)]
    elif args.forget_class is not None:
        fail("--forget_class needs --class_names")
    try:
        resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    except ValueError as e:
        fail(str(e))
    try:
        ensure_output_dir(args.output_dir, args.overwrite_output_dir,
                          allow_existing=bool(args.resume_from_checkpoint), check_only=True)
    except ValueError as e:
        fail(str(e))
    sources = {}
    for role in ("forget", "retain"):
        folder, name = getattr(args, f"{role}_data_dir"), getattr(args, f"{role}_dataset_name")
        if (folder is None) == (name is None):
            fail(f"give exactly one of --{role}_data_dir and --{role}_dataset_name")
        try:
            if folder is not None:
                sources[role] = load_imagefolder(folder, args.caption_column, role=role)
            else:
                sources[role] = load_hub_dataset(name, args.image_column, args.caption_column,
                                                 split=args.dataset_split, role=role,
                                                 **({"cache_dir": args.cache_dir}
                                                    if args.cache_dir else {}))
        except DataValidationError as e:
            fail(str(e))
    try:
        check_disjoint(sources["forget"], sources["retain"])
    except DataValidationError as e:
        fail(str(e))
    if args.cache_latents:
        try:
            check_cacheable(sources.values(), args.center_crop)
        except ValueError as e:
            fail(f"--cache_latents: {e}")
    try:  # no Hub retries for a mistyped local path, no output dir for a non-pipeline folder
        check_pretrained_pipeline(args.pretrained_model_name_or_path)
    except ValueError as e:
        fail(str(e))
    if args.pretrained_model_name_or_path.startswith("~"):  # from_pretrained does not expand it
        args.pretrained_model_name_or_path = os.path.expanduser(args.pretrained_model_name_or_path)
    factor = vae_scale_factor(args)
    if args.resolution % factor:
        fail(f"--resolution {args.resolution} is not divisible by the VAE down-sampling factor "
             f"{factor}")
    if args.push_to_hub:  # last: the only check that needs the network
        from hf_munba.utils.model_card import HubAccessError, check_hub_access

        try:
            check_hub_access(args.hub_model_id, args.hub_token)
        except HubAccessError as e:
            fail(str(e))
    return sources["forget"], sources["retain"]


def check_bargaining_args(args):
    """Bargaining power and satisfied-player options; builds ``args.forget_rule`` (or None)."""
    from hf_munba.bargaining import build_forget_rule

    args.forget_rule = None
    if args.method != "munba":
        changed = [f for f, d in (("bargaining_power_forget", 1.0), ("forget_target", None),
                                  ("forget_target_mode", None)) if getattr(args, f) != d]
        if changed:
            fail(f"--{changed[0]} applies to --method munba only (munba-paper is the paper's "
                 f"plain rule, weighted has no bargaining)")
        return
    try:
        args.forget_rule = build_forget_rule(
            args.forget_objective, target=args.forget_target, mode=args.forget_target_mode,
            ema=args.forget_target_ema, hysteresis=args.forget_target_hysteresis,
            reference_steps=args.forget_target_reference_steps,
            satisfied_power=args.satisfied_power_forget, power=args.bargaining_power_forget)
    except ValueError as e:
        fail(f"forget target options: {e}")
    if args.forget_rule is None and not (math.isfinite(args.bargaining_power_forget)
                                         and args.bargaining_power_forget > 0):
        fail(f"--bargaining_power_forget must be positive, got {args.bargaining_power_forget}")


def main(argv=None):
    args = parse_args(argv)
    forget_src, retain_src = check_args(args)

    # Heavy imports only after the inputs are known to be good.
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import (DataLoaderConfiguration, DistributedType, ProjectConfiguration,
                                  set_seed)
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    from hf_munba import NashBargainer
    from hf_munba.bargaining import BargainingStatus
    from hf_munba.utils.model_card import (public_hparams, push_folder_to_hub, sd_model_card,
                                     tracker_hparams)
    from hf_munba.diffusion.export import commit_staged, save_full_pipeline, save_lora, staged_output
    from hf_munba.diffusion.params import (add_lora_adapter, enable_gradient_checkpointing, freeze_all_but,
                                    select_parameter_names)
    from hf_munba.diffusion.unlearner import SDUnlearner, unwrap
    from hf_munba.unlearning.step import SkippedStepGuard, TooManySkippedSteps, guarded_step
    from hf_munba.utils.training_plot import plot_training_history

    log = get_logger("train_munba_sd", log_level="INFO")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir,
                                                                     args.logging_dir)),
        # with pinned batches (below), host-to-device copies do not wait for the GPU
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        fail(f"{accelerator.distributed_type.value} is not supported (MUNBa needs two backward "
             "passes per optimizer step); use DDP")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=logging.INFO)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for old in out.glob("checkpoint-*"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()

    # ---- models --------------------------------------------------------------------------------
    path, rev, var = args.pretrained_model_name_or_path, args.revision, args.variant
    cache = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev, **cache)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev,
                                                    **cache)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                 variant=var, **cache)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=var, **cache)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var,
                                                **cache)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                       torch.float32)
    on_unet = args.train_component == "unet"
    trained = unet if on_unet else text_encoder
    frozen_copy = None
    if args.target_model == "frozen" and args.forget_objective == "ga":
        log.warning("--target_model frozen has no effect with --forget_objective ga (no target)")
    if args.target_model == "frozen" and not args.use_lora and args.forget_objective != "ga":
        frozen_copy = copy.deepcopy(trained).eval().requires_grad_(False)
    if args.use_lora:
        params = add_lora_adapter(trained, rank=args.rank, alpha=args.lora_alpha,
                                  subset=args.train_params, component=args.train_component)
    else:
        params = freeze_all_but(trained, select_parameter_names(trained, args.train_params,
                                                                args.train_component))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    # Frozen modules in the compute dtype; trained ones stay fp32 (LoRA params upcast).
    vae.to(accelerator.device, dtype=weight_dtype)
    (text_encoder if on_unet else unet).to(accelerator.device, dtype=weight_dtype)
    trained.to(accelerator.device, dtype=weight_dtype if args.use_lora else torch.float32)
    if frozen_copy is not None:
        frozen_copy.to(accelerator.device, dtype=weight_dtype)
    if args.use_lora and weight_dtype != torch.float32:
        cast_training_params(trained, dtype=torch.float32)
    n_trainable = sum(p.numel() for p in params)
    log.info(f"training {n_trainable:,} parameters of the {args.train_component} "
             f"({'LoRA rank %d' % args.rank if args.use_lora else args.train_params})",
             main_process_only=True)

    if args.scale_lr:
        args.learning_rate *= (args.gradient_accumulation_steps * args.train_batch_size
                               * accelerator.num_processes)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # ---- data ----------------------------------------------------------------------------------
    dataset = PairedUnlearningDataset(forget_src, retain_src, tokenizer, args.resolution,
                                      anchor_prompt=args.anchor_prompt, seed=args.seed,
                                      forget_prompts=args.forget_prompts,
                                      center_crop=args.center_crop, random_flip=args.random_flip)
    if args.cache_latents:
        dataset.cache = LatentCache().build(dataset, vae, text_encoder if on_unet else None,
                                            batch_size=args.train_batch_size)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=False,
        num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG out of it
    eval_items = [dataset[i] for i in range(min(len(dataset),
                                                args.eval_batches * args.train_batch_size))]
    eval_batches = [torch.utils.data.default_collate(eval_items[s:s + args.train_batch_size])
                    for s in range(0, len(eval_items), args.train_batch_size)]

    updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes)
                                  / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    trained, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        trained, optimizer, train_dataloader, lr_scheduler)
    if on_unet:
        unet = trained
    else:
        text_encoder = trained
    unlearner = SDUnlearner(
        unet, text_encoder, vae, noise_scheduler, forget_objective=args.forget_objective,
        target_model=args.target_model, train_component=args.train_component,
        lora=args.use_lora, negative_guidance=args.negative_guidance,
        frozen_unet=frozen_copy if on_unet else None,
        frozen_text_encoder=None if on_unet else frozen_copy, weight_dtype=weight_dtype,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    bargainer = (NashBargainer(params, num_players=2, fallback_player=0,
                               opposed_tol=args.opposed_tol)
                 if args.method in ("munba", "munba-paper") else None)
    forget_rule = args.forget_rule  # None: equal (or fixed) powers every step
    guard = SkippedStepGuard(args.max_consecutive_skips)
    history = []

    # ---- checkpoint hooks: the trained weights as safetensors, plus our counters as JSON ----------
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                m = unwrap(model)
                if args.use_lora:
                    save_lora(output_dir, **{args.train_component: m})
                else:
                    m.save_pretrained(os.path.join(output_dir, args.train_component),
                                      safe_serialization=True)
                weights.pop()
            state = {"global_step": history[-1]["step"] if history else 0,  # read on resume
                     "guard": guard.state_dict(), "history": history, "metrics": metrics,
                     "bargainer": None if bargainer is None else {
                         "num_steps": bargainer.num_steps, "num_skipped": bargainer.num_skipped,
                         "num_fallbacks": bargainer.num_fallbacks},
                     "forget_rule": None if forget_rule is None else forget_rule.state_dict()}
            Path(output_dir, "munba_state.json").write_text(json.dumps(state))

    def load_model_hook(models, input_dir):
        while models:
            m = unwrap(models.pop())
            if args.use_lora:
                lora_sd, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
                if on_unet:
                    sd = {k[len("unet."):]: v for k, v in lora_sd.items() if k.startswith("unet.")}
                    set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(sd),
                                              adapter_name="default")
                else:
                    _set_state_dict_into_text_encoder(lora_sd, prefix="text_encoder.",
                                                      text_encoder=m)
            else:
                cls = UNet2DConditionModel if on_unet else CLIPTextModel
                loaded = cls.from_pretrained(input_dir, subfolder=args.train_component)
                m.load_state_dict(loaded.state_dict())
                del loaded
        state = json.loads(Path(input_dir, "munba_state.json").read_text())
        guard.load_state_dict(state["guard"])
        history[:] = state["history"]
        metrics.update(state["metrics"])
        if bargainer is not None and state["bargainer"]:
            for k, v in state["bargainer"].items():
                setattr(bargainer, k, v)
        if forget_rule is not None and state.get("forget_rule"):
            forget_rule.load_state_dict(state["forget_rule"])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_hparams(vars(args)))

    # Forget / retain losses of the base model on fixed batches and noise (the RNG is untouched);
    # a resumed run takes them from its checkpoint.
    metrics = {f"before/{k}": v for k, v in unlearner.evaluate(eval_batches, args.seed).items()}

    # ---- resume --------------------------------------------------------------------------------
    global_step, first_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        ckpt = resolve_checkpoint(args.resume_from_checkpoint, out)  # checked in check_args
        if ckpt is None:
            log.info("no checkpoint found in the output directory; starting a new run")
        else:
            log.info(f"resuming from {ckpt}")
            accelerator.load_state(str(ckpt))
            global_step = checkpoint_step(ckpt)  # recorded in it: any folder name works
            first_epoch = global_step // updates_per_epoch
            resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    def save_checkpoint(step):
        if accelerator.is_main_process and args.checkpoints_total_limit is not None:
            old = sorted((int(CHECKPOINT_RE.match(d.name).group(1)), d) for d in out.iterdir()
                         if d.is_dir() and CHECKPOINT_RE.match(d.name))
            for _, d in old[:max(0, len(old) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(d)
        staging = out / f".checkpoint-{step}.partial"
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while saving
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))  # every rank saves its RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = out / f"checkpoint-{step}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)  # only complete checkpoints are ever called checkpoint-N
            log.info(f"saved {final}")
        accelerator.wait_for_everyone()

    def validation_pipeline():
        return StableDiffusionPipeline.from_pretrained(
            path, unet=unwrap(unet), text_encoder=unwrap(text_encoder), vae=vae, tokenizer=tokenizer,
            revision=rev, variant=var, safety_checker=None, requires_safety_checker=False, **cache,
            dtype=weight_dtype).to(accelerator.device)

    def run_validation(step):
        from hf_munba.diffusion.generation import generate_images

        folder = out / "validation" / f"step-{step:06d}"
        pipe = validation_pipeline()
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            recs = generate_images(pipe, args.validation_prompts, folder,
                                   num_images_per_prompt=args.num_validation_images,
                                   seed=args.seed, batch_size=args.train_batch_size,
                                   num_inference_steps=args.validation_inference_steps,
                                   height=args.resolution, width=args.resolution, progress=False)
        del pipe
        log_validation_images(accelerator, folder, recs, step)
        return folder, recs

    # ---- train ---------------------------------------------------------------------------------
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    log.info(f"D_f: {len(forget_src)} images, D_r: {len(retain_src)} images; {args.max_train_steps} "
             f"optimizer steps of {total_batch} pairs; method {args.method}, objective "
             f"{args.forget_objective}")
    log.info(f"before unlearning: {metrics}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    scaler = getattr(accelerator, "scaler", None)
    acc_t = torch.zeros(2, device=accelerator.device)
    try:
        for epoch in range(first_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps:
                break
            dataset.set_pairing_epoch(epoch)
            trained.train()
            loader = train_dataloader
            if epoch == first_epoch and resume_batches:
                loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            for batch in loader:
                with accelerator.accumulate(trained):
                    if bargainer is not None:
                        with bargainer.player(0):
                            loss_r = unlearner.retain_loss(batch)
                            accelerator.backward(loss_r)
                        with bargainer.player(1):
                            loss_f = unlearner.forget_loss(batch)
                            accelerator.backward(loss_f)
                    else:
                        loss_r, loss_f = unlearner.losses(batch)
                        accelerator.backward(loss_r + args.forget_weight * loss_f)
                    # kept on the device: one host sync per optimizer step, not per backward
                    acc_t = acc_t + torch.stack([loss_r.detach().float(), loss_f.detach().float()]
                                                ) / args.gradient_accumulation_steps
                    if accelerator.sync_gradients:
                        # the mean over ranks: what is logged and what decides a skip is global
                        if accelerator.num_processes > 1:
                            acc_t = accelerator.reduce(acc_t, "mean")
                        acc = dict(zip(("loss/retain", "loss/forget"), acc_t.tolist()))
                        logs = {}
                        nonfinite = not all(math.isfinite(v) for v in acc.values())
                        if bargainer is not None:
                            # one decision per optimizer step, on the loss averaged over
                            # micro-batches and ranks (acc): every rank decides the same
                            powers = None
                            if forget_rule is not None:
                                powers = [1.0, forget_rule.update(acc["loss/forget"])]
                            elif args.bargaining_power_forget != 1.0:
                                powers = [1.0, args.bargaining_power_forget]
                            stats = bargainer.combine(
                                grad_scale=scaler.get_scale() if scaler is not None else None,
                                powers=powers)
                            logs.update(stats.to_log_dict())
                            if forget_rule is not None:
                                logs.update(forget_rule.log_dict())
                            nonfinite = nonfinite or stats.status is BargainingStatus.NONFINITE
                            skip = stats.skipped or nonfinite
                        else:
                            skip = nonfinite
                        # a skipped step leaves weights, Adam state and the schedule untouched
                        stepped, norm = guarded_step(
                            optimizer, lr_scheduler, skip=skip, nonfinite=nonfinite, scaler=scaler,
                            clip=lambda: accelerator.clip_grad_norm_(params, args.max_grad_norm))
                        skipped = not stepped
                        if stepped:
                            logs["grad_norm"] = norm
                        optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                logs.update(acc)
                logs.update({"lr": lr_scheduler.get_last_lr()[0], "step_skipped": float(skipped),
                             "skipped_steps": guard.total + int(skipped)})
                acc_t = torch.zeros(2, device=accelerator.device)
                history.append({"step": global_step, **logs})
                accelerator.log(logs, step=global_step)
                progress.set_postfix(**{k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                        if k in ("loss/retain", "loss/forget", "munba/cos")})
                if skipped:
                    log.warning(f"step {global_step}: non-finite loss or gradient, update skipped "
                                f"({guard.total + 1} skipped so far)")
                guard.record(skipped, global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(global_step)
                if (args.validation_prompts and args.validation_steps
                        and global_step % args.validation_steps == 0
                        and accelerator.is_main_process):
                    run_validation(global_step)
                if global_step >= args.max_train_steps:
                    break
            # end of an epoch; not when the step just did it, nor at the end (the final save does)
            if (args.validation_prompts and args.validation_epochs
                    and (epoch + 1) % args.validation_epochs == 0 and accelerator.is_main_process
                    and global_step < args.max_train_steps
                    and not (args.validation_steps and global_step % args.validation_steps == 0)):
                run_validation(global_step)
    except TooManySkippedSteps as e:
        accelerator.end_training()
        fail(str(e))
    progress.close()

    # ---- final save ----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    metrics.update({f"after/{k}": v for k, v in unlearner.evaluate(eval_batches, args.seed).items()})
    metrics["skipped_steps"] = guard.total
    if bargainer is not None:
        metrics["bargaining_fallback_steps"] = bargainer.num_fallbacks
    if forget_rule is not None:
        metrics["forget_times_satisfied"] = forget_rule.times_satisfied
        metrics["forget_satisfied_at_end"] = forget_rule.satisfied
    log.info(f"after unlearning: {metrics}")
    if accelerator.is_main_process:
        final = unwrap(trained)
        with staged_output(out) as tmp:
            if args.use_lora:
                final_lora = final.to(torch.float32)
                save_lora(tmp, **{args.train_component: final_lora})
                if args.fuse_lora:
                    pipe = StableDiffusionPipeline.from_pretrained(path, revision=rev, variant=var,
                                                                   **cache)
                    pipe.load_lora_weights(str(tmp))
                    pipe.fuse_lora()
                    pipe.unload_lora_weights()
                    save_full_pipeline(pipe, tmp)
                    del pipe
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, revision=rev, variant=var, **cache,
                    **{args.train_component: final.to(torch.float32)})
                save_full_pipeline(pipe, tmp)
                del pipe
            grid = None
            if args.validation_prompts:
                folder, recs = run_validation(global_step)
                grid = "validation_grid.png"
                make_grid(folder, recs, tmp / grid)
            try:
                plot_training_history(history, tmp / "training_curves.png")
            except ImportError as e:
                log.warning(f"no training plot: {e}")
            (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
            (tmp / "training_args.json").write_text(json.dumps(public_hparams(vars(args)), indent=2))
            forgotten = args.forget_prompts or sorted(set(forget_src.captions))[:10]
            if args.class_names:
                forgotten = [f"class '{args.forget_class}' (remapped to "
                             f"'{args.anchor_prompt}')"]
            card_metrics = {**metrics, **getattr(args, "extra_metrics", {})}
            card = sd_model_card(base_model=path, forgotten=forgotten,
                                 retained=sorted(set(retain_src.captions))[:10],
                                 hparams=vars(args), metrics=card_metrics, image_grid=grid,
                                 lora=args.use_lora and not args.fuse_lora,
                                 repo_id=args.hub_model_id, objective=objective_text(args),
                                 model_name=(args.hub_model_id.split("/")[-1] if args.hub_model_id
                                             else f"{Path(path).name}-munba"),
                                 forget_data=args.forget_data_dir or args.forget_dataset_name,
                                 retain_data=args.retain_data_dir or args.retain_dataset_name)
            card.save(str(tmp / "README.md"))
            (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
            commit_staged(tmp, out)
        log.info(f"saved the unlearned model to {out}")
        if args.push_to_hub:
            repo = push_folder_to_hub(out, args.hub_model_id, token=args.hub_token,
                                      private=args.hub_private_repo)
            log.info(f"pushed to https://huggingface.co/{repo}")
    accelerator.end_training()


def objective_text(args):
    """One line for the model card: how the forget player was trained."""
    what = {"remap": f"remap the forget prompts onto `{args.anchor_prompt}`",
            "ga": "gradient ascent on the denoising loss of the forget set",
            "esd": f"ESD negative guidance (eta = {args.negative_guidance})"}[args.forget_objective]
    how = ("MUNBa (Nash bargaining of the retain and forget gradients)"
           if args.method in ("munba", "munba-paper") else f"weighted sum L_r + {args.forget_weight} L_f")
    if getattr(args, "forget_rule", None) is not None:
        how += f"; the forget player leaves once satisfied ({args.forget_rule!r})"
    trained = (f"LoRA rank {args.rank} on the {args.train_component} ({args.train_params})"
               if args.use_lora else f"{args.train_component} parameters: {args.train_params}")
    return f"{what}; {how}; {trained}; target model: {args.target_model}."


def log_validation_images(accelerator, folder, records, step):
    """Send the validation images to the trackers that take images."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(Path(folder) / r["file_name"]).convert("RGB")) for r in records]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(images), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=r["text"])
                                        for im, r in zip(images, records)]}, step=step)


def make_grid(folder, records, path):
    """One row per prompt of the validation images."""
    from PIL import Image

    rows = {}
    for r in records:
        rows.setdefault(r["prompt_index"], []).append(Image.open(Path(folder) / r["file_name"]))
    w, h = next(iter(rows.values()))[0].size
    cols = max(len(v) for v in rows.values())
    grid = Image.new("RGB", (cols * w, len(rows) * h))
    for i, (_, imgs) in enumerate(sorted(rows.items())):
        for j, im in enumerate(imgs):
            grid.paste(im.convert("RGB"), (j * w, i * h))
    grid.save(path)


if __name__ == "__main__":
    main()
