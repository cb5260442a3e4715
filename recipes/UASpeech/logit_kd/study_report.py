#!/usr/bin/env python3
"""Write the report of a study folder: the student against every baseline, per held-out speaker,
with clustered confidence intervals and paired tests (``local/report.py`` says how).

``run_study.py`` writes it at the end of a study; this command writes it again, e.g. with other
statistics settings, from the finished runs under a folder (any depth).

Usage (from recipes/UASpeech/logit_kd)::

    python study_report.py results/study [--n_boot 2000] [--n_perm 10000] [--seed 0] [--quiet]

Writes ``study.md``, ``study.csv`` and ``study.png`` into the study folder.
"""

import argparse
import sys

from local.report import write_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_folder", help="folder holding the runs (any depth) of a study")
    parser.add_argument("--n_boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    parser.add_argument("--n_perm", type=int, default=10000, help="sign-flip permutations (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the permutations")
    parser.add_argument("--quiet", action="store_true", help="do not print the Markdown report")
    args = parser.parse_args(argv)
    try:
        text = write_report(args.study_folder, n_boot=args.n_boot, n_perm=args.n_perm, seed=args.seed)
    except (OSError, ValueError, KeyError) as err:
        parser.exit(2, f"error: {err}\n")
    if not args.quiet:
        print(text)
    print(f"wrote study.md, study.csv, study.png in {args.study_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
