#!/usr/bin/env python
"""One setting for every case of the classifier benchmark: pool its outputs and compare fixed
settings across forget sets.

    python eval/bench_digits_across_cases.py docs/bench_digits/digits_class.json \
        docs/bench_digits/class7/digits_class.json docs/bench_digits/power_seeds345/digits_class.json \
        --output_dir runs/across_classes

Each argument is a ``digits_class.json`` / ``digits_random.json`` that
``eval/bench_digits_unlearning.py`` wrote; each is one case (a forget set and its seeds, named by
its title). For every setting (``munba``, ``munba-power-<w>``, each ``weighted-<λ>``) the table
gives, per case, the test accuracy at the first and the best evaluation meeting the forget
criterion, on how many cases it met it in every seed, and the mean over cases; then each case's
own best λ (the oracle the per-case verdict uses) and the verdict ``munba`` vs the best single λ
(``hf_munba.evaluation.across_cases``). Reads only; trains nothing. With ``--output_dir`` it
writes results.json / results.md there (atomically).

Cases are only pooled when comparable: the same learning-rate grid, evaluation interval, model
and retain loss, and the same recipe for a row that two cases share. Files written before
2026-12-03 do not record the model and the retain loss: their titles name the model, and their
retain loss is the default unless the command that wrote them said otherwise (docs/bench_digits/
distill holds the only exception among the committed outputs).
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Must agree between pooled cases (the benchmark's own settings, as its JSON records them).
PROTOCOL_KEYS = ("lr_grid", "eval_every", "model", "retain_objective")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="digits_class.json / digits_random.json files")
    p.add_argument("--output_dir", default=None, help="write results.json / results.md here")
    p.add_argument("--settings", default="munba",
                   help="comma-separated prefixes of the rows compared beside weighted-<λ> "
                        "(default munba: munba and munba-power-<w>, munba-target-<T>, ...)")
    return p.parse_args(argv)


def _case(path):
    """(case name, protocol, {row: (at_forgetting, recipe)}) of one benchmark output."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such benchmark output (give a digits_<setting>.json)")
    data = json.loads(p.read_text())
    for key in ("title", "table", "lr_grid", "eval_every", "recipes"):
        if key not in data:
            raise ValueError(f"{p} is not an eval/bench_digits_unlearning.py output (no {key!r})")
    head, _, seeds = data["title"].rpartition(", seeds ")
    kind, _, model = head.rpartition(", ")
    kind = re.sub(r"^Random (\S+) forgetting$", r"random \1",
                  re.sub(r"^Class-wise forgetting \(digit (\d+)\)$", r"class \1", kind))
    seeds = ",".join(str(x) for x in json.loads(seeds)) if seeds.startswith("[") else seeds
    protocol = {k: data.get(k) for k in PROTOCOL_KEYS}
    protocol["model"] = data.get("model", model)
    rows = {name: (row["at_forgetting"], data["recipes"].get(name))
            for name, row in data["table"].items()
            if "at_forgetting" in row and "same_run_as" not in row}
    return f"{kind}, seeds {seeds}", protocol, rows


def load_cases(paths, prefixes=("munba",), baseline_prefix="weighted-"):
    """``{case: {row: at_forgetting}}`` for :func:`compare_across_cases`, with the checks above.
    One file per case, or several holding different rows of the same case (a row in two files
    must carry the same numbers)."""
    cases, found, recipes, ref = {}, {}, {}, None
    for path in paths:
        name, protocol, rows = _case(path)
        ref = ref or (path, protocol)
        for key in PROTOCOL_KEYS:
            if protocol[key] != ref[1][key]:
                raise ValueError(f"{path} and {ref[0]} ran different protocols: {key} = "
                                 f"{protocol[key]!r} vs {ref[1][key]!r}")
        entry = cases.setdefault(name, {})
        for row, (agg, recipe) in rows.items():
            if not row.startswith((baseline_prefix, *prefixes)):
                continue
            first_recipe, where = recipes.setdefault(row, (recipe, path))
            if recipe != first_recipe:
                raise ValueError(f"{row} ran with recipe {recipe} in {path} and {first_recipe} "
                                 f"in {where}")
            if row in entry and json.dumps(agg, sort_keys=True) != json.dumps(entry[row],
                                                                              sort_keys=True):
                raise ValueError(f"{row} on {name!r} is in {found[name, row]} and {path} with "
                                 f"different results")
            entry[row] = agg
            found.setdefault((name, row), path)
    return cases


def main(argv=None):
    args = parse_args(argv)
    from hf_munba.evaluation.across_cases import across_cases_markdown, compare_across_cases
    from hf_munba.evaluation.results import write_results

    cases = load_cases(args.results, tuple(p for p in args.settings.split(",") if p))
    result = compare_across_cases(cases)
    result["sources"] = [str(p) for p in args.results]
    md = ("# One setting for every case of the classifier benchmark\n\n"
          f"Sources: {', '.join(result['sources'])}\n\n"
          + across_cases_markdown(result, noun="case", metric="Test accuracy", digits=2,
                                  criterion="at each case's forget criterion"))
    if args.output_dir is not None:
        write_results(args.output_dir, result, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
