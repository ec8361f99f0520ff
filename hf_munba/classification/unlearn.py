"""Unlearning a classifier in one call: :func:`unlearn_classifier`, and the function the script runs.

``training/train_munba_classifier.py`` parses its flags, loads the model and the data, and calls
:func:`run_unlearning`; :func:`unlearn_classifier` is the same path for Python users, from a
model (object or local folder) and a ``datasets.Dataset``/``DatasetDict``. Both split D_f / D_r
(:func:`split_forget_sets`), run :class:`~hf_munba.classification.trainer.MunbaTrainer`, evaluate
(Acc on D_f, D_r, D_t, MIA-efficacy, and Acc on each forgotten concept) and, given an output
folder, save the model, its image processor, ``unlearning_metrics.json`` and a model card, all
staged and moved in at the end (:mod:`hf_munba.utils.atomic_save`), so an interrupted run never
leaves a half-written model behind.

Several forget classes: one pooled forget player by default, or each class its own bargaining
player (``per_class``, and always for a dict of named concepts). Separate players keep a hard
concept from being drowned by an easy one in one averaged loss, the dominance Nash bargaining
exists to prevent; but on the digits benchmark (docs/classification.md) pooling forgot both
classes more reliably and kept as much, so the measured better choice stays the default.
Methods that use no forget set (``ft``, ``l1``, ``retrain``) only exclude D_f.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .forget_sets import ForgetSpec, forget_indices, parse_forget_classes

__all__ = ["FORGET_PLAYERS", "ForgetPlan", "UnlearningResult", "forget_plan", "split_forget_sets",
           "run_unlearning", "unlearn_classifier", "CHECKPOINTS"]

#: how several forget classes enter the bargain (``None``/``"auto"``: pooled for a list of
#: classes, one player per concept for a dict)
FORGET_PLAYERS = ("per_class", "pooled")
CHECKPOINTS = "checkpoints"  # checkpoints go to <output_dir>/checkpoints


@dataclass
class ForgetPlan:
    """What is forgotten (``spec``: the union, as one :class:`ForgetSpec`), its concepts
    (name -> label ids, several forget classes only) and whether each concept is its own
    bargaining player (``per_concept``) or all are pooled into one."""

    spec: ForgetSpec
    concepts: Dict[str, List[int]] = field(default_factory=dict)
    per_concept: bool = False

    def to_dict(self) -> dict:
        """The record in ``unlearning_metrics.json`` and the model card (one class: the spec)."""
        out = self.spec.to_dict()
        if self.concepts:
            out["players"] = "per_class" if self.per_concept else "pooled"
            out["concepts"] = {n: list(c) for n, c in self.concepts.items()}
        return out


def _concept_name(label: str, label_id: int) -> str:
    """A label as a player name (tracker keys, checkpoint state): unsafe characters become '_'."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(label))
    return name if name and name[0].isalnum() else f"class{label_id}"


