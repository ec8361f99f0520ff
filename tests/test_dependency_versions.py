"""The dependency floors: one source of truth, enforced at import with one line naming what to install."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_munba.dependency_versions import FLOORS, INCOMPATIBLE, _release, dependency_problems

ROOT = Path(__file__).resolve().parents[1]


def pins(name: str) -> dict:
    """{package: version} of a requirements file's `pkg==version` lines (names normalised)."""
    out = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("-", "_")] = m.group(2)
    return out


def fake(versions: dict):
    return lambda package: versions.get(package)


def test_release_parses_local_and_dev_versions():
    assert _release("2.13.0+cpu") == (2, 13, 0, 0)
    assert _release("0.40.0.dev0") == (0, 40, 0, 0)
    assert _release("5.24") > _release("5.23.9")
    with pytest.raises(ValueError):
        _release("not-a-version")


def test_each_floor_is_enforced_with_the_install_command():
    for package, (floor, _why) in FLOORS.items():
        major, minor = _release(floor)[:2]
        older = f"{major}.{minor - 1}.0" if minor else f"{major - 1}.99.0"
        problems = dependency_problems(fake({package: older}))
        assert len(problems) == 1 and f"pip install '{package}>={floor}'" in problems[0], problems
        assert dependency_problems(fake({package: floor})) == []


def test_known_bad_pair_is_refused_but_each_side_alone_is_fine():
    assert INCOMPATIBLE, "the transformers/peft pair must be listed"
    bad = fake({"transformers": "5.24.0", "peft": "0.21.2"})
    (problem,) = dependency_problems(bad)
    assert "pip install 'peft>=0.22.0'" in problem and "transformers<5.24" in problem
    assert dependency_problems(fake({"transformers": "5.23.0", "peft": "0.21.2"})) == []
    assert dependency_problems(fake({"transformers": "5.24.0", "peft": "0.22.0"})) == []
    assert dependency_problems(fake({"transformers": "5.24.0"})) == []  # no peft: nothing to clash


@pytest.mark.parametrize("name", ["tested.txt", "minimum.txt"])
def test_pinned_sets_pass_the_check(name):
    versions = pins(name)
    assert set(FLOORS) <= set(versions), f"{name} must pin every dependency with a floor"
    assert dependency_problems(fake(versions)) == []


def test_minimum_set_pins_exactly_the_floors():
    versions = pins("minimum.txt")
    for package, (floor, _why) in FLOORS.items():
        if package == "torch":  # CPU CI can install only torch 2.13.0: see dependency_versions.FLOORS
            continue
        assert _release(versions[package]) == _release(floor), package


def test_setup_py_declares_the_same_floors():
    out = subprocess.run([sys.executable, "-c",
                          "import setuptools, runpy, sys\n"
                          "captured = {}\n"
                          "setuptools.setup = lambda **kw: captured.update(kw)\n"
                          "sys.argv = ['setup.py']\n"
                          "runpy.run_path('setup.py', run_name='__main__')\n"
                          "print('\\n'.join(captured['install_requires']))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for package, (floor, _why) in FLOORS.items():
        assert f"{package}>={floor}" in out


def test_import_names_the_package_to_install():
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda p: '0.39.0' if p == 'diffusers' else real(p)\n"
            "import hf_munba\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and "pip install 'diffusers>=0.40.0'" in res.stderr


def test_installed_environment_is_supported():
    assert dependency_problems() == []
