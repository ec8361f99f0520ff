"""One setting for every case: the comparison a user without an oracle gets.

An experiment on one case (one forgotten digit, one forget set) compares ``munba`` with the
weighted sum at *that case's* best λ, picked after the runs. That is the fairest chance the
baseline can get, and it is an oracle: a user who forgets a new concept does not know which λ will
forget it within the budget, and a λ small enough to keep the most on an easy case does not forget
a hard one at all. :func:`compare_across_cases` takes several cases' results and asks of each
setting run unchanged on every case: on how many cases did it forget in every seed, and what did
it keep at the first and the best evaluation that forgot (mean over cases). Beside the fixed
settings it keeps the per-case oracle (each case's own best λ) as its own row, so both readings
stay in one table.

It is shared by the SD digits experiments (``hf_munba.testing.digits_comparison``) and the
classifier benchmark (``eval/bench_digits_across_cases.py``); both feed it
:func:`~hf_munba.evaluation.tradeoff.aggregate_first_best` results.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, Mapping, Optional, Sequence

from .results import format_cell, markdown_table
from .tradeoff import best_at_forgetting

__all__ = ["compare_across_cases", "across_cases_markdown"]

_POINTS = ("first", "best")


def _finite(x) -> Optional[float]:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _cell(agg: Optional[Mapping]) -> Dict:
    """One setting on one case, from its ``aggregate_first_best`` result (None: not run)."""
    if agg is None:
        return {"run": False}
    return {"run": True, "reached": agg["reached"], "seeds": agg["seeds"],
            "all_seeds": bool(agg["seeds"]) and agg["reached"] == agg["seeds"],
            "first": _finite(agg["first"]["mean"]), "first_step": _finite(agg["first_step"]["mean"]),
            "best": _finite(agg["best"]["mean"])}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def _order(ours: str, baseline_prefix: str, given: Sequence[str]) -> Callable[[str], tuple]:
    """``ours``, then its relatives (``munba-power-0.1`` before ``munba-power-0.3``), the baseline
    by its parameter, then the rest as given."""
    def number(setting: str, prefix: str) -> float:
        # the parameter leads what follows the prefix ("0.3" of "weighted-0.3/pooled")
        found = re.match(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", setting.removeprefix(prefix))
        return float(found.group()) if found else math.inf

    def key(setting: str):
        if setting.startswith(baseline_prefix):
            return (2, "", number(setting, baseline_prefix), given.index(setting))
        if setting.startswith(ours):
            base = setting.rstrip("0123456789.")
            return (0 if setting == ours else 1, base, number(setting, base), given.index(setting))
        return (3, "", 0.0, given.index(setting))
    return key


def compare_across_cases(cases: Mapping[str, Mapping[str, Mapping]], *, ours: str = "munba",
                         baseline_prefix: str = "weighted-") -> Dict:
    """Every setting on every case, the per-case oracle and the verdict ``ours`` vs the best
    fixed baseline setting.

    ``cases``: ``{case: {setting: aggregate_first_best result}}``. A setting counts on a case
    only if every seed run there reached the criterion (a mean over the lucky seeds is not a
    result); its mean over cases exists only if it counts on every case. The best fixed baseline
    is the ``baseline_prefix`` setting with the highest such mean; ``oracle`` is each case's own
    best baseline setting. There is no verdict (``met`` None) while some baseline setting was run
    on only some cases: it might have been the one that beats ``ours`` there.
    """
    names = [str(c) for c in cases]
    given = list(dict.fromkeys(s for c in cases.values() for s in c))
    settings = sorted(given, key=_order(ours, baseline_prefix, given))
    rows = {}
    for s in settings:
        cells = {str(c): _cell(per.get(s)) for c, per in cases.items()}
        counted = [x for x in cells.values() if x["run"] and x["all_seeds"]]
        every = len(counted) == len(names)
        rows[s] = {"cases": cells, "cases_run": sum(x["run"] for x in cells.values()),
                   "cases_forgotten": len(counted), "every_case": every,
                   **{p: _mean([x[p] for x in counted]) if every else None for p in _POINTS}}
    oracle: Dict = {"cases": {}}
    for c, per in cases.items():
        base = {s: a for s, a in per.items() if s.startswith(baseline_prefix)}
        entry = oracle["cases"][str(c)] = {"baselines_run": len(base)}
        for p in _POINTS:
            pick = best_at_forgetting(base, p) if base else None
            entry[p] = None if pick is None else _finite(base[pick][p]["mean"])
            entry[f"{p}_setting"] = pick
    for p in _POINTS:
        oracle[p] = _mean([oracle["cases"][c][p] for c in names])
    swept = {s: r for s, r in rows.items()
             if s.startswith(baseline_prefix) and r["cases_run"] == len(names)}
    fixed = {s: r for s, r in swept.items() if r["every_case"]}
    missing = [s for s in rows if s.startswith(baseline_prefix) and s not in swept]
    mine = rows.get(ours)
    verdict = {}
    for p in _POINTS:
        best = max(fixed, key=lambda s: fixed[s][p], default=None)  # ties: the first in order
        entry = {"best_fixed": best, "best_fixed_value": None if best is None else fixed[best][p],
                 "ours": None if mine is None else mine[p],
                 "ours_cases_forgotten": None if mine is None else mine["cases_forgotten"],
                 "oracle": oracle[p], "baselines_on_every_case": list(swept),
                 "baselines_not_on_every_case": missing}
        if mine is None or not swept or missing:
            # nothing to compare, or a sweep with holes: a setting not run on some case might
            # have been the one that beats ours there
            entry["met"] = None
        elif not mine["every_case"]:
            entry["met"] = False
        else:
            entry["met"] = best is None or mine[p] >= fixed[best][p]
        verdict[p] = entry
    return {"cases": names, "ours": ours, "baseline_prefix": baseline_prefix, "rows": rows,
            "oracle": oracle, "verdict": verdict}


def _cell_md(c: Mapping, digits: int) -> str:
    if not c["run"]:
        return "not run"
    if not c["all_seeds"]:
        return f"{c['reached']}/{c['seeds']} seeds"
    return (f"{format_cell(c['first'], digits)} ({format_cell(c['first_step'], 0)}) / "
            f"{format_cell(c['best'], digits)}")


def across_cases_markdown(result: Mapping, *, noun: str = "case",
                          label: Callable[[str], str] = str, metric: str = "retained accuracy",
                          criterion: str = "at equal forgetting", digits: int = 1,
                          tag: str = "") -> str:
    """The table and the two verdict lines of :func:`compare_across_cases`. ``noun`` names a
    case in the text ("digit"), ``label`` a case in the header; ``digits``: decimals shown;
    ``tag`` starts each verdict line (e.g. the variant)."""
    names, ours, prefix = result["cases"], result["ours"], result["baseline_prefix"]
    n = len(names)
    header = ([f"setting (the same on every {noun})"]
              + [f"{label(c)}: first (step) / best" for c in names]
              + [f"{noun}s forgotten, every seed", "mean first", "mean best"])
    table = []
    for s, r in result["rows"].items():
        table.append([s] + [_cell_md(r["cases"][c], digits) for c in names]
                     + [f"{r['cases_forgotten']}/{n}", format_cell(r["first"], digits),
                        format_cell(r["best"], digits)])

    def oracle_cell(o):
        if not o["baselines_run"]:
            return "no λ run"
        if o["first"] is None:
            return "none forgets every seed"
        return (f"{format_cell(o['first'], digits)} ({o['first_setting'].removeprefix(prefix)}) / "
                f"{format_cell(o['best'], digits)} ({o['best_setting'].removeprefix(prefix)})")

    o = result["oracle"]
    table.append([f"each {noun}'s best λ (oracle)"] + [oracle_cell(o["cases"][c]) for c in names]
                 + ["–", format_cell(o["first"], digits), format_cell(o["best"], digits)])
    md = [f"{metric} (%) {criterion} (mean over seeds; a {noun} counts when every seed reached "
          f"it)", "", markdown_table(header, table), ""]
    for p in _POINTS:
        x = result["verdict"][p]
        if x["met"] is None:
            status = (f"n/a: run every λ on every {noun}" if x["baselines_not_on_every_case"]
                      else "n/a")
        else:
            status = "met" if x["met"] else "NOT met"
        if not x["baselines_on_every_case"]:
            fixed = f"no λ run on every {noun}"
        elif x["best_fixed"] is None:
            fixed = (f"no λ of those run on every {noun} "
                     f"({', '.join(x['baselines_on_every_case'])}) forgets every {noun} in every "
                     f"seed")
        else:
            fixed = f"best single λ {x['best_fixed']} {format_cell(x['best_fixed_value'], digits)}"
        if x["baselines_on_every_case"] and x["baselines_not_on_every_case"]:
            fixed += f" (not run on every {noun}: {', '.join(x['baselines_not_on_every_case'])})"
        md.append(f"- {tag + ', ' if tag else ''}{p} point: {ours} {format_cell(x['ours'], digits)} "
                  f"({x['ours_cases_forgotten']}/{n} {noun}s forgotten in every seed) vs {fixed}; "
                  f"per-{noun} oracle {format_cell(o[p], digits)}: {status}")
    md.append("")
    return "\n".join(md)
