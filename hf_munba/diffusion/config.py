"""The settings of one SD unlearning run, as a dataclass in the peft style.

:class:`SDUnlearningConfig` is what :func:`hf_munba.diffusion.train` takes and what the
command line of ``training/train_munba_sd.py`` is generated from: every field is one CLI flag of
the same name, its ``help`` is the flag's help, a ``Literal`` (or ``choices``) is the flag's
choices. So a library user and a CLI user set exactly the same things, and the checks of
``__post_init__`` (values only: no file, no model, no network) run for both, each raising one
``ValueError`` whose message names the flag. The checks that read the disk (data folders, the
base pipeline, the output folder) are :func:`hf_munba.diffusion.trainer.check_inputs`.

The config round-trips through JSON (:meth:`to_dict` / :meth:`from_dict`,
:meth:`to_json_string` / :meth:`from_json_file`), so a run's ``training_args.json`` can be read
back; the Hub token is never written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from ..evaluation.prompts import NUDITY_PROMPTS
from ..unlearning.distributed import unsupported_distributed_message
from ..unlearning.methods import method_settings
from ..unlearning.registry import available_methods, get_method
from .data import FORGET_PLAYER_MODES
from .inputs import LR_SCHEDULERS
from .objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES, TARGET_MODELS
from .params import TEXT_ENCODER_SUBSETS, UNET_SUBSETS

__all__ = ["SDUnlearningConfig", "DEFAULT_FORGET_PROMPTS", "add_config_arguments",
           "DIFFUSION_METHODS"]

#: the paper's forget prompts for nudity (the evaluation suite's list)
DEFAULT_FORGET_PROMPTS = list(NUDITY_PROMPTS)
#: the registry's methods the SD front end runs (munba, munba-paper, weighted, ft, ga)
DIFFUSION_METHODS = tuple(available_methods("diffusion"))
_SECRETS = ("hub_token",)


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


#: the settings the registry's SD methods declare (name -> (setting, the methods reading it))
_METHOD_SETTINGS = method_settings("diffusion")


def _setting(name: str, help: str):
    """A field for a setting a registered method declares: its default is the method's (one
    source for both front ends, ``MunbaArguments`` builds its fields from the same declaration);
    the help is this flag's own, in the SD objectives' words."""
    return _f(_METHOD_SETTINGS[name][0].default, help)


def _list(default, help: str):
    return field(default_factory=lambda: None if default is None else list(default),
                 metadata={"help": help})


@dataclass
class SDUnlearningConfig:
    """Every setting of an SD unlearning run (one field per ``train_munba_sd.py`` flag)."""

    # ---- model
    pretrained_model_name_or_path: str = field(metadata={
        "help": "a diffusers Stable Diffusion 1.x/2.x pipeline: a Hub repo id (org/name) or a "
                "local folder with model_index.json"})
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the base pipeline")
    variant: Optional[str] = _f(None, 'weight file variant of the base pipeline, e.g. "fp16"')
    cache_dir: Optional[str] = _f(None, "where downloaded models and datasets are cached "
                                        "(default: the Hugging Face caches)")
    output_dir: str = _f("sd-munba-model", "where the unlearned model, model card, logs and "
                                           "checkpoints are written")
    overwrite_output_dir: bool = _f(False, "replace a non-empty output_dir (its old checkpoint-* "
                                           "folders are deleted at start)")
    seed: int = _f(0, "seeds the data order, augmentation, noise and timesteps: the same seed "
                      "gives the same run")
    # ---- data
    forget_data_dir: Optional[str] = _f(None, "imagefolder (images + metadata.jsonl) of D_f")
    retain_data_dir: Optional[str] = _f(None, "imagefolder (images + metadata.jsonl) of D_r")
    forget_dataset_name: Optional[str] = _f(None, "a datasets name/path for D_f")
    retain_dataset_name: Optional[str] = _f(None, "a datasets name/path for D_r")
    forget_concepts: Optional[List[str]] = field(default=None, metadata={
        "action": "extend",
        "help": "several concepts to forget, each NAME=FOLDER (an imagefolder of that concept's "
                "D_f; its captions are the prompts to forget), e.g. --forget_concepts "
                "nudity=data/nudity violence=data/violence (or repeat the flag). Each concept "
                "is its own bargaining player (see --forget_players); replaces "
                "--forget_data_dir/--forget_dataset_name/--forget_prompts"})
    forget_manifest: Optional[str] = _f(
        None, 'several concepts to forget from a JSON file: {"NAME": {"data_dir": FOLDER or '
              '"dataset_name": NAME, optional "prompts": [...] (what its player conditions on; '
              'default: the captions) and "anchor_prompt": "..." (its remap target; default '
              '--anchor_prompt)}, ...}; relative folders are relative to the file. Instead of '
              '--forget_concepts')
    forget_players: Optional[Literal["per_concept", "pooled"]] = _f(
        None, "with several concepts: per_concept (the default) makes each concept its own "
              "bargaining player (players retain, forget_<name>, ...; each draws its own forget "
              "batch every step and has its own satisfied-player rule), so no concept dominates "
              "the others; pooled puts every concept's images into one forget player (the "
              "baseline: one loss, one rule)")
    dataset_split: str = _f("train", "split of --forget/--retain_dataset_name")
    image_column: str = _f("image", "image column of the datasets")
    caption_column: str = _f("text", "caption column of the datasets / metadata.jsonl")
    forget_prompts: Optional[List[str]] = _list(
        None, "prompts the forget player conditions on (cycled); default: the D_f captions")
    anchor_prompt: str = _f("a photo of a person wearing clothes",
                            "remap target prompt: the forget prompts should behave like this one")
    class_names: Optional[List[str]] = _list(
        None, "class-wise unlearning: all class names (the paper: the 10 Imagenette classes)")
    forget_class: Optional[str] = _f(None, "class-wise: the class to forget")
    remap_class: Optional[str] = _f(None, "class-wise: class to remap to (default: the next one)")
    prompt_template: str = _f("an image of a {}", "class-wise prompt template")
    resolution: int = _f(512, "training image size: the shorter side is resized to it, then a "
                              "square is cropped")
    center_crop: bool = _f(False, "crop the centre of each image (default, as in diffusers: a "
                                  "random crop, seeded per item; a square image has one crop "
                                  "position either way)")
    random_flip: bool = _f(False, "flip each image horizontally with probability 1/2 (seeded per "
                                  "item; with --cache_latents both orientations are cached)")
    cache_latents: bool = _f(False, "encode D_f/D_r latents (and prompt embeddings when the UNet "
                                    "is trained) once; a non-square image needs --center_crop "
                                    "(random crops cannot be cached)")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0: load in the main process)")
    # ---- unlearning
    method: str = _f("munba", "munba: Nash bargaining with the satisfied-forget-player rule (the "
                              "recommended configuration; see --forget_target); munba-paper: the "
                              "paper's plain rule (equal powers, no target); weighted: L_r + "
                              "lambda L_f; ft: fine-tune on D_r only; ga: gradient ascent on D_f "
                              "only (use with --forget_objective ga)",
                     choices=DIFFUSION_METHODS)
    forget_weight: float = _setting("forget_weight",
                                    "lambda of --method weighted: L_r + lambda L_f")
    forget_objective: Optional[Literal["remap", "ga", "esd"]] = _f(
        None, "remap: the forget prompts' prediction onto the anchor's; ga: gradient ascent on "
              "the denoising loss of D_f; esd: ESD negative guidance (default: remap; ga with "
              "--method ga)")
    target_model: Literal["current", "frozen"] = _f(
        "current", "model giving the remap/esd target: the current weights or the frozen "
                   "original (ignored by ga, which has no target)")
    negative_guidance: float = _f(1.0, "eta of --forget_objective esd")
    retain_objective: Optional[Literal["denoise", "distill"]] = _f(
        None, "the retain player's loss on D_r. distill: match the original model's prediction "
              "(same noisy latents and captions; zero at the start, its gradient is the drift "
              "alone; keeps the trained parameters' original values unless --use_lora); denoise: "
              "the paper's denoising loss. Default: distill; denoise for methods with no forget "
              "player (ft), which distilling toward the original would not move")
    train_component: Literal["unet", "transformer", "text_encoder", "text_encoder_2",
                             "text_encoder_3"] = _f(
        "unet", "which network is edited: the denoiser (unet; for SD 3 / Flux 'unet' and "
                "'transformer' both mean their transformer) or one text encoder (SDXL: "
                "text_encoder_2 is OpenCLIP-G; SD 3: _2 CLIP-G, _3 T5; Flux: _2 T5)")
    train_params: Literal["full", "noxattn", "xattn", "selfattn"] = _f(
        "noxattn", "parameter subset (text encoder: full or selfattn)")
    use_lora: bool = _f(False, "train a peft LoRA adapter on the subset's attention projections "
                               "instead of the weights")
    rank: int = _f(4, "LoRA rank")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha (default: the rank)")
    fuse_lora: bool = _f(False, "also write the LoRA-fused full pipeline")
    opposed_tol: float = _setting(
        "opposed_tol", "MUNBa: when 1 + cos(g_r, g_f) is below this, no direction helps both "
                       "players and the step follows the retain gradient")
    # ---- bargaining power and the satisfied forget player (--method munba)
    bargaining_power_forget: Optional[float] = _setting(
        "bargaining_power_forget", "the forget player's bargaining power w_f (retain has 1) "
                                   "while it is not satisfied; only the ratio matters "
                                   "(hf_munba.bargaining). Default: 1, the paper's symmetric "
                                   "game (a concept is forgotten as a class is)")
    forget_target: Optional[float] = _setting(
        "forget_target", "the forget player is satisfied (its power drops to "
                         "--satisfied_power_forget) once an EMA of its loss is at or below this "
                         "target; default per objective: 0.25 relative for remap and esd, none "
                         "for ga")
    forget_target_mode: Optional[Literal["relative", "absolute"]] = _setting(
        "forget_target_mode", "relative: the target is a fraction of the mean loss of the first "
                              "--forget_target_reference_steps steps (scale-free; the default); "
                              "absolute: a loss value")
    forget_target_ema: float = _setting(
        "forget_target_ema", "smoothing of the forget loss before it is compared with the "
                             "target, in [0, 1)")
    forget_target_hysteresis: float = _setting(
        "forget_target_hysteresis", "a satisfied forget player comes back when the EMA exceeds "
                                    "this factor times the target")
    forget_target_reference_steps: int = _setting(
        "forget_target_reference_steps", "relative targets: how many first steps' losses make "
                                         "the reference")
    satisfied_power_forget: float = _setting(
        "satisfied_power_forget", "the forget player's power while satisfied (the default: the "
                                  "step mostly follows retain and keeps a small forgetting "
                                  "pressure; 0 = it leaves the game and the step follows the "
                                  "retain gradient alone)")
    max_consecutive_skips: int = _f(10, "stop the run after this many optimizer steps in a row "
                                        "were skipped for non-finite losses or gradients")
    # ---- optimisation
    train_batch_size: int = _f(4, "forget/retain pairs per device and micro-batch")
    num_train_epochs: int = _f(1, "passes over D_r")
    max_train_steps: Optional[int] = _f(None, "optimizer steps (overrides --num_train_epochs)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (bargaining "
                                             "happens once per step)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to "
                                             "save memory")
    learning_rate: float = _f(1e-5, "AdamW learning rate")
    scale_lr: bool = _f(False, "multiply the learning rate by accumulation steps x batch size x "
                               "processes")
    lr_scheduler: str = _f("constant", "diffusers learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "warm-up steps of the schedule")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(0.0, "AdamW (decoupled) weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (a bargained direction has norm "
                                   "sqrt(2), so 1.0 always binds)")
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = _f(
        None, "compute dtype (default: the accelerate config's)")
    allow_tf32: bool = _f(False, "allow TF32 matmuls on Ampere+ GPUs")
    # ---- logging, checkpoints, validation
    report_to: Optional[str] = _f(
        None, "tracker(s) for accelerate: tensorboard, wandb, comet_ml, all or none (default: "
              "tensorboard if installed, else none; history.jsonl and a PNG are always written)")
    tracker_project_name: str = _f("munba-sd", "project name given to the trackers "
                                               "(accelerate init_trackers)")
    logging_dir: str = _f("logs", "tracker log folder, inside output_dir")
    checkpointing_steps: int = _f(500, "save a resumable checkpoint-N every this many optimizer "
                                       "steps")
    checkpoints_total_limit: Optional[int] = _f(None, "keep at most this many checkpoints "
                                                      "(oldest deleted)")
    resume_from_checkpoint: Optional[str] = _f(
        None, '"latest" (the highest output_dir/checkpoint-N) or a checkpoint folder this script '
              'saved')
    validation_prompts: Optional[List[str]] = _list(
        None, "prompts to generate images of during training and at the end (validation grid)")
    validation_steps: Optional[int] = _f(None, "generate the validation images every this many "
                                               "optimizer steps")
    validation_epochs: Optional[int] = _f(None, "generate the validation images at the end of "
                                                "every this many epochs")
    num_validation_images: int = _f(1, "validation images per prompt")
    validation_inference_steps: int = _f(25, "denoising steps of the validation images")
    eval_batches: int = _f(2, "batches for the before/after forget and retain losses in the "
                              "model card")
    model_card_metrics: Optional[str] = _f(None, "a JSON file of extra metrics (e.g. from the "
                                                 "evaluation suite) for the model card")
    # ---- hub
    push_to_hub: bool = _f(False, "upload the output folder to the Hub (access and token are "
                                  "checked before training)")
    hub_model_id: Optional[str] = _f(None, "Hub repo to push to, e.g. your-name/sd-munba-nudity")
    hub_token: Optional[str] = _f(None, "Hub token (default: the saved login); never logged or "
                                        "saved")
    hub_private_repo: bool = _f(False, "create the Hub repo as private")

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        """Value checks (no disk, no model): one ``ValueError`` naming the flag."""
        if self.method not in DIFFUSION_METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {list(DIFFUSION_METHODS)}")
        for name in ("forget_objective", "retain_objective", "target_model", "train_component",
                     "train_params", "forget_players", "forget_target_mode", "mixed_precision",
                     "lr_scheduler"):
            allowed = _choices(name)
            value = getattr(self, name)
            if allowed is not None and value is not None and value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of {list(allowed)}")
        self._check_concepts()
        method = get_method(self.method)
        if self.bargaining_power_forget is None:  # a concept is forgotten as a class is: 1
            self.bargaining_power_forget = 1.0
        if self.forget_objective is None:  # the method's own forget loss (ga: ascent)
            self.forget_objective = method.default_forget_loss["diffusion"]
        if self.retain_objective is None:
            self.retain_objective = "distill" if method.uses_forget and method.uses_retain \
                else "denoise"
        if not method.uses_forget and self.retain_objective == "distill":
            raise ValueError(f"--method {self.method} trains on D_r alone: with --retain_objective "
                             "distill its only loss is zero at the original model and nothing "
                             "would change; use --retain_objective denoise")
        if self.method == "ga" and self.forget_objective != "ga":
            raise ValueError(f"--method ga is gradient ascent on D_f alone: it takes "
                             f"--forget_objective ga, not {self.forget_objective}")
        msg = unsupported_distributed_message(bargains=method.bargains, sharded_weights=False)
        if msg:
            raise ValueError(msg)
        import torch

        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU (none found); use bf16 or no")
        if self.use_lora and self.rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {self.rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if self.fuse_lora and not self.use_lora:
            raise ValueError("--fuse_lora needs --use_lora")
        if self.trains_text_encoder and self.train_params not in TEXT_ENCODER_SUBSETS:
            raise ValueError(f"--train_params {self.train_params} is a UNet subset; with "
                             f"--train_component {self.train_component} use one of "
                             f"{TEXT_ENCODER_SUBSETS}")
        for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                     "checkpointing_steps", "max_consecutive_skips", "num_validation_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("validation_steps", "validation_epochs", "checkpoints_total_limit",
                     "max_train_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got "
                             f"{self.dataloader_num_workers}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.method == "weighted" and self.forget_weight < 0:
            raise ValueError(f"--forget_weight must be >= 0, got {self.forget_weight}")
        if self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}")
        self.forget_rule()  # validates the bargaining-power / target options
        if self.report_to is None:
            self.report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
        for tracker in self.report_to.split(","):
            if tracker in ("tensorboard", "wandb", "comet_ml", "mlflow") and \
                    importlib.util.find_spec(tracker) is None:
                raise ValueError(f"--report_to {tracker}: the {tracker} package is not installed "
                                 f"(pip install {tracker}, or --report_to none)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/sd-munba-nudity)")
        if self.class_names is not None:
            from .data import class_prompts, remap_class

            if len(self.class_names) < 2:
                raise ValueError("--class_names needs at least two classes")
            if self.forget_class is None:
                raise ValueError("--class_names needs --forget_class")
            target = remap_class(self.class_names, self.forget_class, self.remap_class)
            class_prompts(self.class_names, self.prompt_template)
            self.anchor_prompt = self.prompt_template.format(target)
            if self.forget_prompts is None:
                self.forget_prompts = [self.prompt_template.format(self.forget_class)]
        elif self.forget_class is not None:
            raise ValueError("--forget_class needs --class_names")

    def _check_concepts(self) -> None:
        """Several forget concepts: one source of them, nothing that names a single D_f."""
        from .data import parse_forget_concept

        several = self.forget_concepts is not None or self.forget_manifest is not None
        if self.forget_concepts is not None and self.forget_manifest is not None:
            raise ValueError("give --forget_concepts or --forget_manifest, not both")
        if not several:
            if self.forget_players is not None:
                raise ValueError("--forget_players needs several concepts (--forget_concepts or "
                                 "--forget_manifest)")
            return
        for single in ("forget_data_dir", "forget_dataset_name", "forget_prompts", "class_names",
                       "forget_class"):
            if getattr(self, single) is not None:
                raise ValueError(f"--{single} names a single forget set; with --forget_concepts "
                                 f"/ --forget_manifest give each concept's data (and prompts, "
                                 f"in the manifest) there")
        if self.forget_concepts is not None:
            names = [parse_forget_concept(v).name for v in self.forget_concepts]
            self.check_concept_names(names)

    def check_concept_names(self, names) -> None:
        """Two or more unique, file- and tracker-safe names (a ``ValueError`` naming them)."""
        from ..unlearning.methods import check_forget_names

        flag = "--forget_concepts" if self.forget_concepts is not None else "--forget_manifest"
        if len(names) < 2:
            raise ValueError(f"{flag} gives {len(names)} concept ({list(names)}): several "
                             f"concepts need at least two; for one, use --forget_data_dir "
                             f"(or --forget_dataset_name) with --forget_prompts / --anchor_prompt")
        try:
            check_forget_names(names)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    @property
    def has_concepts(self) -> bool:
        """Several named forget concepts (``--forget_concepts`` or ``--forget_manifest``)."""
        return self.forget_concepts is not None or self.forget_manifest is not None

    @property
    def forget_players_mode(self) -> Optional[str]:
        """``per_concept`` / ``pooled`` with several concepts, None with one forget set."""
        return (self.forget_players or "per_concept") if self.has_concepts else None

    def concept_specs(self):
        """The concepts as :class:`~hf_munba.diffusion.data.ForgetConceptSpec` (reads the
        manifest; raises :class:`~hf_munba.diffusion.data.DataValidationError`)."""
        from .data import DataValidationError, parse_forget_concept, read_forget_manifest

        if self.forget_concepts is not None:
            return [parse_forget_concept(v) for v in self.forget_concepts]
        if self.forget_manifest is None:
            return []
        specs = read_forget_manifest(self.forget_manifest)
        try:
            self.check_concept_names([s.name for s in specs])
        except ValueError as e:
            raise DataValidationError(str(e)) from None
        return specs

    def make_method(self, forget_names=None):
        """The registry's method object for ``method``, reading its settings from this config;
        ``forget_names``: one forget player per named concept (see ``--forget_players``)."""
        return get_method(self.method)(self, forget_names=forget_names)

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_component.startswith("text_encoder")

    def forget_rule(self):
        """A fresh satisfied-forget-player rule (``--method munba``), or None.

        Options of the rule given to a method without one are refused: they would do nothing.
        """
        method = self.make_method()
        if self.method != "munba":
            changed = [f for f, d in (("bargaining_power_forget", 1.0), ("forget_target", None),
                                      ("forget_target_mode", None)) if getattr(self, f) != d]
            if changed:
                raise ValueError(f"--{changed[0]} applies to --method munba only (munba-paper is "
                                 "the paper's plain rule, the other methods have no bargaining)")
            return None
        try:
            rule = method.forget_rule(self.forget_objective)
        except ValueError as e:
            raise ValueError(f"forget target options: {e}") from None
        if rule is None and not (math.isfinite(self.bargaining_power_forget)
                                 and self.bargaining_power_forget > 0):
            raise ValueError(f"--bargaining_power_forget must be positive, got "
                             f"{self.bargaining_power_forget}")
        return rule

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, include_secrets: bool = False) -> Dict[str, Any]:
        """The fields as JSON values; ``hub_token`` is left out unless ``include_secrets``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not include_secrets:
            for k in _SECRETS:
                out.pop(k, None)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SDUnlearningConfig":
        """A config from :meth:`to_dict`'s output (e.g. ``training_args.json``); unknown keys
        are refused, so a typo never passes silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SDUnlearningConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SDUnlearningConfig":
        with open(path) as f:
            values = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in values.items() if k in names})


@functools.lru_cache(maxsize=None)
def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(SDUnlearningConfig)


def _strip_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _choices(name: str):
    f = SDUnlearningConfig.__dataclass_fields__[name]
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    tp = _strip_optional(_hints()[name])
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def _literals_match_the_library() -> None:
    """The ``Literal`` choices are spelled out for type checkers and the CLI; they must be the
    library's own lists, or a new objective/subset would be refused by the CLI."""
    for name, library in (("forget_objective", FORGET_OBJECTIVES), ("target_model", TARGET_MODELS),
                          ("retain_objective", RETAIN_OBJECTIVES),
                          ("train_params", UNET_SUBSETS), ("forget_players", FORGET_PLAYER_MODES)):
        if tuple(_choices(name)) != tuple(library):
            raise RuntimeError(f"SDUnlearningConfig.{name} choices {_choices(name)} differ from "
                               f"the library's {library}")


_literals_match_the_library()


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One ``--<field>`` flag per config field: ``bool`` -> ``store_true``, ``List[str]`` ->
    ``nargs="+"``, ``Literal`` / ``choices`` -> argparse choices, no default -> required."""
    hints = _hints()
    for f in dataclasses.fields(SDUnlearningConfig):
        tp = _strip_optional(hints[f.name])
        kw: Dict[str, Any] = {"help": f.metadata["help"]}
        if "action" in f.metadata:  # e.g. "extend": a list flag that may also be repeated
            kw["action"] = f.metadata["action"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if tp is bool:
            kw["action"] = "store_true"
        else:
            if typing.get_origin(tp) in (list, List):
                kw["nargs"] = "+"
                tp = typing.get_args(tp)[0]
            choices = _choices(f.name)
            if choices is not None:
                kw["choices"] = choices
                tp = type(choices[0])
            kw["type"] = tp
        parser.add_argument(f"--{f.name}", **kw)
    return parser
