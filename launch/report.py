"""Draw a run's report: PNG figures and an HTML page in `<run_dir>/report/`.

    python -m launch.report runs/my-run              # works while the run is still going
    python -m launch.report runs/my-run --out /tmp/r # somewhere else
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.report import FIGURES, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default <run_dir>/report)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").exists():
        print(f"quintet: {args.run_dir} has no metrics.jsonl; is it the run_dir of a run that has started?",
              file=sys.stderr)
        return 2
    paths = write_report(args.run_dir, args.out)
    out = args.out or args.run_dir / "report"
    skipped = [name for name in FIGURES if name not in paths]
    print(f"wrote {out / 'index.html'} and {', '.join(p.name for p in paths.values())}"
          + (f" (no data for: {', '.join(skipped)})" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
