"""Review a training run from its metrics: early vs late table, flags, plots.

    python tools/review_run.py RUN_DIR [--out DIR]
    python tools/review_run.py RUN_A RUN_B ... [--out DIR]

Reads RUN_DIR/metrics.jsonl (and RUN_DIR/config.yaml when present), writes DIR/review.md,
DIR/review.json and DIR/review.png (DIR defaults to RUN_DIR/review) and prints the markdown.
Flags: over-optimisation (training margins rising while held-out accuracy is flat, or held-out loss
rising while training loss falls) and likelihood displacement (chosen and rejected rewards both
falling); the rules are in megasimpo/review.py. A missing, empty or malformed metrics file prints
``review_run: error: ...`` (with file:line) and exits 2.

With several run directories it compares them instead: one cell per run (its loss and LoRA rank
from config.yaml), the best cell per loss and the SimPO-vs-DPO decision by the rule in
megasimpo/compare_runs.py; it writes DIR/comparison.md, .json and .png (DIR defaults to
comparison/ beside the runs, in their common parent directory) and prints the markdown.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="review_run", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                   help="run directory holding metrics.jsonl; several: compare them")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where review.md/.json/.png go (default RUN_DIR/review); with several runs "
                        "comparison.md/.json/.png (default PARENT/comparison)")
    return p


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    if len(args.run_dirs) > 1:
        return _compare(args.run_dirs, args.out)
    from megasimpo.review_render import write_review

    try:
        rep, md = write_review(args.run_dirs[0], args.out)
    except (ValueError, OSError) as e:  # OSError: unreadable input, unwritable --out
        print(f"review_run: error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"review_run: wrote {', '.join(rep['files'].values())}; {len(rep['flags'])} flag(s)",
          file=sys.stderr)
    return 0


def _compare(run_dirs: list, out) -> int:
    """Several runs: the comparison and its decision."""
    from megasimpo.compare_render import write_comparison

    seen = {}
    for r in run_dirs:
        if os.path.realpath(r) in seen:
            print(f"review_run: error: {r!r} is the same run directory as {seen[os.path.realpath(r)]!r}",
                  file=sys.stderr)
            return 2
        seen[os.path.realpath(r)] = r
    parent = os.path.commonpath([os.path.dirname(os.path.abspath(r)) for r in run_dirs])
    out = out or os.path.join(parent, "comparison")
    try:
        result, md = write_comparison(run_dirs, out)
    except (ValueError, OSError) as e:
        print(f"review_run: error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"review_run: wrote {', '.join(result['files'].values())}; decision: "
          f"{result['decision']['decision']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
