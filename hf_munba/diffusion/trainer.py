"""The SD unlearning loop as a library function: ``train(SDUnlearningConfig(...)) -> output folder``.

This is everything ``training/train_munba_sd.py`` does after parsing, so a notebook, a sweep or an
experiment runs exactly what the command line runs::

    from hf_munba.diffusion import SDUnlearningConfig, train

    out = train(SDUnlearningConfig(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
                                   forget_data_dir="data/forget", retain_data_dir="data/retain",
                                   output_dir="sd-munba-nudity"))

Order of work, and why:

1. :func:`check_inputs` reads the data folders, the base pipeline's folder and the output folder
   before any model is loaded or anything is written, so a bad input costs seconds and leaves no
   half-made output (one ``InputError`` line each).
2. The method comes from the registry (:mod:`hf_munba.unlearning.methods`): its players (retain,
   forget, or one of them), its weighting (Nash bargaining or a constant weighted sum, both in one
   :class:`~hf_munba.bargaining.NashBargainer`), its bargaining powers and forget rule. Each player
   runs its loss and backward pass inside ``bargainer.player(i)``; once per optimizer step
   :func:`~hf_munba.unlearning.unlearning_step` combines, clips and steps (or skips, bitwise).
3. Checkpoints are accelerate ``save_state`` folders with the trained weights as safetensors (the
   save/load hooks) and our counters as JSON. Each is written into a staging folder and renamed,
   so only complete ones are ever called ``checkpoint-N``; resuming skips the batches already seen
   (the data of step k is a pure function of k), so a SIGKILLed run resumes bitwise.
4. The final model (pipeline, or LoRA weights and optionally the fused pipeline), the validation
   grid, curves, metrics and the model card are written to a staging folder and moved in with the
   loadable markers last (:func:`hf_munba.utils.atomic_save.staged_output`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .config import SDUnlearningConfig

__all__ = ["train", "check_inputs", "InputError", "objective_text", "model_card_metrics",
           "backward_players", "validation_grid"]

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A problem with the run's inputs, found before (or instead of) any training: one line."""


def model_card_metrics(config: SDUnlearningConfig) -> Dict:
    """The extra metrics of ``--model_card_metrics`` (a JSON object), or {}."""
    if config.model_card_metrics is None:
        return {}
    try:
        extra = json.loads(Path(config.model_card_metrics).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--model_card_metrics {config.model_card_metrics}: cannot read a JSON "
                         f"object ({e})") from None
    if not isinstance(extra, dict):
        raise InputError(f"--model_card_metrics {config.model_card_metrics} must hold a JSON object")
    return extra


def check_family(config: SDUnlearningConfig):
    """The pipeline's family, read once from its configs (no weights); refuses a resolution,
    a component or a LoRA it cannot train."""
    from .export import lora_components
    from .families import FluxFamily, detect_family

    try:
        family = detect_family(config.pretrained_model_name_or_path, revision=config.revision,
                               cache_dir=config.cache_dir)
    except ValueError as e:
        raise InputError(f"--pretrained_model_name_or_path: {e}") from None
    except Exception as e:  # a Hub id offline, a broken folder
        raise InputError(f"cannot read the pipeline configs of "
                         f"{config.pretrained_model_name_or_path}: {e}") from None
    vae_factor = family.vae_scale
    if config.resolution % vae_factor:
        raise InputError(f"--resolution {config.resolution} is not divisible by the VAE "
                         f"down-sampling factor {vae_factor}")
    names = [s.encoder for s in family.text_encoders]
    component = family.component_name(config.train_component)
    if component is None:
        raise InputError(f"--train_component {config.train_component}: a {family.name} pipeline "
                         f"has the denoiser ('unet' or its own name '{family.denoiser}') and the "
                         f"text encoders {names}")
    if config.use_lora and component not in lora_components(family.pipeline_class):
        raise InputError(f"--use_lora on {component}: {family.pipeline_class.__name__} loads "
                         f"LoRA for {list(lora_components(family.pipeline_class))} only (diffusers "
                         "saves no T5 LoRA); train it without --use_lora")
    if isinstance(family, FluxFamily) and config.resolution % (2 * vae_factor):
        raise InputError(f"--resolution {config.resolution}: Flux packs 2x2 latent patches, so "
                         f"it must be divisible by {2 * vae_factor}")
    return family


