"""Tiny offline models for tests, benchmarks and the quickstart; never imported by the library.

:mod:`.factories` builds random tiny SD pipelines, CLIP models and classifiers from configs in
code. :mod:`.digits` is the digits testbed: a small SD pipeline and classifier trained on
scikit-learn's digits (real data, offline), :mod:`.digits_unlearning` the forgetting
experiment run on it, and :mod:`.digits_comparison` the comparison of one setting across
several digits' experiments.
"""

from .factories import *  # noqa: F401,F403
from .factories import __all__  # noqa: F401
