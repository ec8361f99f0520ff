"""Old module paths (before the sub-packages) keep importing for one release, with a warning.

``import hf_munba.sd_data`` or ``from hf_munba.trainer import MunbaTrainer`` in user code written
for 0.1 resolves to the module's new home and warns once; it is the same module object, so
``isinstance`` checks and monkeypatching behave. Remove in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "sd_objectives": "diffusion.objectives", "sd_unlearning": "diffusion.unlearner",
    "sd_data": "diffusion.data", "sd_inputs": "diffusion.inputs", "sd_params": "diffusion.params",
    "sd_export": "diffusion.export", "generation": "diffusion.generation",
    "trainer": "classification.trainer", "unlearning_methods": "classification.methods",
    "classification_objectives": "classification.objectives",
    "classification_data": "classification.data", "forget_sets": "classification.forget_sets",
    "classifier_io": "classification.model_io", "clip_zero_shot": "classification.clip_zero_shot",
    "atomic_save": "utils.atomic_save", "model_card": "utils.model_card",
    "training_plot": "utils.training_plot", "digits": "testing.digits",
    "digits_unlearning": "testing.digits_unlearning",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, leaf = fullname.rpartition(".")
        if prefix != __package__ or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"{__package__}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the release after next",
                      FutureWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the real module already ran under its new name


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