def check_inputs(config: SDUnlearningConfig):
    """Every check that reads the disk but loads no model; returns (forget, retain) sources.

    A ``~`` in ``pretrained_model_name_or_path`` is expanded in ``config`` (after the path check,
    whose message shows the path as given), since ``from_pretrained`` does not expand it.

    Raises :class:`InputError` (one line) for a missing or malformed data folder, overlapping
    D_f / D_r, an uncacheable crop, a folder that is no SD pipeline, a resolution the VAE cannot
    take, a non-empty output folder, a bad checkpoint to resume from, or a Hub repo that cannot be
    written (last: the only check that needs the network).
    """
    from ..utils.atomic_save import ensure_output_dir
    from .data import DataValidationError, check_cacheable, check_disjoint, load_hub_dataset, \
        load_imagefolder
    from .inputs import check_pretrained_pipeline, resolve_checkpoint

    model_card_metrics(config)
    try:
        resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        ensure_output_dir(config.output_dir, config.overwrite_output_dir,
                          allow_existing=bool(config.resume_from_checkpoint), check_only=True)
    except ValueError as e:
        raise InputError(str(e)) from None
    sources = {}
    if config.has_concepts:
        sources["forget"] = _load_concepts(config)
    for role in ("retain",) if config.has_concepts else ("forget", "retain"):
        folder, name = getattr(config, f"{role}_data_dir"), getattr(config, f"{role}_dataset_name")
        if (folder is None) == (name is None):
            raise InputError(f"give exactly one of --{role}_data_dir and --{role}_dataset_name")
        try:
            if folder is not None:
                sources[role] = load_imagefolder(folder, config.caption_column, role=role)
            else:
                sources[role] = load_hub_dataset(name, config.image_column, config.caption_column,
                                                 split=config.dataset_split, role=role,
                                                 **({"cache_dir": config.cache_dir}
                                                    if config.cache_dir else {}))
        except DataValidationError as e:
            raise InputError(str(e)) from None
    try:
        if config.has_concepts:
            for concept in sources["forget"]:
                check_disjoint(concept.source, sources["retain"])
        else:
            check_disjoint(sources["forget"], sources["retain"])
    except DataValidationError as e:
        raise InputError(str(e)) from None
    if config.cache_latents:
        try:
            check_cacheable([c.source for c in sources["forget"]] + [sources["retain"]]
                            if config.has_concepts else sources.values(), config.center_crop)
        except ValueError as e:
            raise InputError(f"--cache_latents: {e}") from None
    try:  # no Hub retries for a mistyped local path, no output dir for a non-pipeline folder
        check_pretrained_pipeline(config.pretrained_model_name_or_path)
    except ValueError as e:
        raise InputError(str(e)) from None
    if config.pretrained_model_name_or_path.startswith("~"):  # from_pretrained does not expand it
        config.pretrained_model_name_or_path = os.path.expanduser(
            config.pretrained_model_name_or_path)
    check_family(config)
    if config.push_to_hub:
        from ..utils.model_card import HubAccessError, check_hub_access

        try:
            check_hub_access(config.hub_model_id, config.hub_token)
        except HubAccessError as e:
            raise InputError(str(e)) from None
    return sources["forget"], sources["retain"]


