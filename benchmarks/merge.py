"""Merge a supplementary run into a main results file (when the device budget forced a
second, shorter command), keeping every row's provenance, and re-render the Markdown.

    python -m benchmarks.merge MAIN.json [SUPP.json ...] --out OUT.json [--notes NOTES.md]

Rows of SUPP replace rows of MAIN with the same (model, policy, capacity, batch or
"max", step implementation); every supplementary row carries "run": "supplementary N", and
MAIN's failures of configurations that SUPP measured are dropped. Bandwidth
fractions of every row are recomputed against MAIN's Llama-section copy bandwidth (the
4 GiB measurement). The merging itself: `schedule.merge_runs`.
"""

from __future__ import annotations

import argparse

from .schedule import merge_files, merge_runs as merge  # noqa: F401  (merge: the old name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("main")
    ap.add_argument("supp", nargs="*", help="none: only re-render MAIN (with --notes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--notes", default=None, help="a Markdown file appended to the report")
    args = ap.parse_args(argv)
    merge_files(args.main, args.supp, args.out, args.notes)


if __name__ == "__main__":
    main()
