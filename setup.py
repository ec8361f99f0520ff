"""hf_munba: Machine Unlearning via Nash Bargaining for diffusers / transformers users."""
from pathlib import Path

from setuptools import find_packages, setup

# The floors live in hf_munba/dependency_versions.py, which hf_munba also checks at import; read it
# here without importing the package (its dependencies may not be installed yet).
_versions: dict = {}
exec(Path(__file__).with_name("hf_munba").joinpath("dependency_versions.py").read_text(encoding="utf-8"), _versions)
FLOORS = _versions["FLOORS"]

# Install the torch build that fits your hardware first (CPU-only machines and CI:
# `pip install torch==2.13.0`); the range below accepts it, so pip does not replace it.
# The exact tested set is requirements/tested.txt (`pip install -e . -c requirements/tested.txt`).
RUNTIME = [f"{name}>={floor}" for name, (floor, _why) in FLOORS.items()] + [
    "numpy",
    "pillow",
    "tqdm",
    "matplotlib>=3.7",  # the training-curve PNG every run writes
]
EVAL = ["nudenet>=3.4", "scikit-learn>=1.3", "scipy"]
DEV = EVAL + ["pytest>=8", "hypothesis>=6.100", "pytest-timeout", "pytest-xdist>=3"]

setup(
    name="hf_munba",
    version="0.1.0",
    description="MUNBa (Machine Unlearning via Nash Bargaining) for diffusers, transformers, accelerate and peft",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hf_munba", "hf_munba.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"eval": EVAL, "dev": DEV},
    license="Apache-2.0",
)