def _load_concepts(config: SDUnlearningConfig):
    """Every named forget concept read and checked (one ``InputError`` for the first problem):
    each has data, no two share an image."""
    from .data import DataValidationError, check_concepts_disjoint, load_concept

    kwargs = {"cache_dir": config.cache_dir} if config.cache_dir else {}
    try:
        concepts = [load_concept(spec, config.caption_column, config.image_column,
                                 config.dataset_split, **kwargs)
                    for spec in config.concept_specs()]
        check_concepts_disjoint(concepts)
    except DataValidationError as e:
        raise InputError(str(e)) from None
    return concepts


def forget_names(config: SDUnlearningConfig, forget_src) -> Optional[list]:
    """The concepts that are separate forget players (None: one forget player)."""
    if config.forget_players_mode != "per_concept":
        return None
    return [c.name for c in forget_src]


def objective_text(config: SDUnlearningConfig) -> str:
    """One line for the model card: how the players were trained."""
    method = config.make_method()
    what = {"remap": f"remap the forget prompts onto `{config.anchor_prompt}`",
            "ga": "gradient ascent on the denoising loss of the forget set",
            "esd": f"ESD negative guidance (eta = {config.negative_guidance})"
            }[config.forget_objective] if method.uses_forget else "no forget player"
    if method.bargains:
        how = "MUNBa (Nash bargaining of the retain and forget gradients)"
    elif config.method == "weighted":
        how = f"weighted sum L_r + {config.forget_weight} L_f"
    else:
        how = f"{config.method}: {method.summary}"
    rule = config.forget_rule()
    if rule is not None:
        who = "each concept's forget player" if config.forget_players_mode == "per_concept" \
            else "the forget player"
        how += f"; {who} leaves once satisfied ({rule!r})"
    if config.has_concepts and method.uses_forget:
        how += ("; each forget concept is its own player" if config.forget_players_mode ==
                "per_concept" else "; every forget concept pooled into one forget player")
    trained = (f"LoRA rank {config.rank} on the {config.train_component} ({config.train_params})"
               if config.use_lora else f"{config.train_component} parameters: "
                                       f"{config.train_params}")
    keep = ("" if not method.uses_retain else
            "; retain: distilled from the original model on D_r" if config.retain_objective ==
            "distill" else "; retain: the denoising loss on D_r")
    return f"{what}; {how}{keep}; {trained}; target model: {config.target_model}."


def backward_players(bargainer, players, player_loss, batch, backward=None) -> torch.Tensor:
    """One micro-batch: each player's loss and backward pass inside its ``bargainer.player(i)``
    block, in the fixed order (retain before forget: the RNG draws follow it). Returns the
    detached losses, on the device.

    ``players``: the method's player names; ``player_loss[name](batch)`` the loss;
    ``backward``: e.g. ``accelerator.backward`` (default ``loss.backward()``). The block yields
    the loss scale: 1 when the bargainer keeps the gradient apart (Nash bargaining), the player's
    weight for a constant weighting (the weighted sum: autograd accumulates g_r + lambda g_f).
    """
    backward = backward or (lambda loss: loss.backward())
    losses = []
    for i, name in enumerate(players):
        with bargainer.player(i) as scale:
            loss = player_loss[name](batch)
            backward(loss * scale if scale != 1.0 else loss)
        losses.append(loss.detach().float())
    return torch.stack(losses)


def _log_validation_images(accelerator, folder, records, step):
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


