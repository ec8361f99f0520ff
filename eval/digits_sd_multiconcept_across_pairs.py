#!/usr/bin/env python
"""One setting for every set of digits: pool several-digits experiments and compare fixed settings.

    python eval/digits_sd_multiconcept_across_pairs.py docs/multiconcept/forget_3_7 \
        docs/multiconcept/forget_2_5 docs/multiconcept/forget_0_8 --output_dir runs/across_pairs

Each argument is an ``eval/digits_sd_multiconcept.py`` output directory (or its results.json),
one set of forgotten digits each (several may cover one set, e.g. an extra λ run apart), all on
the same protocol and build. A setting is a method and a mode (``munba/per_concept``,
``weighted-0.3/pooled``, ...), the choices a user fixes before knowing the concepts. Per variant
it prints, for every setting run unchanged on every set, the retained accuracy at the first and
the best evaluation with every digit of the set at forget accuracy <= 5%, on how many sets it got
there in every seed, and the mean over sets; then each set's own best weighted setting (the
oracle) and the verdict: the default (``munba/per_concept``, a bargaining player per digit) vs
the best single weighted setting. With ``--output_dir`` it writes results.json / results.md there
(atomically). Reads only; trains and generates nothing.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+",
                   help="digits_sd_multiconcept.py output directories or their results.json")
    p.add_argument("--output_dir", default=None, help="write results.json / results.md here")
    p.add_argument("--ours", default="munba/per_concept",
                   help="the setting compared with the weighted sum (default: munba/per_concept)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from hf_munba.evaluation.results import write_results
    from hf_munba.testing.digits_comparison import (across_pairs_markdown, compare_across_pairs,
                                                    load_multiconcept_experiments)

    try:
        experiments = load_multiconcept_experiments(args.results)
    except (FileNotFoundError, ValueError) as err:  # one line, nothing written
        sys.exit(f"error: {err}")
    result = compare_across_pairs(experiments, ours=args.ours)
    result["sources"] = {p: e["sources"] for p, e in experiments.items()}
    md = ("# One setting for every set of forgotten digits\n\n"
          f"Sets {', '.join(result['pairs'])}; sources: "
          + "; ".join(f"{p}: {', '.join(s)}" for p, s in result["sources"].items())
          + "\n\n" + across_pairs_markdown(result))
    if args.output_dir is not None:
        write_results(args.output_dir, result, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
