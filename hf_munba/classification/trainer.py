"""``MunbaTrainer``: machine unlearning for classifiers on the ``transformers.Trainer`` loop.

Users keep their Trainer habits (``TrainingArguments``, datasets with ``pixel_values`` and
``labels``, callbacks, checkpoints, ``accelerate launch``). The retain set is the Trainer's
``train_dataset`` so an epoch covers D_r once; the forget set is a second, independently
shuffled stream that cycles. Several forget sets (``forget_dataset={"cat": ..., "dog": ...}``)
are separate players, each with its own stream, so no concept dominates the others. Each
micro-batch runs one backward pass per player; on the last micro-batch of an optimizer step
the accumulated gradients are bargained (method ``munba``) and the Trainer then clips and
steps as usual. Hooking in at ``training_step`` (and
not re-writing the loop) keeps every Trainer feature working: gradient accumulation
(``accelerator.sync_gradients`` marks the last micro-batch), DDP ``no_sync``, autocast,
GradScaler, clipping, logging, evaluation, saving, resuming.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from ..bargaining import NashBargainer, SatisfactionRule
from ..unlearning.distributed import unsupported_distributed_message
from ..unlearning.methods import check_forget_names, settings_fields, validate_settings
from ..unlearning.step import SkippedStepGuard, TooManySkippedSteps, unlearning_step
from .forget_power import check_same_on_every_rank, default_forget_power
from .methods import FRONT_END, ClassifierContext, UnlearningMethod, available_methods, get_method
from .objectives import FORGET_LOSSES, RETAIN_OBJECTIVES, distilled_kl, get_forget_loss, retain_cross_entropy

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["MunbaArguments", "MunbaTrainerArguments", "MunbaTrainer", "ForgetStream", "NonFiniteTrainingError",
           "MUNBA_STATE_NAME", "last_complete_checkpoint", "forget_sets_by_player"]

MUNBA_STATE_NAME = "munba_state.json"


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` that a killed run finished writing, or None.

    ``transformers.trainer_utils.get_last_checkpoint`` takes the highest N even if the process
    died while writing it. A checkpoint is complete when it has our state (written first) and a
    parseable ``trainer_state.json`` (the Trainer writes it after weights, optimizer and RNG).
    """
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not (name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit()
                and os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                json.load(f)
            with open(os.path.join(path, MUNBA_STATE_NAME)) as f:
                json.load(f)
        except (OSError, ValueError):
            continue
        found.append((int(name.split("-")[-1]), path))
    return max(found)[1] if found else None


#: Too many consecutive optimizer steps had non-finite gradients (the one skip-guard error).
NonFiniteTrainingError = TooManySkippedSteps


@dataclass
class MunbaTrainerArguments:
    """The classifier front end's own options (the methods' settings are added to
    :data:`MunbaArguments` from the methods themselves; everything else is ``TrainingArguments``)."""

    method: str = field(default="munba", metadata={
        "help": f"unlearning method, one of {available_methods(FRONT_END)}"})
    forget_loss: Optional[str] = field(default=None, metadata={
        "help": f"forget loss, one of {sorted(FORGET_LOSSES)}; default: the method's own "
                "(random_label for munba/weighted/rl/salun, neg_ce for ga)"})
    retain_objective: str = field(default="ce", metadata={
        "help": "retain loss, 'ce' (the paper: cross-entropy on D_r) or 'distill' (KL from the "
                "original model's predictions on the same D_r batch: zero before unlearning, its "
                "gradient is the drift alone; costs a frozen copy of the model, or with a peft "
                "model its adapters switched off, and one no-grad forward per retain batch); "
                "only for methods with both a retain and a forget loss"})
    forget_batch_size: Optional[int] = field(default=None, metadata={
        "help": "forget micro-batch size per device; default per_device_train_batch_size"})
    max_consecutive_skips: int = field(default=10, metadata={
        "help": "stop with an error after this many consecutive non-finite steps"})

    def __post_init__(self):
        method = get_method(self.method)  # raises with the list of methods
        if self.forget_loss is not None and self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget_loss!r}; choose one of {sorted(FORGET_LOSSES)}")
        if self.retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"unknown retain_objective {self.retain_objective!r}; choose one of "
                             f"{RETAIN_OBJECTIVES}")
        if self.retain_objective == "distill" and not (method.uses_retain and method.uses_forget):
            raise ValueError(f"retain_objective='distill' needs a method with both a retain and a "
                             f"forget loss; {self.method!r} has "
                             f"{'no forget loss, so its only loss would be zero' if method.uses_retain else 'no retain loss'}"
                             "; use retain_objective='ce'")
        if self.forget_batch_size is not None and self.forget_batch_size < 1:
            raise ValueError(f"forget_batch_size must be >= 1, got {self.forget_batch_size}")
        if self.max_consecutive_skips < 1:
            raise ValueError("max_consecutive_skips must be >= 1")
        validate_settings(self, FRONT_END)  # each method's settings, by the method's own checks
        self.make_forget_rule()  # validates the target options together (one clear ValueError)

    def make_forget_rule(self) -> Optional[SatisfactionRule]:
        """The forget player's satisfaction rule for a bargaining method, or None."""
        return get_method(self.method)(self).forget_rule(self.forget_loss_name)

    @property
    def forget_loss_name(self) -> str:
        """The forget loss used: ``forget_loss``, or the method's default for classifiers."""
        return self.forget_loss or get_method(self.method).default_forget_loss[FRONT_END]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The inverse of :meth:`to_dict` (e.g. ``munba_args.json``, a checkpoint's state); an
        unknown key is an error, not silently dropped: it would be a setting that did not apply."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**dict(values))

    @classmethod
    def from_json_string(cls, text: str):
        return cls.from_dict(json.loads(text))


#: ``MunbaTrainer``'s options: :class:`MunbaTrainerArguments` plus every setting the classifier
#: methods declare (``forget_weight``, ``l1_alpha``, ``salun_ratio``, ``opposed_tol``,
#: ``bargaining_power_forget``, the ``forget_target*`` options, ...), assembled from the
#: method classes so a method and its settings live in one place. One flat dataclass, so
#: ``HfArgumentParser`` gives every setting its flag (``--salun_ratio 0.3``) with its help.
MunbaArguments = make_dataclass(
    "MunbaArguments", settings_fields(FRONT_END), bases=(MunbaTrainerArguments,),
    namespace={"__module__": __name__, "__doc__": (
        "Unlearning options of :class:`MunbaTrainer` (everything else is ``TrainingArguments``):\n"
        "the trainer's own (:class:`MunbaTrainerArguments`) and every classifier method's settings\n"
        "(:func:`hf_munba.unlearning.methods.method_settings`), validated in ``__post_init__``.")})


class ForgetStream:
    """An endless, seeded stream of forget batches: reshuffled every pass, sharded by rank.

    Its whole state is (pass, position), so checkpoints store two integers and a resumed run
    draws exactly the batches the uninterrupted run would have drawn. Pass ``k`` uses the
    permutation from ``seed`` and ``k``; rank ``r`` of ``w`` takes every ``w``-th entry.
    """

    def __init__(self, dataset, batch_size: int, collate_fn, seed: int,
                 rank: int = 0, world_size: int = 1):
        n = len(dataset)
        if n < world_size:
            raise ValueError(f"forget set has {n} samples, fewer than the {world_size} processes")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.shard_len = n // world_size
        self.batch_size = min(batch_size, self.shard_len)
        self.epoch = 0
        self.position = 0
        self.batches_drawn = 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        return perm[self.rank::self.world_size][: self.shard_len]

    def next_indices(self) -> List[int]:
        out: List[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position: self.position + self.batch_size - len(out)].tolist()
            out += take
            self.position += len(take)
            if self.position >= self.shard_len:
                self.epoch, self.position = self.epoch + 1, 0
        self.batches_drawn += 1
        return out

    def __next__(self) -> Dict[str, Any]:
        return self.collate_fn([self.dataset[i] for i in self.next_indices()])

    def __iter__(self):
        return self

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches_drawn = int(state["batches_drawn"])


def forget_sets_by_player(forget_dataset, method: str) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
    """``forget_dataset`` as (concept names, player name -> dataset), checked before any model work.

    One dataset: one pooled forget player, ``forget`` (no names). A mapping name -> dataset:
    one player per concept, ``forget_<name>``, so each concept's gradient is its own proposal
    in the bargain (a mapping with a single entry is the pooled player). Empty datasets, bad
    names, and several sets for a method that uses no D_f are one ``ValueError`` each.
    """
    method_cls = get_method(method)
    if forget_dataset is None:
        if method_cls.uses_forget:
            raise ValueError(f"method {method!r} needs a forget_dataset")
        return (), {}
    if isinstance(forget_dataset, (list, tuple)):
        raise ValueError("forget_dataset must be one dataset (one pooled forget player) or a dict "
                         "name -> dataset (one player per concept), not a "
                         f"{type(forget_dataset).__name__}")
    if isinstance(forget_dataset, Mapping):
        if not forget_dataset:
            raise ValueError("forget_dataset is an empty dict: give at least one concept")
        names = tuple(forget_dataset)
        if len(names) > 1:
            check_forget_names(names)  # letters/digits/_-., unique; part of log keys and state
            if not method_cls.uses_forget:
                raise ValueError(f"method {method!r} uses no forget set, but {len(names)} forget sets "
                                 f"were given ({list(names)}); choose a method that unlearns D_f")
        for n, ds in forget_dataset.items():
            if ds is None or (method_cls.uses_forget and len(ds) == 0):
                raise ValueError(f"the forget set of concept {n!r} is empty")
        if len(names) == 1:
            return (), {"forget": forget_dataset[names[0]]}
        return names, {f"forget_{n}": forget_dataset[n] for n in names}
    if method_cls.uses_forget and len(forget_dataset) == 0:
        raise ValueError("forget_dataset is empty")
    return (), {"forget": forget_dataset}


class MunbaTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns ``forget_dataset`` while keeping ``train_dataset``.

    ``train_dataset`` is the retain set D_r. With no unlearning options it runs the paper's
    method (``munba`` with the random-label forget loss). Logs ``loss_retain``,
    ``loss_forget`` and, for ``munba``, the bargaining ``munba/cos`` and ``munba/weight_*``.
    The loss logged as ``loss`` is L_r + L_f (for ``ga``: -CE on D_f). The number of steps
    always follows the retain loader (epochs x |D_r| / batch), also for ``ga``, which ignores
    the retain batches: give ``ga`` a ``max_steps``.

    ``forget_dataset`` is one dataset (every forget sample in one pooled player) or a dict
    name -> dataset: one bargaining player per concept (``forget_<name>``), each with its own
    stream drawing one forget batch per micro-batch (``forget_batch_size`` each), its own
    satisfied-player rule, and its own logs (``loss_forget_<name>``,
    ``munba/weight_forget_<name>``, ``munba/cos_<a>_<b>`` for every pair). Why: a pooled loss
    is an average over concepts, so the concept with the largest, best-aligned gradient sets
    the direction and a hard concept can stay unforgotten; separate players each need a
    positive gain on every step. ``loss`` is then L_r + the sum of the concepts' losses, and
    the ``weighted`` sum gives each concept ``forget_weight``.
    """

    def __init__(self, model=None, args=None, *, forget_dataset=None,
                 munba_args: Optional[MunbaArguments] = None, method: Optional[str] = None,
                 forget_loss: Optional[str] = None, forget_weight: Optional[float] = None,
                 **kwargs):
        munba_args = munba_args or MunbaArguments()
        overrides = {k: v for k, v in dict(method=method, forget_loss=forget_loss,
                                            forget_weight=forget_weight).items() if v is not None}
        if overrides:
            munba_args = MunbaArguments(**{**munba_args.to_dict(), **overrides})
        method_cls = get_method(munba_args.method)
        if FRONT_END not in method_cls.front_ends:
            raise ValueError(f"method {munba_args.method!r} is not for classifiers; choose one of "
                             f"{available_methods(FRONT_END)}")
        forget_names, forget_sets = forget_sets_by_player(forget_dataset, munba_args.method)
        train_dataset = kwargs.get("train_dataset")
        if method_cls.uses_retain and train_dataset is not None and len(train_dataset) == 0:
            raise ValueError("train_dataset (the retain set) is empty")
        chosen_power = bool(forget_sets) and munba_args.bargaining_power_forget is None \
            and "bargaining_power_forget" in method_cls.settings
        if chosen_power:  # None: 1 for classes, less for samples of kept classes (forget_power)
            munba_args = replace(munba_args, bargaining_power_forget=default_forget_power(
                forget_sets.values(), train_dataset))
        if args is not None and getattr(args, "fp16", False) and not torch.cuda.is_available():
            raise ValueError("fp16 mixed precision needs a CUDA GPU; on CPU use bf16 or fp32")
        super().__init__(model=model, args=args, **kwargs)
        engine = "DEEPSPEED" if self.is_deepspeed_enabled else ("FSDP" if self.is_fsdp_enabled else None)
        refused = unsupported_distributed_message(bargains=method_cls.bargains, distributed_type=engine)
        if refused:  # the one rule both front ends apply (hf_munba.unlearning.distributed)
            raise ValueError(f"MunbaTrainer: {refused}")
        if chosen_power and self.accelerator.num_processes > 1:
            check_same_on_every_rank(munba_args.bargaining_power_forget)
        self.munba_args = munba_args
        self.method: UnlearningMethod = method_cls(munba_args, forget_names=forget_names)
        self.forget_dataset = forget_dataset
        #: forget player name ("forget", or "forget_<name>" per concept) -> its dataset
        self.forget_datasets: Dict[str, Any] = forget_sets
        self.bargainer: Optional[NashBargainer] = None
        #: the pooled forget player's rule; with several concepts see ``forget_rules``
        self.forget_rule: Optional[SatisfactionRule] = None
        #: one rule per concept (bargainer index -> rule) when there are several forget players
        self.forget_rules: Dict[int, SatisfactionRule] = {}
        self._forget_streams: Dict[str, ForgetStream] = {}
        self._forget_loss = get_forget_loss(munba_args.forget_loss_name)
        self.skip_guard = SkippedStepGuard(munba_args.max_consecutive_skips)
        self._logs_acc: Dict[str, List[float]] = {}
        self._step_losses: Optional[torch.Tensor] = None
        self._stepped = True
        self._grad_norm: Optional[float] = None
        #: the original model for ``retain_objective='distill'`` (a frozen copy; None with peft,
        #: whose adapters are switched off instead, or for the cross-entropy retain loss)
        self._original: Optional[torch.nn.Module] = None

    @property
    def num_nonfinite_steps(self) -> int:
        """Optimizer steps skipped so far (non-finite, or no direction helped any player)."""
        return self.skip_guard.total

    # ------------------------------------------------------------------ data
    def _forget_collator(self):
        collator = self.data_collator
        if self.args.remove_unused_columns and hasattr(self, "_get_collator_with_removed_columns"):
            collator = self._get_collator_with_removed_columns(collator, description="forget")
        return collator

    @property
    def _forget_stream(self) -> Optional[ForgetStream]:
        """The pooled forget player's stream (None with several concepts or no D_f)."""
        return self._forget_streams.get("forget")

    def _new_forget_stream(self, player: str = "forget") -> ForgetStream:
        """A fresh stream of one forget player. The pooled one is seeded with ``args.seed`` (as
        always); concept k's with a seed of its own, so the concepts' shuffles and random labels
        are not the same draws."""
        bs = self.munba_args.forget_batch_size or self.args.per_device_train_batch_size
        k = list(self.forget_datasets).index(player)
        seed = self.args.seed if player == "forget" else self.args.seed + 7919 * (k + 1)
        try:
            return ForgetStream(self.forget_datasets[player], bs, self._forget_collator(), seed,
                                rank=self.args.process_index, world_size=self.args.world_size)
        except ValueError as e:
            raise ValueError(f"{player}: {e}") from None

    def _new_forget_streams(self) -> Dict[str, ForgetStream]:
        return {player: self._new_forget_stream(player) for player in self.forget_datasets}

    def iter_forget_batches_once(self) -> Iterator[Dict[str, Any]]:
        """Every forget sample once, in order, on the model's device (for method setup); with
        several concepts, every concept's samples (concept after concept)."""
        bs = self.munba_args.forget_batch_size or self.args.per_device_train_batch_size
        for ds in self.forget_datasets.values():
            yield from self._iter_batches_once(ds, range(len(ds)), bs)

    def iter_retain_batches_once(self) -> Iterator[Dict[str, Any]]:
        """Every retain sample once, in a seeded random order, on the model's device (for setup)."""
        order = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(self.args.seed))
        yield from self._iter_batches_once(self.train_dataset, order.tolist(),
                                           self.args.per_device_train_batch_size)

    def _iter_batches_once(self, dataset, order, bs: int) -> Iterator[Dict[str, Any]]:
        collate, order = self._forget_collator(), list(order)
        for start in range(0, len(order), bs):
            yield self._prepare_inputs(collate([dataset[i] for i in order[start:start + bs]]))

    @staticmethod
    def model_logits(model, inputs: Dict[str, Any]) -> torch.Tensor:
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return out.logits if hasattr(out, "logits") else out[0]

    # -------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        try:
            return self._train_unlearning(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:  # a method's last word before the model is saved (BE drops its shadow class)
            finish = getattr(self.method, "finish", None)
            if finish is not None:
                finish(self.accelerator.unwrap_model(self.model))

    def _train_unlearning(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Method setup (SalUn's mask, retrain's re-initialisation) sees the weights the user
        # passed in, before any checkpoint is loaded, so a resumed run prepares identically.
        t0 = time.time()
        if self.munba_args.retain_objective == "distill" and self._original is None \
                and not _is_peft(self.model):
            # Copied before the method's setup (Scissorhands trims weights there) and before any
            # checkpoint is loaded: what the retain player keeps is the model the user passed in.
            self._original = copy.deepcopy(self.model).requires_grad_(False)
        self.method.setup(self.model, ClassifierContext(
            self.iter_forget_batches_once, self.model_logits, self.args.seed,
            retain_batches=self.iter_retain_batches_once if self.train_dataset is not None else None))
        if not getattr(self.method, "trains", True):  # e.g. IU: setup was the whole method
            from transformers.trainer_utils import TrainOutput

            return TrainOutput(0, 0.0, {"train_runtime": time.time() - t0})
        self._forget_streams = self._new_forget_streams() if self.method.uses_forget else {}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.bargainer = self.method.make_bargainer(trainable)
        if self.method.forget_names:  # one rule per concept: each is satisfied on its own loss
            self.forget_rule = None
            self.forget_rules = self.method.forget_rules(self.munba_args.forget_loss_name)
        else:
            self.forget_rule = self.munba_args.make_forget_rule()
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        if isinstance(resume_from_checkpoint, str) and self.args.max_steps > 0:
            from transformers.trainer_callback import TrainerState
            from transformers.trainer_utils import TrainOutput

            state_file = os.path.join(resume_from_checkpoint, "trainer_state.json")
            state = TrainerState.load_from_json(state_file) if os.path.isfile(state_file) else None
            if state is not None and state.global_step >= self.args.max_steps:
                # The run had finished (e.g. it was killed while writing its final model). The
                # Trainer would still run one more forward/backward/step from here; only restore.
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._reload_renamed_weights(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MUNBA_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} has no {MUNBA_STATE_NAME}: it was not "
                             "written by MunbaTrainer and cannot be resumed exactly")
        with open(path) as f:
            state = json.load(f)
        if state.get("method") != self.munba_args.method:
            raise ValueError(f"checkpoint was trained with method {state.get('method')!r}, "
                             f"not {self.munba_args.method!r}")
        saved_names = list(state.get("forget_names", []))
        if saved_names != list(self.method.forget_names):
            raise ValueError(f"checkpoint was trained with forget players {saved_names or 'pooled'}, "
                             f"not {list(self.method.forget_names) or 'pooled'}")
        if self._forget_stream is not None and state.get("forget_stream"):
            self._forget_stream.load_state_dict(state["forget_stream"])
        for player, stream_state in state.get("forget_streams", {}).items():
            self._forget_streams[player].load_state_dict(stream_state)
        if "skip_guard" in state:
            self.skip_guard.load_state_dict(state["skip_guard"])
        else:  # written before the shared skip guard: only the total was kept
            self.skip_guard.total = int(state.get("num_nonfinite_steps", 0))
        if self.bargainer is not None:
            self.bargainer.load_state_dict(state.get("bargainer", {}))
        if self.forget_rule is not None and state.get("forget_rule"):
            self.forget_rule.load_state_dict(state["forget_rule"])
        players = self.method.players()
        for player, rule_state in state.get("forget_rules", {}).items():
            self.forget_rules[players.index(player)].load_state_dict(rule_state)

    def _reload_renamed_weights(self, checkpoint: str, model=None) -> None:
        """The Trainer restores ``model.safetensors`` with a plain ``load_state_dict(strict=False)``,
        but transformers 5 saves some models (ViT among them) under their legacy parameter names
        and renames them only inside ``from_pretrained``: every renamed weight would silently keep
        its current value. Such checkpoints are reloaded through ``from_pretrained``."""
        from safetensors import safe_open
        from transformers import PreTrainedModel

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = os.path.join(checkpoint, "model.safetensors")
        if not isinstance(model, PreTrainedModel) or not os.path.isfile(weights):
            return
        with safe_open(weights, framework="pt") as f:
            saved = set(f.keys())
        if saved <= set(model.state_dict()):
            return
        loaded = type(model).from_pretrained(checkpoint, use_safetensors=True,
                                             dtype=next(model.parameters()).dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k not in saved]  # restored by name above (BE: shadow row)
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def _munba_state(self) -> Dict[str, Any]:
        state = {"method": self.munba_args.method, "munba_args": self.munba_args.to_dict(),
                 "num_nonfinite_steps": self.num_nonfinite_steps,
                 "skip_guard": self.skip_guard.state_dict()}
        if self.method.forget_names:  # several concepts: every stream and rule by player name
            state["forget_names"] = list(self.method.forget_names)
            state["forget_streams"] = {p: s.state_dict() for p, s in self._forget_streams.items()}
            players = self.method.players()
            state["forget_rules"] = {players[i]: r.state_dict() for i, r in self.forget_rules.items()}
        elif self._forget_stream is not None:
            state["forget_stream"] = self._forget_stream.state_dict()
        if self.bargainer is not None:
            state["bargainer"] = self.bargainer.state_dict()
        if self.forget_rule is not None:
            state["forget_rule"] = self.forget_rule.state_dict()
        return state

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, so a checkpoint whose trainer_state.json exists
        # (the Trainer's last file; see last_complete_checkpoint) always has ours too.
        if self.args.should_save:
            out = os.path.join(self._get_output_dir(trial=trial),
                               f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(out, exist_ok=True)
            tmp = os.path.join(out, MUNBA_STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self._munba_state(), f, indent=2)
            os.replace(tmp, os.path.join(out, MUNBA_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        self._save_extras(output_dir if output_dir is not None else self.args.output_dir)

    def _save_extras(self, output_dir: str) -> None:
        """Arguments as redacted JSON: the Trainer pickles TrainingArguments (hub_token included)
        into training_args.bin; we drop that file so no token and no pickle ends up on disk."""
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        bin_path = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(bin_path):
            os.remove(bin_path)
        args = json.loads(self.args.to_json_string())
        for key in list(args):
            if "token" in key.lower():
                args[key] = None
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            json.dump(args, f, indent=2, sort_keys=True)
        with open(os.path.join(output_dir, "munba_args.json"), "w") as f:
            f.write(self.munba_args.to_json_string())

    def _guard_skipped_steps(self) -> None:
        """Make the Trainer's own ``optimizer.step()`` a no-op that reports our step's outcome.

        The optimizer step runs in :func:`~hf_munba.unlearning.unlearning_step` (called from
        ``training_step`` on the last micro-batch), the same function the SD loop runs: combine,
        clip, skip guard, step. The Trainer still calls ``optimizer.step()`` afterwards; that
        call does nothing, and a skipped step is reported through accelerate's
        ``optimizer_step_was_skipped`` (as for a GradScaler overflow) so the Trainer does not
        advance the learning-rate schedule either: the schedule counts the updates really
        made. Its clipping is replaced by ours (``_clip_grad_norm``), so gradients are clipped
        once. The wrapper is an instance attribute of the accelerate optimizer (installed
        once); checkpointed ``state_dict()`` is unaffected.
        """
        optimizer = self.optimizer
        if optimizer is None or getattr(optimizer, "_munba_skip_guard", False):
            return
        if not hasattr(optimizer, "_is_overflow"):
            raise RuntimeError("MunbaTrainer needs accelerate's AcceleratedOptimizer (its step_was_skipped "
                               "flag) to skip optimizer steps; got " + type(optimizer).__name__)
        real_step = optimizer.step
        self._real_optimizer = _StepOnly(real_step, optimizer)

        @functools.wraps(real_step)  # keeps the marks torch's LR scheduler put on step()
        def step(*args, **kwargs):
            if not self._stepped:
                optimizer._is_overflow = True  # -> optimizer_step_was_skipped: no scheduler step
            return None  # a real step (and a GradScaler overflow) already set the flag itself

        optimizer.step = step
        optimizer._munba_skip_guard = True

    def _clip_grad_norm(self, model):
        return self._grad_norm  # clipped once, inside unlearning_step

    def _get_grad_norm(self, model, grad_norm=None):
        return self._grad_norm

    def _backward_player(self, name: str, loss: torch.Tensor) -> None:
        with self.bargainer.player(self.method.players().index(name)) as scale:
            self.accelerator.backward(loss * scale if scale != 1.0 else loss)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._guard_skipped_steps()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        div = float(self.current_gradient_accumulation_steps)
        total = torch.zeros((), device=self.args.device)
        step_losses = torch.zeros(len(self.method.players()), device=self.args.device)
        if self.method.uses_retain:
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            with self.compute_loss_context_manager():
                loss_r = self.method.retain_loss(self._retain_base_loss(model, inputs, labels),
                                                 model) / div
            del inputs
            self._backward_player("retain", loss_r)
            total = total + loss_r.detach()
            step_losses[self.method.players().index("retain")] = loss_r.detach().float()
        players = self.method.players()
        for player, stream in self._forget_streams.items():  # one batch, one backward per concept
            gen = torch.Generator().manual_seed(  # the random labels: one draw per stream and batch
                (stream.seed * 1_000_003 + stream.batches_drawn) * 131 + self.args.process_index)
            f_inputs = self._prepare_inputs(next(stream))
            labels = f_inputs["labels"]
            with self.compute_loss_context_manager():
                loss_f = self.method.forget_loss(
                    self._forget_batch_loss(model, f_inputs, labels, gen), model) / div
            del f_inputs
            self._backward_player(player, loss_f)
            total = total + loss_f.detach()
            step_losses[players.index(player)] = loss_f.detach().float()
        self._step_losses = step_losses if self._step_losses is None \
            else self._step_losses + step_losses
        if self.accelerator.sync_gradients:
            self._finish_step()
        return total

    def _retain_base_loss(self, model, inputs, labels) -> torch.Tensor:
        """The retain player's loss on one D_r batch, before the method's own additions."""
        logits = self.model_logits(model, inputs)
        if self.munba_args.retain_objective == "ce":
            return retain_cross_entropy(logits, labels)
        with torch.no_grad():
            if self._original is not None:
                # Same mode as the trained model, so at the start both give the same logits
                # (batch-norm on batch statistics in train mode).
                self._original.train(model.training)
                original_logits = self.model_logits(self._original, inputs)
            else:  # peft: the same model with its adapters off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    original_logits = self.model_logits(model, inputs)
        return distilled_kl(logits, original_logits)

    def _forget_batch_loss(self, model, inputs, labels, generator) -> torch.Tensor:
        """The forget loss on one batch; a classifier method may compute its own (BE, BS)."""
        default = functools.partial(self._forget_loss, generator=generator)
        own = getattr(self.method, "forget_batch_loss", None)
        if own is not None:
            return own(model, inputs, labels, logits=self.model_logits, default=default)
        return default(self.model_logits(model, inputs), labels)

    def _finish_step(self) -> None:
        """Once per optimizer step: the shared unlearning step (combine, clip, guard, step)."""
        losses, self._step_losses = self._step_losses, None
        accelerator = self.accelerator
        max_norm = self.args.max_grad_norm
        params = self.bargainer.params
        self.optimizer._is_overflow = False  # a GradScaler step sets it again itself
        result = unlearning_step(
            self.bargainer, self._real_optimizer, losses=losses,
            reduce=(lambda t: accelerator.reduce(t, "mean")) if self.args.world_size > 1 else None,
            clip=(lambda: accelerator.clip_grad_norm_(params, max_norm)) if max_norm and max_norm > 0
            else None,
            scaler=getattr(accelerator, "scaler", None), forget_rule=self.forget_rule,
            forget_rules=self.forget_rules or None,
            forget_player=self.method.forget_player or 0, powers=self.method.powers(),
            edit_gradients=self.method.edit_gradients, guard=self.skip_guard,
            step=self.state.global_step + 1, zero_grad=True, player_names=self.method.players())
        self._stepped = result.stepped
        self._grad_norm = result.grad_norm if result.stepped and math.isfinite(result.grad_norm) \
            else None
        logs = {k.replace("loss/", "loss_"): v for k, v in result.logs.items()
                if k not in ("grad_norm", "step_skipped", "skipped_steps")}
        logs["munba/nonfinite_steps_total"] = float(self.num_nonfinite_steps)
        for k, v in logs.items():
            if v is not None:
                self._logs_acc.setdefault(k, []).append(float(v))

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._logs_acc:
            for k, vals in self._logs_acc.items():
                finite = [v for v in vals if math.isfinite(v)]
                if k.endswith("_total"):
                    logs[k] = vals[-1]
                elif finite:
                    logs[k] = sum(finite) / len(finite)
            self._logs_acc = {}
        super().log(logs, start_time)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class _StepOnly:
    """The accelerate optimizer's real ``step`` for :func:`unlearning_step`, with its other
    methods (``zero_grad``, ``param_groups``) passed through."""

    def __init__(self, step, optimizer):
        self.step = step
        self._optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self._optimizer, name)
