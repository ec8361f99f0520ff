"""Unlearning for image classifiers and CLIP zero-shot classes on the ``transformers.Trainer`` loop.

:mod:`.trainer` holds :class:`MunbaTrainer` and :class:`MunbaArguments`, :mod:`.methods` the
methods (one short class each), :mod:`.objectives` their losses, :mod:`.data` and
:mod:`.forget_sets` the datasets and the forget/retain split, :mod:`.model_io` loading and
saving models, :mod:`.clip_zero_shot` CLIP as a classifier. Importing the package registers the
classifier-only methods (``rl``, ``l1``, ``salun``, ``retrain``; and the paper's other baselines
from :mod:`.baselines`: ``iu``, ``be``, ``bs``, ``shs``) in the one method registry; the other
submodules load on use.
"""

from . import methods as _methods  # noqa: F401  (registers the classifier methods)
from . import baselines as _baselines  # noqa: F401  (registers iu, be, bs, shs)
