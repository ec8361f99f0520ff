#!/usr/bin/env python
"""MUNBa concept / class unlearning for Stable Diffusion (diffusers example style).

    accelerate launch training/train_munba_sd.py \
      --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
      --forget_data_dir data/forget --retain_data_dir data/retain \
      --output_dir sd-munba-nudity --train_params noxattn --learning_rate 1e-5 \
      --train_batch_size 4 --num_train_epochs 1

Each optimizer step runs one backward pass per player (retain, forget) into the method's
``NashBargainer``, which writes their Nash bargaining direction (or, for ``--method weighted``,
their weighted sum) into ``.grad``; then clip, step. This file only parses: every flag is a field
of :class:`hf_munba.diffusion.SDUnlearningConfig` (same name, same help), and the run is
:func:`hf_munba.diffusion.train`, which a Python user calls directly. Bad input is refused before
any model is loaded with one ``error: ...`` line and exit code 2.
"""

import argparse
import sys

from hf_munba.diffusion.config import DEFAULT_FORGET_PROMPTS, SDUnlearningConfig, add_config_arguments

__all__ = ["parse_args", "check_args", "main", "DEFAULT_FORGET_PROMPTS"]


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


def fail(message):
    """One clear message, no traceback, before anything was loaded or written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> SDUnlearningConfig:
    """The command line as a validated config (value checks only; no file is read)."""
    parser = add_config_arguments(_Parser(description="MUNBa unlearning for Stable Diffusion.",
                                          formatter_class=_DefaultsFormatter))
    namespace = parser.parse_args(argv)
    try:
        return SDUnlearningConfig(**vars(namespace))
    except ValueError as e:
        fail(str(e))


def check_args(config: SDUnlearningConfig):
    """The checks that read the disk but load no model; returns the (forget, retain) sources."""
    from hf_munba.diffusion.trainer import InputError, check_inputs

    try:
        return check_inputs(config)
    except InputError as e:
        fail(str(e))


def main(argv=None):
    config = parse_args(argv)
    sources = check_args(config)

    from hf_munba.diffusion.trainer import InputError, train
    from hf_munba.unlearning.step import TooManySkippedSteps

    try:
        train(config, sources=sources)
    except (InputError, TooManySkippedSteps) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
