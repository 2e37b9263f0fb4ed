"""Review a training run from its metrics (issue #7): early vs late table, flags, plots.

    python tools/review_run.py RUN_DIR [--out DIR]

Reads RUN_DIR/metrics.jsonl (and RUN_DIR/config.yaml when present), writes DIR/review.md,
DIR/review.json and DIR/review.png (DIR defaults to RUN_DIR/review) and prints the markdown.
Flags: over-optimisation (training margins rising while held-out accuracy is flat, or held-out loss
rising while training loss falls) and likelihood displacement (chosen and rejected rewards both
falling); the rules are in megasimpo/review.py. A missing, empty or malformed metrics file prints
``review_run: error: ...`` (with file:line) and exits 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="review_run", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where review.md/.json/.png go (default RUN_DIR/review)")
    return p


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    from megasimpo.review_render import write_review

    try:
        rep, md = write_review(args.run_dir, args.out)
    except (ValueError, OSError) as e:  # OSError: unreadable input, unwritable --out
        print(f"review_run: error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"review_run: wrote {', '.join(rep['files'].values())}; {len(rep['flags'])} flag(s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
