"""Test-wide settings: tiny models on one thread each.

Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (CI runs the suite
with pytest-xdist, one worker per core) oversubscribed threads make them up to 100x slower.
Subprocesses (the scripts run end to end) inherit OMP_NUM_THREADS.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
