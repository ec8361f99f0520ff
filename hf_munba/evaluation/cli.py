"""What the evaluation CLIs share: the ``--model [NAME=]PIPELINE_DIR`` / ``--lora NAME=LORA_DIR``
arguments and their parsing into :class:`~hf_munba.evaluation.generative.ModelSpec` objects.

``eval/evaluate_generation.py`` and ``eval/attack_unlearned.py`` take the same models the same way;
one parser keeps the two from drifting (a name rule fixed in one and not the other).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

from .generative import ModelSpec

__all__ = ["add_model_arguments", "parse_name_path", "model_specs"]


def add_model_arguments(parser, model_help: str) -> None:
    """``--model`` (repeatable, required) and ``--lora`` (repeatable) on an argparse parser."""
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PIPELINE_DIR",
                        help=model_help)
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=LORA_DIR",
                        help="load this LoRA (pipe.load_lora_weights) onto the model called NAME")


def parse_name_path(text: str, what: str) -> Tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` is named after its last folder."""
    name, sep, value = text.partition("=")
    if not sep:
        return Path(text.rstrip("/")).name, text
    if not name or not value:
        raise ValueError(f"{what} must be NAME=PATH or PATH, got {text!r}")
    return name, value


def model_specs(models: Sequence[str], loras: Sequence[str] = ()) -> List[ModelSpec]:
    """The ``--model`` values as specs, each ``--lora NAME=DIR`` attached to the model NAME.

    Raises ValueError with the offending argument in the message (a LoRA needs an explicit NAME
    that is one of the models': attaching it to a guessed model would evaluate the wrong one).
    """
    specs = [ModelSpec(*parse_name_path(m, "--model")) for m in models]
    by_name = {m.name: m for m in specs}
    for spec in loras:
        name, path = parse_name_path(spec, "--lora")
        if "=" not in spec or name not in by_name:
            raise ValueError(f"--lora {spec!r}: NAME must be one of the --model names "
                             f"{list(by_name)}")
        by_name[name].lora_dir = path
    return specs
