"""Cost and throughput report of a store's runs: report.md, report.json and PNG plots.

    python jobs/report.py --store URI [--out DIR] [--gpu-dollars-per-hour 1.006] ...
    ray job submit --working-dir . -- python jobs/report.py --store s3://... --out report   # the same, on a cluster

The options are those of `x2l report STORE` (`x2l report --help`), with the store given as --store like the other
jobs. x2l/report.py says how every number is derived from the recorded stats.
"""

from __future__ import annotations

import sys

from x2l.cli import main


def to_cli(argv: list[str]) -> list[str]:
    """`--store URI` (or `--store=URI`) -> the positional STORE of `x2l report`."""
    out, store = [], None
    it = iter(argv)
    for a in it:
        if a == "--store":
            store = next(it, None)
        elif a.startswith("--store="):
            store = a.split("=", 1)[1]
        else:
            out.append(a)
    return ["report"] + ([store] if store else []) + out


if __name__ == "__main__":
    sys.exit(main(to_cli(sys.argv[1:])))
