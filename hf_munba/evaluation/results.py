"""The one results writer: ``results.json`` + ``results.md`` of an evaluation, and its table cells.

Every evaluation in hf_munba (classifier metrics, generative metrics, the adversarial-prompt
attack, the digits experiments) ends the same way: a JSON file a program reads back and a
markdown file a person reads. Writing both in one place keeps one argument order, one JSON
layout and one rule for empty cells, and makes both files atomic (temp file next to the target,
then ``os.replace``): a crash leaves the previous file or none, never half a table.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["atomic_write_text", "format_cell", "markdown_table", "write_results",
           "deprecated_alias"]

EMPTY_CELL = "–"


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temp file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_cell(value, digits: int = 2) -> str:
    """One table cell: numbers to ``digits`` decimals, ``{mean, std, n}`` dicts as ``mean ± std``
    (just the mean for one run), None / NaN as an en dash, anything else as its ``str``.

    Integers stay integers (image counts read as counts); an empty result is a dash, never "nan".
    """
    if isinstance(value, Mapping) and "mean" in value:
        mean = value["mean"]
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return EMPTY_CELL
        if value.get("n", 1) > 1:
            return f"{mean:.{digits}f} ± {value.get('std', 0.0):.{digits}f}"
        return f"{mean:.{digits}f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return EMPTY_CELL
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], digits: int = 2) -> str:
    """A GitHub markdown table; cells go through :func:`format_cell` (strings pass unchanged,
    so a caller with its own number format formats first). No trailing newline."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(output_dir, results: Mapping, *, name: str = "results",
                  markdown: Union[None, str, Callable[[Mapping], str]] = None,
                  json_default: Optional[Callable] = None) -> Dict[str, str]:
    """Write ``<output_dir>/<name>.json`` and, when ``markdown`` is given, ``<name>.md``.

    ``markdown`` is the document itself or a function of ``results`` that makes it. Both files are
    written atomically, the JSON first (a reader that finds the markdown finds its numbers).
    ``json_default`` is passed to :func:`json.dumps` for values JSON does not know (e.g. ``str``
    for paths). Returns ``{"json": path, "markdown": path}`` (no ``markdown`` key without one).
    """
    if callable(markdown):
        markdown = markdown(results)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{name}.json")}
    atomic_write_text(paths["json"], json.dumps(results, indent=2, default=json_default) + "\n")
    if markdown is not None:
        paths["markdown"] = str(out / f"{name}.md")
        atomic_write_text(paths["markdown"], markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def read_csv_rows(csv_path, columns: Sequence[str], kind: str) -> List[Dict[str, str]]:
    """The rows of a resumable per-image / per-prompt CSV as strings (empty if the file is
    missing); refuses a file whose header is not exactly ``columns``, so a run never appends to
    or resumes from another tool's table. ``kind`` names the table in that one error."""
    path = Path(csv_path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != tuple(columns):
            raise ValueError(f"{path} is not {kind} (columns {reader.fieldnames})")
        return [dict(row) for row in reader]


def deprecated_alias(func: Callable, old: str, new: str) -> Callable:
    """``func`` under its old name for one release: same behaviour, plus a FutureWarning."""

    def alias(*args, **kwargs):
        warnings.warn(f"{old} is deprecated and goes in the release after next; use {new}",
                      FutureWarning, stacklevel=2)
        return func(*args, **kwargs)

    alias.__name__ = old.rpartition(".")[2]
    alias.__qualname__ = alias.__name__
    alias.__doc__ = f"Deprecated alias of :func:`{new}` (one release)."
    alias.__wrapped__ = func
    return alias