def forget_plan(classes=None, fraction: Optional[float] = None, indices: Optional[Sequence[int]] = None,
                seed: int = 0, players: Optional[str] = None, label_names: Optional[Sequence[str]] = None,
                method: str = "munba") -> ForgetPlan:
    """A :class:`ForgetPlan` from what the user gave, checked before any model work.

    ``classes``: label ids or names (a list, or a comma-separated string), or a dict
    name -> classes (one player per named concept; a concept may hold several classes).
    ``players``: ``per_class``, ``pooled`` or None. None pools a list of classes into one forget
    player (what hf_munba always did; on the digits benchmark pooling forgot both classes more
    reliably than per-class players, docs/classification.md) and gives a dict one player per
    concept. ``fraction``/``indices``: one pooled forget set.
    """
    from .methods import get_method

    if players not in (None, "auto", *FORGET_PLAYERS):
        raise ValueError(f"forget players must be one of {list(FORGET_PLAYERS)}, got {players!r}")
    label2id = {str(n): i for i, n in enumerate(label_names)} if label_names else None
    if classes is not None and (fraction is not None or indices is not None):
        raise ValueError("give exactly one of forget classes, forget fraction or forget indices")

    def ids(value) -> List[int]:
        if isinstance(value, str):
            return parse_forget_classes(value, label2id)
        if isinstance(value, (int, np.integer)):
            return [int(value)]
        return [c for v in value for c in (parse_forget_classes(v, label2id) if isinstance(v, str)
                                         else [int(v)])]

    if classes is None:
        if players == "per_class":
            raise ValueError("per-class forget players need forget classes (a fraction or a list "
                             "of indices is one pooled forget set)")
        return ForgetPlan(ForgetSpec(fraction=fraction, indices=None if indices is None else list(indices),
                                     seed=seed))
    if isinstance(classes, Mapping):
        if players == "pooled":
            raise ValueError("a dict of concepts is one player per concept; to pool them, give "
                             "their classes as one list")
        concepts = {str(n): ids(v) for n, v in classes.items()}
        for n, c in concepts.items():
            if not c:
                raise ValueError(f"concept {n!r} has no forget classes")
        explicit = True
    else:
        flat = ids(classes)
        dup = sorted({c for c in flat if flat.count(c) > 1})
        if dup:
            raise ValueError(f"forget classes are repeated: {dup}")
        names = [_concept_name(label_names[c] if label_names and 0 <= c < len(label_names) else c, c)
                 for c in flat]
        if len(set(names)) < len(names):
            names = [f"class{c}" for c in flat]
        concepts = dict(zip(names, ([c] for c in flat)))
        explicit = players == "per_class"
    union = [c for cs in concepts.values() for c in cs]
    overlap = sorted({c for c in union if union.count(c) > 1})
    if overlap:
        raise ValueError(f"forget classes {overlap} belong to more than one concept")
    spec = ForgetSpec(classes=union, seed=seed)
    if len(concepts) == 1:
        return ForgetPlan(spec)
    uses_forget = get_method(method).uses_forget
    per_concept = explicit  # a dict, or players="per_class"
    if per_concept:
        from ..unlearning.methods import check_forget_names

        check_forget_names(list(concepts))
        if not uses_forget:
            raise ValueError(f"method {method!r} uses no forget set, so its forget classes cannot "
                             "be separate players; leave out per_class (they are only left out of D_r)")
    return ForgetPlan(spec, concepts, per_concept)


def split_forget_sets(train, plan: Optional[ForgetPlan], label_column: str = "labels"):
    """(D_f, per-concept D_f or None, D_r) as selections of ``train``. D_f is the union of the
    concepts (what is evaluated as "the forget set"); D_r is everything else. ``plan=None``:
    nothing forgotten, D_r is the whole split (how the original model is trained)."""
    if plan is None:
        return None, None, train
    if label_column not in train.column_names:
        raise ValueError(f"dataset has no {label_column!r} column (columns: {train.column_names})")
    feature = train.features[label_column]
    labels = np.asarray(train.with_format(None)[label_column])  # no transform on a labels-only batch
    idx = forget_indices(labels, plan.spec, getattr(feature, "num_classes", None))
    mask = np.ones(len(train), dtype=bool)
    mask[idx] = False
    forget, retain = train.select(idx.tolist()), train.select(np.flatnonzero(mask).tolist())
    concepts = None
    if plan.concepts:
        concepts = {n: train.select(np.flatnonzero(np.isin(labels, c)).tolist())
                    for n, c in plan.concepts.items()}
    return forget, concepts, retain


@dataclass
class UnlearningResult:
    """The unlearned model (unwrapped), the final metrics, and the trainer that ran."""

    model: Any
    metrics: Dict[str, float]
    trainer: Any = None


