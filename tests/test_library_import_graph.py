"""The library never imports the test factories (``hf_munba.testing``): a user's ``import hf_munba``
must not pull in random tiny models, and a library function must not offer them as sources.

Every module under ``hf_munba/`` except ``testing/`` is imported in a fresh interpreter, with every
lazy name of ``hf_munba`` resolved; no ``hf_munba.testing*`` module may be loaded afterwards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_munba"


def library_modules():
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[1:2] == ["testing"] or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def test_library_modules_are_found():
    mods = library_modules()
    assert {"hf_munba", "hf_munba.classification.model_io", "hf_munba.classification.trainer",
            "hf_munba.unlearning.methods", "hf_munba.utils.model_card"} <= set(mods)
    assert not any(m.startswith("hf_munba.testing") for m in mods)


def test_no_library_module_imports_the_test_factories():
    code = f"""
import importlib, json, sys, warnings
warnings.simplefilter("ignore")
import hf_munba
for name in hf_munba._LAZY:
    getattr(hf_munba, name)
for mod in {library_modules()!r}:
    importlib.import_module(mod)
from hf_munba.unlearning import available_methods
available_methods()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("hf_munba.testing"))))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert loaded == [], f"library modules imported the test factories: {loaded}"


def _imports_testing(path: Path, module: str) -> list:
    """Import statements anywhere in the file (also inside functions: a lazy import is still an
    import) that resolve to ``hf_munba.testing``."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        hits += [f"{path.relative_to(ROOT)}:{node.lineno}" for t in targets
                 if t == "hf_munba.testing" or t.startswith("hf_munba.testing.")]
    return sorted(set(hits))


def test_no_library_source_imports_the_test_factories_even_lazily():
    hits = []
    for module in library_modules():
        rel = Path(*module.split("."))
        path = ROOT / (rel / "__init__.py" if (ROOT / rel).is_dir() else rel.with_suffix(".py"))
        hits += _imports_testing(path, module)
    assert hits == [], f"library code imports hf_munba.testing: {hits}"