def validation_grid(folder, records):
    """One row per prompt of the validation images (``diffusers.utils.make_image_grid``)."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    rows: Dict[int, list] = {}
    for r in records:
        rows.setdefault(r["prompt_index"], []).append(
            Image.open(Path(folder) / r["file_name"]).convert("RGB"))
    cols = max(len(v) for v in rows.values())
    images = [im for _, ims in sorted(rows.items()) for im in ims]
    return make_image_grid(images, rows=len(rows), cols=cols)


def _save_checkpoint(accelerator, out: Path, step: int, total_limit: Optional[int], log) -> None:
    """accelerate ``save_state`` into ``.checkpoint-N.partial``, renamed to ``checkpoint-N`` once
    every rank finished, after the oldest beyond ``total_limit`` were deleted.

    Not ``ProjectConfiguration(total_limit=...)``: accelerate rotates only with
    ``automatic_checkpoint_naming``, which writes ``checkpoints/checkpoint_<i>`` straight into
    place (no staging folder, so a killed save leaves a half checkpoint that looks complete) and
    names folders by save count, not optimizer step, which ``--resume_from_checkpoint latest``
    and ``checkpoint_step`` read.
    """
    from .inputs import CHECKPOINT_RE

    if accelerator.is_main_process and total_limit is not None:
        old = sorted((int(CHECKPOINT_RE.match(d.name).group(1)), d) for d in out.iterdir()
                     if d.is_dir() and CHECKPOINT_RE.match(d.name))
        for _, d in old[:max(0, len(old) - total_limit + 1)]:
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


def train(config: SDUnlearningConfig, *, sources: Optional[Tuple] = None) -> Path:
    """Run one SD unlearning run; returns the output folder (the final model is in it).

    ``sources``: the (forget, retain) data sources :func:`check_inputs` returned, to skip reading
    the data twice; by default the inputs are checked here. ``config`` is not modified: the run
    works on a copy (whose derived values, e.g. ``max_train_steps``, go to ``training_args.json``).
    Raises :class:`InputError` for bad inputs and
    :class:`~hf_munba.unlearning.TooManySkippedSteps` when the run diverged.
    """
    args = copy.deepcopy(config)
    forget_src, retain_src = sources if sources is not None else check_inputs(args)
    extra_metrics = model_card_metrics(args)

    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from tqdm.auto import tqdm

    from ..unlearning.distributed import unsupported_distributed_message
    from ..unlearning.step import SkippedStepGuard, TooManySkippedSteps, unlearning_step
    from ..utils.atomic_save import staged_output
    from ..utils.model_card import (public_hparams, push_folder_to_hub, sd_model_card,
                                    tracker_hparams)
    from ..utils.training_plot import plot_training_history
    from .data import LatentCache, PairedUnlearningDataset
    from .export import save_full_pipeline, save_lora
    from .families import PromptTokenizer, detect_family, load_components
    from .inputs import checkpoint_step, resolve_checkpoint
    from .original_weights import OriginalWeights, choose_original
    from .params import add_lora_adapter, enable_gradient_checkpointing, freeze_all_but, \
        select_parameter_names
    from .unlearner import SDUnlearner

    names = forget_names(args, forget_src)
    method = args.make_method(forget_names=names)
    players = method.players()
    concepts = forget_src if args.has_concepts else None
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
    refused = unsupported_distributed_message(bargains=method.bargains,
                                              distributed_type=accelerator.distributed_type,
                                              sharded_weights=False)
    if refused:
        raise InputError(refused)
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
    # the family (SD 1.x/2.x, SDXL, SD 3, Flux) owns prompt encoding, noising and the denoiser
    # call; the components load with the classes the pipeline's model_index.json names
    family = detect_family(path, revision=rev, cache_dir=args.cache_dir)
    parts = load_components(path, family, revision=rev, variant=var, cache_dir=args.cache_dir)
    vae, unet, text_encoders = parts.vae, parts.denoiser, parts.text_encoders
    prompt_tokenizer = PromptTokenizer(family, parts.tokenizers)
    log.info(f"model family: {family.describe()}")
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    for enc in text_encoders.values():
        enc.requires_grad_(False)
    component = family.component_name(args.train_component)  # checked in check_inputs

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                       torch.float32)
    on_unet = component == family.denoiser
    trained = unet if on_unet else text_encoders[component]
    frozen_copy = original = None
    has_target = method.uses_forget and args.forget_objective != "ga"
    if args.target_model == "frozen" and not has_target:
        log.warning("--target_model frozen has no effect with " + (
            "--forget_objective ga (no target)" if method.uses_forget
            else f"--method {args.method} (no forget player)"))
    # a method without a retain player (ga) has no retain loss to distil
    retain_objective = args.retain_objective if method.uses_retain else "denoise"
    needs_original = not args.use_lora and ((args.target_model == "frozen" and has_target)
                                            or retain_objective == "distill")
    if args.use_lora:
        params = add_lora_adapter(trained, rank=args.rank, alpha=args.lora_alpha,
                                  subset=args.train_params, component=component)
    else:
        params = freeze_all_but(trained, select_parameter_names(trained, args.train_params,
                                                                component))
    if needs_original and choose_original(trained, params, trained_dtype=torch.float32,
                                          compute_dtype=weight_dtype) == "copy":
        # most of the module trains under 16-bit mixed precision: a frozen copy in the compute
        # dtype is smaller than the trained parameters' fp32 values (made before the move)
        frozen_copy = copy.deepcopy(trained).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(trained)
    # Frozen modules in the compute dtype; trained ones stay fp32 (LoRA params upcast).
    vae.to(accelerator.device, dtype=weight_dtype)
    for frozen in [unet, *text_encoders.values()]:
        if frozen is not trained:
            frozen.to(accelerator.device, dtype=weight_dtype)
    trained.to(accelerator.device, dtype=weight_dtype if args.use_lora else torch.float32)
    if frozen_copy is not None:
        frozen_copy.to(accelerator.device, dtype=weight_dtype)
        log.info(f"keeping a frozen {str(weight_dtype).split('.')[-1]} copy of the {component} "
                 f"for the original model's predictions (smaller than its trained parameters' "
                 f"fp32 values)", main_process_only=True)
    elif needs_original:
        # the original model, for the frozen target and/or the distilled retain loss: the
        # trained parameters' first values, taken after the last move (and before any resume)
        original = OriginalWeights(params)
        log.info(f"keeping the original values of the trained parameters "
                 f"({original.num_bytes / 2**20:,.1f} MiB) for the original model's predictions",
                 main_process_only=True)
    if args.use_lora and weight_dtype != torch.float32:
        cast_training_params(trained, dtype=torch.float32)
    log.info(f"training {sum(p.numel() for p in params):,} parameters of the "
             f"{component} "
             f"({'LoRA rank %d' % args.rank if args.use_lora else args.train_params})",
             main_process_only=True)

    if args.scale_lr:
        args.learning_rate *= (args.gradient_accumulation_steps * args.train_batch_size
                               * accelerator.num_processes)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # ---- data ----------------------------------------------------------------------------------
    dataset = PairedUnlearningDataset(forget_src, retain_src, prompt_tokenizer, args.resolution,
                                      anchor_prompt=args.anchor_prompt, seed=args.seed,
                                      forget_prompts=args.forget_prompts,
                                      center_crop=args.center_crop, random_flip=args.random_flip,
                                      image_geometry=family.micro_conditioning,
                                      forget_players=args.forget_players_mode or "pooled")
    if args.cache_latents:
        dataset.cache = LatentCache().build(
            dataset, vae, batch_size=args.train_batch_size,
            encode=(lambda ids: family.encode(text_encoders, ids)) if on_unet else None)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=False,
        num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG out of it
    # The before/after losses are per concept whenever there are several, pooled or not: the
    # pooled baseline's card must say how each concept fared too (an uncached per-concept view).
    eval_dataset = dataset
    if concepts is not None and len(dataset.forget_roles) == 1:
        eval_dataset = PairedUnlearningDataset(
            concepts, retain_src, prompt_tokenizer, args.resolution, anchor_prompt=args.anchor_prompt,
            seed=args.seed, center_crop=args.center_crop, random_flip=args.random_flip,
            image_geometry=family.micro_conditioning,
            forget_players="per_concept")
    eval_roles = eval_dataset.forget_roles
    eval_items = [eval_dataset[i] for i in range(min(len(eval_dataset),
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
        text_encoders[component] = trained
    text_encoder = next(iter(text_encoders.values()))
    unlearner = SDUnlearner(
        unet, text_encoder, vae, family=family, text_encoders=text_encoders,
        forget_objective=args.forget_objective,
        target_model=args.target_model, train_component=component,
        retain_objective=retain_objective,
        lora=args.use_lora, negative_guidance=args.negative_guidance,
        frozen_unet=frozen_copy if on_unet else None,
        frozen_text_encoder=None if on_unet else frozen_copy, original_weights=original,
        weight_dtype=weight_dtype,
        num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    player_loss = {"retain": unlearner.retain_loss, "forget": unlearner.forget_loss}
    for role in dataset.forget_roles:  # forget_<name>: one loss per concept, its own batch keys
        player_loss.setdefault(role, functools.partial(unlearner.forget_loss, role=role))
    bargainer = method.make_bargainer(params)  # Nash bargaining or a constant weighting
    # One satisfied-player rule per concept player, or one for the single forget player (None:
    # equal or fixed powers every step).
    forget_rules = method.forget_rules(args.forget_objective) if names else {}
    forget_rule = None if names else args.forget_rule()
    rule_names = {i: players[i][len("forget_"):] for i in forget_rules}
    guard = SkippedStepGuard(args.max_consecutive_skips)
    history = []
    metrics: Dict = {}

    # ---- checkpoint hooks: the trained weights as safetensors, plus our counters as JSON ----------
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                m = accelerator.unwrap_model(model)
                if args.use_lora:
                    save_lora(output_dir, pipeline_class=family.pipeline_class, **{component: m})
                else:
                    m.save_pretrained(os.path.join(output_dir, component),
                                      safe_serialization=True)
                weights.pop()
            state = {"global_step": history[-1]["step"] if history else 0,  # read on resume
                     "guard": guard.state_dict(), "history": history, "metrics": metrics,
                     "bargainer": bargainer.state_dict(),
                     "forget_rule": None if forget_rule is None else forget_rule.state_dict(),
                     "forget_rules": {rule_names[i]: r.state_dict()
                                      for i, r in forget_rules.items()}}
            Path(output_dir, "munba_state.json").write_text(json.dumps(state))

    def load_model_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if args.use_lora:
                lora_sd = family.pipeline_class.lora_state_dict(input_dir)
                lora_sd = lora_sd[0] if isinstance(lora_sd, tuple) else lora_sd
                if on_unet:
                    prefix = f"{component}."
                    sd = {k[len(prefix):]: v for k, v in lora_sd.items() if k.startswith(prefix)}
                    set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(sd),
                                              adapter_name="default")
                else:
                    _set_state_dict_into_text_encoder(lora_sd, prefix=f"{component}.",
                                                      text_encoder=m)
            else:
                loaded = type(m).from_pretrained(input_dir, subfolder=component)
                m.load_state_dict(loaded.state_dict())
                del loaded
        state = json.loads(Path(input_dir, "munba_state.json").read_text())
        guard.load_state_dict(state["guard"])
        history[:] = state["history"]
        metrics.update(state["metrics"])
        if state.get("bargainer"):
            bargainer.load_state_dict(state["bargainer"])
        if forget_rule is not None and state.get("forget_rule"):
            forget_rule.load_state_dict(state["forget_rule"])
        saved_rules = state.get("forget_rules") or {}
        if forget_rules and sorted(saved_rules) != sorted(rule_names.values()):
            raise InputError(f"{input_dir} holds satisfied-player rules for the concepts "
                             f"{sorted(saved_rules)}, this run has {sorted(rule_names.values())}: "
                             f"resume with the same concepts")
        for i, rule in forget_rules.items():
            rule.load_state_dict(saved_rules[rule_names[i]])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name,
                                  config=tracker_hparams(args.to_dict()))

    # Forget / retain losses of the base model on fixed batches and noise (the RNG is untouched);
    # a resumed run takes them from its checkpoint.
    metrics.update({f"before/{k}": v for k, v in
                    unlearner.evaluate(eval_batches, args.seed, eval_roles).items()})

    # ---- resume --------------------------------------------------------------------------------
    global_step, first_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        ckpt = resolve_checkpoint(args.resume_from_checkpoint, out)  # checked in check_inputs
        if ckpt is None:
            log.info("no checkpoint found in the output directory; starting a new run")
        else:
            log.info(f"resuming from {ckpt}")
            accelerator.load_state(str(ckpt))
            global_step = checkpoint_step(ckpt)  # recorded in it: any folder name works
            first_epoch = global_step // updates_per_epoch
            resume_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    def run_validation(step):
        from .generation import generate_images

        folder = out / "validation" / f"step-{step:06d}"
        pipe = family.pipeline_class.from_pretrained(
            path, **{family.denoiser: accelerator.unwrap_model(unet)},
            **{k: accelerator.unwrap_model(m) for k, m in text_encoders.items()},
            **parts.tokenizers, vae=vae, revision=rev, variant=var,
            **family.validation_pipeline_kwargs, **cache, dtype=weight_dtype).to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            recs = generate_images(pipe, args.validation_prompts, folder,
                                   num_images_per_prompt=args.num_validation_images,
                                   seed=args.seed, batch_size=args.train_batch_size,
                                   num_inference_steps=args.validation_inference_steps,
                                   height=args.resolution, width=args.resolution, progress=False)
        del pipe
        _log_validation_images(accelerator, folder, recs, step)
        return folder, recs

    # ---- train ---------------------------------------------------------------------------------
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if concepts is not None:
        log.info("forget concepts (" + (args.forget_players_mode) + "): " + ", ".join(
            f"{c.name} ({len(c.source)} images)" for c in concepts))
    log.info(f"D_f: {len(dataset.forget) if concepts is None else sum(len(c.source) for c in concepts)} images, D_r: {len(retain_src)} images; {args.max_train_steps} "
             f"optimizer steps of {total_batch} pairs; method {args.method} (players "
             f"{', '.join(players)}), objective {args.forget_objective}, retain "
             f"{retain_objective}")
    log.info(f"before unlearning: {metrics}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    scaler = getattr(accelerator, "scaler", None)
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    powers = method.powers()
    acc_t = torch.zeros(len(players), device=accelerator.device)
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
                    losses = backward_players(bargainer, players, player_loss, batch,
                                              accelerator.backward)
                    # kept on the device: one host sync per optimizer step, not per backward
                    acc_t = acc_t + losses / args.gradient_accumulation_steps
                    if accelerator.sync_gradients:
                        result = unlearning_step(
                            bargainer, optimizer, losses=acc_t, lr_scheduler=lr_scheduler,
                            clip=lambda: accelerator.clip_grad_norm_(params, args.max_grad_norm),
                            scaler=scaler, reduce=reduce, forget_rule=forget_rule,
                            forget_rules=forget_rules or None,
                            forget_player=method.forget_player or 0, powers=powers,
                            edit_gradients=method.edit_gradients, guard=guard,
                            step=global_step + 1, player_names=players)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                logs = {**result.logs, "lr": lr_scheduler.get_last_lr()[0]}
                acc_t = torch.zeros(len(players), device=accelerator.device)
                history.append({"step": global_step, **logs})
                accelerator.log(logs, step=global_step)
                progress.set_postfix(**{k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                        if k in ("loss/retain", "loss/forget", "munba/cos")})
                if result.skipped:
                    log.warning(f"step {global_step}: non-finite loss or gradient, update skipped "
                                f"({guard.total} skipped so far)")
                if global_step % args.checkpointing_steps == 0:
                    _save_checkpoint(accelerator, out, global_step, args.checkpoints_total_limit,
                                     log)
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
    except TooManySkippedSteps:
        accelerator.end_training()
        raise
    progress.close()

    # ---- final save ----------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    metrics.update({f"after/{k}": v for k, v in
                    unlearner.evaluate(eval_batches, args.seed, eval_roles).items()})
    metrics["skipped_steps"] = guard.total
    if method.bargains:
        metrics["bargaining_fallback_steps"] = bargainer.num_fallbacks
    if forget_rule is not None:
        metrics["forget_times_satisfied"] = forget_rule.times_satisfied
        metrics["forget_satisfied_at_end"] = forget_rule.satisfied
    for i, rule in forget_rules.items():
        metrics[f"forget_{rule_names[i]}_times_satisfied"] = rule.times_satisfied
        metrics[f"forget_{rule_names[i]}_satisfied_at_end"] = rule.satisfied
    log.info(f"after unlearning: {metrics}")
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(trained)
        with staged_output(out, beside=True) as tmp:
            tmp = Path(tmp)
            if args.use_lora:
                save_lora(tmp, pipeline_class=family.pipeline_class,
                          **{component: final.to(torch.float32)})
                if args.fuse_lora:
                    pipe = family.pipeline_class.from_pretrained(path, revision=rev, variant=var,
                                                                 **cache)
                    pipe.load_lora_weights(str(tmp))
                    pipe.fuse_lora()
                    pipe.unload_lora_weights()
                    save_full_pipeline(pipe, tmp)
                    del pipe
            else:
                pipe = family.pipeline_class.from_pretrained(
                    path, revision=rev, variant=var, **cache,
                    **{component: final.to(torch.float32)})
                save_full_pipeline(pipe, tmp)
                del pipe
            grid = None
            if args.validation_prompts:
                folder, recs = run_validation(global_step)
                grid = "validation_grid.png"
                validation_grid(folder, recs).save(tmp / grid)
            try:
                plot_training_history(history, tmp / "training_curves.png")
            except ImportError as e:
                log.warning(f"no training plot: {e}")
            (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
            (tmp / "training_args.json").write_text(
                json.dumps(public_hparams(args.to_dict()), indent=2))
            if concepts is not None:
                forgotten = [f"{c.name}: " + ", ".join(f"`{t}`" for t in (
                    c.prompts or sorted(set(c.source.captions))[:5])) for c in concepts]
            else:
                forgotten = args.forget_prompts or sorted(set(forget_src.captions))[:10]
            if args.class_names:
                forgotten = [f"class '{args.forget_class}' (remapped to "
                             f"'{args.anchor_prompt}')"]
            card = sd_model_card(base_model=path, forgotten=forgotten, family=family.describe(),
                                 retained=sorted(set(retain_src.captions))[:10],
                                 hparams=args.to_dict(), metrics={**metrics, **extra_metrics},
                                 image_grid=grid, lora=args.use_lora and not args.fuse_lora,
                                 repo_id=args.hub_model_id, objective=objective_text(args),
                                 model_name=(args.hub_model_id.split("/")[-1] if args.hub_model_id
                                             else f"{Path(path).name}-munba"),
                                 forget_data=(args.forget_manifest or ", ".join(
                                     c.source.name for c in concepts)) if concepts is not None
                                 else args.forget_data_dir or args.forget_dataset_name,
                                 retain_data=args.retain_data_dir or args.retain_dataset_name)
            card.save(str(tmp / "README.md"))
            (tmp / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        log.info(f"saved the unlearned model to {out}")
        if args.push_to_hub:
            repo = push_folder_to_hub(out, args.hub_model_id, token=args.hub_token,
                                      private=args.hub_private_repo)
            log.info(f"pushed to https://huggingface.co/{repo}")
    accelerator.end_training()
    return out