def run_unlearning(model, train, test, *, plan: Optional[ForgetPlan], munba_args, training_args,
                   output_dir: Optional[str] = None, overwrite_output_dir: bool = False,
                   processor=None, base_model: str = "", dataset_name: str = "",
                   eval_batch_size: int = 256, mia: Optional[bool] = None) -> UnlearningResult:
    """Split, unlearn, evaluate and (with ``output_dir``) save: the library half of the script.

    ``training_args.output_dir`` is replaced by ``<output_dir>/checkpoints`` (or a temporary
    folder, removed afterwards, when ``output_dir`` is None); ``training_args
    .resume_from_checkpoint`` (a folder or ``latest``) continues from those checkpoints.
    ``mia``: measure MIA-efficacy (needs scikit-learn and a test split); None: when possible.
    """
    from ..evaluation.classification import evaluate_unlearning, predict_confidences
    from ..utils.atomic_save import ensure_output_dir, staged_output
    from .data import sklearn_available
    from .model_io import write_model_card
    from .trainer import MunbaTrainer

    forget, concepts, retain = split_forget_sets(train, plan)
    trainer_forget = concepts if plan is not None and plan.per_concept else forget
    resume = training_args.resume_from_checkpoint
    tmp = None
    if output_dir is not None:
        if training_args.process_index == 0:  # other ranks never look (they would race with it)
            ensure_output_dir(output_dir, overwrite_output_dir, allow_existing=resume is not None)
            if overwrite_output_dir and resume is None:
                shutil.rmtree(os.path.join(output_dir, CHECKPOINTS), ignore_errors=True)
        training_args.output_dir = os.path.join(output_dir, CHECKPOINTS)
    else:
        tmp = tempfile.mkdtemp(prefix="hf_munba-")
        training_args.output_dir = tmp
    try:
        trainer = MunbaTrainer(model=model, args=training_args, train_dataset=retain,
                               forget_dataset=trainer_forget, munba_args=munba_args)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.accelerator.wait_for_everyone()
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not trainer.is_world_process_zero():
            return UnlearningResult(model, {}, trainer)
        if mia is None:
            mia = forget is not None and test is not None and sklearn_available()
        metrics = evaluate_unlearning(model, forget, retain, test, batch_size=eval_batch_size,
                                      mia=bool(mia) and test is not None)
        for name, ds in (concepts or {}).items():  # each concept's own forgetting
            pred, _, lab = predict_confidences(model, ds, batch_size=eval_batch_size)
            metrics[f"acc_forget_{name}"] = 100.0 * float(np.mean(pred == lab))
        metrics["runtime_s"] = float(result.metrics.get("train_runtime", float("nan")))
        metrics["nonfinite_steps"] = trainer.num_nonfinite_steps
        if output_dir is not None:
            record = plan.to_dict() if plan is not None else {}
            with staged_output(output_dir) as stage:
                if hasattr(model, "prompt_ids"):  # CLIP zero-shot wrapper: its own save format
                    model.save_pretrained(stage)
                    trainer._save_extras(stage)
                else:
                    trainer.save_model(stage)
                if processor is not None:
                    processor.save_pretrained(stage)
                with open(os.path.join(stage, "unlearning_metrics.json"), "w") as f:
                    json.dump({"forget": record, "method": munba_args.method, "metrics": metrics}, f,
                              indent=2)
                write_model_card(stage, base_model=base_model, method=munba_args.method,
                                 forget=record, metrics=metrics,
                                 munba_args=trainer.munba_args.to_dict(),  # as run (e.g. the forget power chosen)
                                 dataset=dataset_name, training_args=training_args)
        return UnlearningResult(model, metrics, trainer)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _split_options(options: Mapping[str, Any]):
    """``options`` -> (TrainingArguments keywords, MunbaArguments keywords); unknown -> one error."""
    from transformers import TrainingArguments

    from .trainer import MunbaArguments

    targ_names = {f.name for f in fields(TrainingArguments) if f.init}
    munba_names = {f.name for f in fields(MunbaArguments) if f.init}
    unknown = sorted(set(options) - targ_names - munba_names)
    if unknown:
        hints = {k: difflib.get_close_matches(k, targ_names | munba_names, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"unknown option(s) {said}: options are TrainingArguments or MunbaArguments "
                         "fields (e.g. learning_rate, max_steps, forget_batch_size)")
    return ({k: v for k, v in options.items() if k in targ_names},
            {k: v for k, v in options.items() if k in munba_names})


def _check_split(ds):
    """(split with a ``labels`` column, the image column to transform or None), before any model
    work: a ``label`` column is renamed; ``pixel_values`` is used as is, an ``image`` (or ``img``)
    column is transformed on the fly by the image processor (as the script's imagefolder data)."""
    if ds is None:
        return None, None
    cols = ds.column_names
    if "labels" not in cols:
        if "label" not in cols:
            raise ValueError(f"the dataset needs a 'labels' (or 'label') column; it has {cols}")
        ds = ds.rename_column("label", "labels")
    if "pixel_values" in ds.column_names:
        return ds, None
    image_col = next((c for c in ("image", "img") if c in ds.column_names), None)
    if image_col is None:
        raise ValueError(f"the dataset needs a 'pixel_values' or an 'image' column; it has {ds.column_names}")
    return ds, image_col


def unlearn_classifier(model, dataset, forget_classes: Union[None, str, Sequence, Mapping] = None, *,
                       forget_indices: Optional[Sequence[int]] = None,
                       forget_fraction: Optional[float] = None, forget_seed: int = 0,
                       forget_players: Optional[str] = None, method: str = "munba",
                       output_dir: Optional[str] = None, overwrite_output_dir: bool = False,
                       image_processor=None, test_dataset=None, eval_batch_size: int = 256,
                       return_metrics: bool = False, **options):
    """Unlearn classes or samples from an image classifier in one call; returns the unlearned model.

    Args:
        model: a ``transformers`` image classifier (e.g. ``AutoModelForImageClassification``)
            or a local folder holding one (safetensors; its image processor is used if saved).
        dataset: a ``datasets.DatasetDict`` (``train``, and ``test`` if it has one: the held-out
            split of the evaluation) or a ``datasets.Dataset`` (the training data only). Columns:
            ``labels`` (or ``label``) and ``pixel_values``, or an ``image`` column that
            ``image_processor`` (or the model folder's) turns into ``pixel_values``.
        forget_classes: label ids or names (list, or ``"3,7"``); several classes are pooled
            into one forget player unless ``forget_players="per_class"``. A dict name -> classes
            gives one player per named concept.
        forget_indices / forget_fraction (+ ``forget_seed``): forget these training rows, or a
            random share of them (one pooled forget set). Give exactly one ``forget_*``.
        forget_players: ``"per_class"``, ``"pooled"``, or None (pooled; a dict: per concept).
        method: an unlearning method (``hf_munba.available_methods("classification")``).
        output_dir: where to save the model, ``unlearning_metrics.json`` and a model card
            (checkpoints in ``<output_dir>/checkpoints``); None: nothing is written.
        test_dataset: held-out data for the evaluation when ``dataset`` has no ``test`` split.
        return_metrics: return ``(model, metrics)`` instead of the model.
        **options: ``TrainingArguments`` and ``MunbaArguments`` fields (``learning_rate``,
            ``max_steps``, ``per_device_train_batch_size``, ``optim``, ``forget_batch_size``,
            ``bargaining_power_forget``, ...). Unknown names are one ``ValueError``. Defaults are
            ``TrainingArguments``' own, except ``report_to="none"`` (no tracker starts unasked)
            and, without ``output_dir``, ``save_strategy="no"`` (nowhere to keep checkpoints).

    Example (offline, a tiny random classifier on scikit-learn's digits):

    >>> import hf_munba
    >>> from hf_munba.classification.data import digits_dataset
    >>> from hf_munba.testing import tiny_resnet_classifier
    >>> model, metrics = hf_munba.unlearn_classifier(  # doctest: +ELLIPSIS
    ...     tiny_resnet_classifier(num_labels=10), digits_dataset(), forget_classes=[3, 7],
    ...     max_steps=2, per_device_train_batch_size=32, use_cpu=True, return_metrics=True)
    {'train_runtime': ...}
    >>> sorted(k for k in metrics if k.startswith("acc_forget"))
    ['acc_forget', 'acc_forget_3', 'acc_forget_7']
    """
    from transformers import TrainingArguments

    from ..utils.atomic_save import ensure_output_dir
    from .methods import get_method
    from .trainer import MunbaArguments

    targ_opts, munba_opts = _split_options(options)
    munba_args = MunbaArguments(method=method, **munba_opts)
    targ_opts.setdefault("report_to", "none")
    if output_dir is None:  # checkpoints would only go to a temporary folder
        targ_opts.setdefault("save_strategy", "no")
    training_args = TrainingArguments(output_dir=output_dir or tempfile.gettempdir(), **targ_opts)
    if output_dir is not None:
        ensure_output_dir(output_dir, overwrite_output_dir,
                          allow_existing=training_args.resume_from_checkpoint is not None, check_only=True)
    if isinstance(dataset, Mapping):  # a DatasetDict
        if "train" not in dataset:
            raise ValueError(f"the DatasetDict needs a 'train' split; it has {list(dataset)}")
        train, test = dataset["train"], dataset["test"] if "test" in dataset else test_dataset
    else:
        train, test = dataset, test_dataset
    (train, image_col), (test, _) = _check_split(train), _check_split(test)
    names = _label_names(train, model)
    if forget_classes is None and forget_indices is None and forget_fraction is None:
        if get_method(method).uses_forget:
            raise ValueError(f"method {method!r} needs a forget set: give forget_classes, "
                             "forget_indices or forget_fraction")
        plan = None
    else:
        plan = forget_plan(forget_classes, forget_fraction, forget_indices, forget_seed,
                           forget_players, names, method)
        split_forget_sets(train, plan)  # unknown classes, out-of-range indices: before any model work
    base_model = model if isinstance(model, str) else getattr(getattr(model, "config", None),
                                                                "_name_or_path", "") or ""
    processor = None
    if isinstance(model, str):
        from .model_io import load_image_classifier

        model, processor = load_image_classifier(model, num_labels=len(names) if names else 10,
                                                 label_names=names, seed=training_args.seed)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if names and num_labels is not None and num_labels != len(names) and not hasattr(model, "prompt_ids"):
        raise ValueError(f"the model has {num_labels} labels but the dataset has {len(names)} classes")
    processor = image_processor or processor
    if image_col is not None:
        if processor is None:
            raise ValueError(f"the dataset's {image_col!r} column needs an image processor: pass "
                             "image_processor=, or a model folder that holds one")
        from .data import image_transform

        transform = image_transform(processor, image_col)
        train = train.with_transform(transform)
        test = test.with_transform(transform) if test is not None else None
        training_args.remove_unused_columns = False
    out = run_unlearning(model, train, test, plan=plan, munba_args=munba_args,
                         training_args=training_args, output_dir=output_dir,
                         overwrite_output_dir=overwrite_output_dir, processor=processor,
                         base_model=base_model, dataset_name=_dataset_name(train),
                         eval_batch_size=eval_batch_size)
    return (out.model, out.metrics) if return_metrics else out.model


def _label_names(train, model) -> Optional[List[str]]:
    """Class names, so forget classes may be given by name: the dataset's ``ClassLabel``, else
    the model's ``id2label`` (read from ``config.json`` for a folder, without loading weights)."""
    features = getattr(train, "features", None) or {}
    for col in ("labels", "label"):
        if col in features and getattr(features[col], "names", None):
            return list(features[col].names)
    if isinstance(model, str):
        path = os.path.join(model, "config.json")
        id2label = None
        if os.path.isfile(path):
            with open(path) as f:
                id2label = json.load(f).get("id2label")
    else:
        id2label = getattr(getattr(model, "config", None), "id2label", None)
    return [id2label[k] for k in sorted(id2label, key=int)] if id2label else None


def _dataset_name(ds) -> str:
    info = getattr(ds, "info", None)
    return (getattr(info, "dataset_name", None) or "") if info is not None else ""
