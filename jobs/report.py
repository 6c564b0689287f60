"""Cost and throughput report of a store's runs: report.md, report.json and PNG plots.

    python jobs/report.py --store URI [--out DIR] [--gpu-dollars-per-hour 1.006] ...
    ray job submit --working-dir . -- python jobs/report.py --store s3://... --out report   # the same, on a cluster

The options are those of `x2l report STORE` (`x2l report --help`; both declared by x2l.report.add_report_options),
with the store given as --store like the other jobs. x2l/report.py says how every number is derived from the
recorded stats. Exits 1 with one line on stderr ("report: error: ...") when the store or an option is refused.
"""

from __future__ import annotations

import argparse
import sys

from x2l.errors import OneLineParser, X2LError, one_line
from x2l.report import add_report_options, report_line, report_options, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="store URI: local folder or s3://bucket/prefix")
    add_report_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prices, which = report_options(args)
        report = write_report(args.store, args.out, prices, which)
    except X2LError as e:
        print(f"report: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(report_line(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
