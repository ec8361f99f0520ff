#!/usr/bin/env python
"""Unlearn classes or samples from an image classifier with MUNBa (or a baseline).

    python training/train_munba_classifier.py \
        --model_name_or_path path/to/classifier --dataset digits --forget_classes 3 \
        --method munba --output_dir out/munba --learning_rate 0.05 --num_train_epochs 5 \
        --per_device_train_batch_size 64 --optim sgd --max_grad_norm 1.0

Several classes (``--forget_classes 3,7``) are pooled into one forget player by default;
``--forget_players per_class`` makes each its own bargaining player (docs/classification.md
compares both on digits: pooling forgot more reliably there). The run logic is the library's (``hf_munba.classification.unlearn``,
also ``hf_munba.unlearn_classifier``); this script parses flags and loads model and data.

Without a ``--forget_*`` option nothing is forgotten and the whole training split is D_r: that
is how the original model is trained (``--method ft`` from ``tiny-resnet``/a config .json, or
``--method retrain``, which re-initialises the weights). The README shows the whole recipe
(original, unlearned, retrained gold standard, evaluation); tests/test_readme_classifier_recipe.py
runs it. Bad input: one ``error: ...`` line, exit status 2, nothing written.

Multi-process: ``accelerate launch --num_processes 2 training/train_munba_classifier.py ...``.
Every ``TrainingArguments`` flag works. Writes the unlearned model (``from_pretrained``-ready,
safetensors), ``unlearning_metrics.json`` and a model card into ``--output_dir``; checkpoints
go to ``<output_dir>/checkpoints`` and ``--resume_from_checkpoint latest`` continues from them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from hf_munba.unlearning.distributed import unsupported_distributed_message  # noqa: E402
from hf_munba.utils.atomic_save import ensure_output_dir  # noqa: E402
from hf_munba.classification.model_io import (has_image_processor, load_image_classifier,  # noqa: E402
                                              validate_model_source)
from hf_munba.classification.forget_sets import forget_spec_from_strings  # noqa: E402
from hf_munba.classification.trainer import MunbaArguments, last_complete_checkpoint  # noqa: E402
from hf_munba.classification.unlearn import (CHECKPOINTS, FORGET_PLAYERS, ForgetPlan,  # noqa: E402
                                             forget_plan, run_unlearning, split_forget_sets)

def test_model_sources():
    """``tiny-resnet`` / ``tiny-vit``: the testing factories' random tiny classifiers, which
    the library never imports; the CLIs hand them to ``load_image_classifier``."""
    from hf_munba.testing import CLASSIFIER_SOURCES

    return dict(CLASSIFIER_SOURCES)


TEST_MODELS = ("tiny-resnet", "tiny-vit")


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={
        "help": "local classifier folder (safetensors), a config .json (fresh weights), a saved "
                "CLIP zero-shot classifier, a CLIPModel folder with --clip_zero_shot, or " + "/".join(TEST_MODELS)})
    dataset: Optional[str] = field(default=None, metadata={"help": "'digits' (scikit-learn, offline)"})
    train_dir: Optional[str] = field(default=None, metadata={
        "help": "local imagefolder root (<class>/<image>, or train/ and test/ sub-folders)"})
    test_size: float = field(default=0.2, metadata={"help": "test share when the data has no test split"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test split"})
    forget_classes: Optional[str] = field(default=None, metadata={"help": "comma-separated label ids or names"})
    forget_fraction: Optional[float] = field(default=None, metadata={"help": "random share of training samples"})
    forget_indices: Optional[str] = field(default=None, metadata={
        "help": "comma-separated training-row indices, or a .json file holding a list"})
    forget_seed: int = field(default=0, metadata={"help": "seed of --forget_fraction"})
    forget_players: Optional[str] = field(default=None, metadata={
        "help": "several --forget_classes: 'pooled' (one forget player; the default) or "
                "'per_class' (one bargaining player each)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a non-empty output_dir"})
    clip_zero_shot: bool = field(default=False, metadata={"help": "treat the model as CLIP zero-shot"})
    clip_train_encoder: str = field(default="image", metadata={"help": "'image' or 'text'"})
    clip_template: Optional[str] = field(default=None, metadata={"help": "prompt with {} for the class"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size of the final evaluation"})

    def __post_init__(self):
        if (self.dataset is None) == (self.train_dir is None):
            raise ValueError("give exactly one of --dataset digits or --train_dir")
        if self.dataset is not None and self.dataset != "digits":
            raise ValueError(f"unknown --dataset {self.dataset!r}; use 'digits' or --train_dir for local images")
        if self.clip_train_encoder not in ("image", "text"):
            raise ValueError(f"--clip_train_encoder must be 'image' or 'text', got {self.clip_train_encoder!r}")
        if not 0.0 < self.test_size < 1.0:
            raise ValueError("--test_size must be in (0, 1)")
        if self.forget_players not in (None, *FORGET_PLAYERS):
            raise ValueError(f"--forget_players must be one of {list(FORGET_PLAYERS)}, got {self.forget_players!r}")


def has_forget_spec(a: ScriptArguments) -> bool:
    return any(x is not None for x in (a.forget_classes, a.forget_fraction, a.forget_indices))


def plan_forget(a: ScriptArguments, names, method: str) -> Optional[ForgetPlan]:
    """What to forget, and as how many players. Without a forget option nothing is forgotten:
    D_r is the whole training split, which is how the script trains the original model
    (``--method ft``)."""
    if not has_forget_spec(a):
        if a.forget_players is not None:
            raise ValueError("--forget_players needs --forget_classes")
        return None
    spec = forget_spec_from_strings(a.forget_classes, a.forget_fraction, a.forget_indices, a.forget_seed,
                                    {n: i for i, n in enumerate(names)})  # parses indices files too
    classes = a.forget_classes.split(",") if a.forget_classes is not None else None
    return forget_plan([c.strip() for c in classes if c.strip()] if classes else None, spec.fraction,
                       spec.indices, a.forget_seed, a.forget_players, names, method)


def check_label_count(script: ScriptArguments, num_classes: int) -> None:
    """A trained classifier's head must match the dataset's classes (zero-shot CLIP has no head)."""
    cfg_path = os.path.join(script.model_name_or_path, "config.json")
    if script.clip_zero_shot or not os.path.isfile(cfg_path) or os.path.isfile(
            os.path.join(script.model_name_or_path, "zero_shot_config.json")):
        return
    with open(cfg_path) as f:
        id2label = json.load(f).get("id2label")
    if id2label and len(id2label) != num_classes:
        raise ValueError(f"the model has {len(id2label)} labels but the dataset has {num_classes} classes")


class OneLineErrorParser(HfArgumentParser):
    """argparse's ``error`` prints the whole usage block (over a hundred lines with every
    ``TrainingArguments`` flag) above the one line that matters; print only that line."""

    def error(self, message):
        fail(message)


def fail(message: str):
    """One clear message, no usage block, no traceback; exit status 2 (as argparse)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = OneLineErrorParser((ScriptArguments, MunbaArguments, TrainingArguments))
    raw = sys.argv[1:] if argv is None else list(argv)
    deepspeed = unsupported_distributed_message(bargains=False, argv=raw)  # before any parsing
    if deepspeed:
        fail(deepspeed)
    try:
        script, munba, targs = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        fail(str(e))
    final_dir = targs.output_dir
    resume = targs.resume_from_checkpoint

    # ---- every check before any model is loaded; nothing is written until they all pass
    import torch

    from hf_munba.classification.data import require_sklearn, sklearn_available
    from hf_munba.classification.methods import get_method

    sources = test_model_sources()
    try:
        refused = unsupported_distributed_message(bargains=get_method(munba.method).bargains)
        if refused:
            raise ValueError(refused)
        validate_model_source(script.model_name_or_path, sources)
        if targs.fp16 and not torch.cuda.is_available():
            raise ValueError("--fp16 needs a CUDA GPU; on CPU use --bf16 or fp32")
        if resume is not None and resume != "latest" and not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume!r} is neither 'latest' nor a folder")
        if resume == "latest" and last_complete_checkpoint(os.path.join(final_dir, CHECKPOINTS)) is None:
            raise ValueError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                             f"{os.path.join(final_dir, CHECKPOINTS)}")
        ensure_output_dir(final_dir, script.overwrite_output_dir, allow_existing=resume is not None,
                          check_only=True)
        method = get_method(munba.method)
        if not has_forget_spec(script) and method.uses_forget:
            raise ValueError(f"method {munba.method!r} needs a forget set: give exactly one of forget "
                             "classes, forget fraction or forget indices (--forget_classes, "
                             "--forget_fraction, --forget_indices)")
        if script.dataset == "digits":
            from hf_munba.classification.data import digits_dataset

            require_sklearn("--dataset digits")
            data = digits_dataset(test_size=script.test_size, seed=script.split_seed)
            num_channels = 1
            names = data["train"].features["labels"].names
        else:
            from hf_munba.classification.data import imagefolder_class_names, validate_imagefolder

            validate_imagefolder(script.train_dir)
            data, num_channels = None, 3
            names = imagefolder_class_names(script.train_dir)
            if not has_image_processor(script.model_name_or_path):
                raise ValueError("--train_dir needs a model folder holding its image processor "
                                 "(preprocessor_config.json or processor_config.json)")
        plan = plan_forget(script, names, munba.method)
        if plan is not None and plan.spec.classes is not None and max(plan.spec.classes) >= len(names):
            raise ValueError(f"forget classes {plan.spec.classes} are not labels of this dataset ({names})")
        if data is not None:  # digits: the split is checked before the model loads
            split_forget_sets(data["train"], plan)
        check_label_count(script, len(names))
    except (ValueError, ImportError) as e:
        fail(str(e))
    # The membership attack of the final evaluation needs scikit-learn (an extra); training does not.
    mia = plan is not None and sklearn_available()
    if plan is not None and not mia:
        print("warning: scikit-learn is not installed, so the final evaluation leaves out "
              "MIA-efficacy (pip install 'hf_munba[eval]')", file=sys.stderr)

    # ---- model, then (for image folders) the processor-dependent data
    model, processor = load_image_classifier(
        script.model_name_or_path, num_labels=len(names), label_names=names, num_channels=num_channels,
        clip_zero_shot=script.clip_zero_shot, clip_train_encoder=script.clip_train_encoder,
        clip_template=script.clip_template, seed=targs.seed, model_sources=sources)
    if data is None:
        from hf_munba.classification.data import imagefolder_dataset

        data = imagefolder_dataset(script.train_dir, processor, test_size=script.test_size, seed=script.split_seed)
        if data["train"].features["labels"].names != names:
            fail(f"imagefolder classes {data['train'].features['labels'].names} differ from {names}")
        try:
            split_forget_sets(data["train"], plan)
        except ValueError as e:
            fail(str(e))
        targs.remove_unused_columns = False

    # every rank validated above (so all stop together); the library makes the folder on the
    # main rank only, trains, evaluates and saves the model, its card and metrics atomically
    out = run_unlearning(model, data["train"], data["test"], plan=plan, munba_args=munba, training_args=targs,
                         output_dir=final_dir, overwrite_output_dir=script.overwrite_output_dir,
                         processor=processor, base_model=script.model_name_or_path,
                         dataset_name=script.dataset or script.train_dir,
                         eval_batch_size=script.eval_batch_size, mia=mia)
    if not out.trainer.is_world_process_zero():
        return
    metrics = out.metrics
    print(json.dumps({"output_dir": final_dir, **metrics}))


if __name__ == "__main__":
    main()
