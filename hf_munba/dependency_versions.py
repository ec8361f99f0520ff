"""The dependency floors and known-bad pairs, in one place, and the check that enforces them.

Why a check of our own: pip resolves each package's declared ranges, but it cannot express "this
transformers needs that peft" when transformers does not declare it. An unlucky resolution then
installs cleanly and fails deep inside a training run (text-encoder LoRA crashed after the models
were loaded). Checking at import turns that into one line that names what to install, in the
spirit of diffusers' ``check_min_version``.

``setup.py`` reads ``FLOORS`` from this file (it executes it without importing the package), so the
metadata floors and the runtime check cannot drift apart. The floors are the oldest versions that
the CI floor leg installs and tests (``requirements/minimum.txt``); each note says which API sets it.
This module must import nothing beyond the standard library at module level.
"""

from __future__ import annotations

import re
from importlib import metadata

# package -> (oldest supported version, why that version). `torch` is a floor of the API we use;
# CPU CI can only install torch 2.13.0, so the floor leg runs the other floors on that torch.
FLOORS: dict[str, tuple[str, str]] = {
    "torch": ("2.4", "the oldest torch declared; CPU CI exercises 2.13.0, the only CPU build it can install"),
    "diffusers": ("0.40.0", "from_pretrained(dtype=...) (older releases silently ignore it, so fp16 runs in fp32); "
                            "LoRA adapter metadata in save_lora_weights (0.34)"),
    "transformers": ("5.5.0", "diffusers >= 0.40 needs huggingface_hub >= 1.23, which every transformers 4.x refuses; "
                              "under 5.0 a skipped MunbaTrainer step still moved SGD momentum (CI floor leg)"),
    "accelerate": ("1.3.0", "transformers 5's Trainer calls unwrap_model(keep_torch_compile=...) (new in "
                            "1.3); diffusers 0.40's pipelines import get_module_size_with_ties (1.2)"),
    "peft": ("0.18.0", "the oldest peft that transformers 5.x accepts for text-encoder LoRA"),
    "datasets": ("3.0.0", "load_dataset('imagefolder'), Features with Array3D"),
    "safetensors": ("0.8.0", "required by diffusers 0.40"),
    "huggingface_hub": ("1.23.0", "required by diffusers 0.40"),
}

# (package, version range it covers, requirement it then needs, explanation). Each row is a pair
# that installs cleanly and breaks at run time.
INCOMPATIBLE: list[tuple[str, str, tuple[str, str], str]] = [
    ("transformers", ">=5.24", ("peft", "0.22.0"),
     "transformers >= 5.24 refuses peft < 0.22 for text-encoder LoRA"),
]


def _release(version: str) -> tuple[int, ...]:
    """Numeric release tuple of a PEP 440 version ('5.23.0', '2.13.0+cpu', '0.40.0.dev0' -> (0, 40, 0))."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"cannot read version {version!r}")
    parts = tuple(int(x) for x in match.group(1).split("."))
    return parts + (0,) * (4 - len(parts))


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def dependency_problems(installed=_installed) -> list[str]:
    """Every unmet floor and known-bad pair, as lines that say what to install; [] when all is well.

    `installed` maps a distribution name to its version (or None when absent); tests pass a fake.
    A package that is not installed is not reported here: importing it fails with its own clear
    error, and optional paths (e.g. no peft without LoRA) should keep working.
    """
    problems = []
    for package, (floor, why) in FLOORS.items():
        have = installed(package)
        if have is not None and _release(have) < _release(floor):
            problems.append(f"{package} {have} is older than hf_munba supports ({why}): "
                            f"pip install '{package}>={floor}'")
    for package, covered, (needed, needed_floor), why in INCOMPATIBLE:
        have, other = installed(package), installed(needed)
        bound = covered.lstrip(">=")
        if have is None or other is None or _release(have) < _release(bound):
            continue
        if _release(other) < _release(needed_floor):
            problems.append(f"{package} {have} with {needed} {other}: {why}: "
                            f"pip install '{needed}>={needed_floor}' (or '{package}<{bound}'); "
                            f"the tested set is requirements/tested.txt")
    return problems


def check_dependency_versions() -> None:
    """Raise ImportError naming what to install when a dependency is too old or a known-bad pair."""
    problems = dependency_problems()
    if problems:
        raise ImportError("hf_munba cannot run with the installed packages:\n  " + "\n  ".join(problems))
