"""Preference records (JSONL / JSON / Parquet / saved datasets) -> Megatron pair dataset.

    python tools/preprocess_data.py --input FILE [FILE ...] --tokenizer HF_DIR|SPM_MODEL --out PREFIX
        [--max-length N] [--workers N] [--split-eval F] [--skip-invalid] [--seed N] [--force]
        [--chat-template auto|always|never] [--chat-template-file FILE] [--turn-separator TEXT]

Writes PREFIX.bin/.idx and PREFIX.summary.json (with --split-eval also PREFIX_eval.*). Existing
outputs are refused unless --force, which replaces them once the new ones are complete and removes
a PREFIX_eval.* the run does not write. Bad input (an unwritable --out included, checked before
tokenizing) prints ``preprocess_data: error: <message>`` and exits 2 with nothing written.

Chat templates (megasimpo/data/chat_template.py): by default TRL 1.16's DPOTrainer rule:
conversational records go through the chat template, plain-string records are tokenized as TRL
tokenizes them (the tokenizer's own special tokens, EOS after each response), so an already
formatted prompt is not formatted twice. The summary records the rule applied.
"""

import argparse
import os
import sys
import warnings

# megatron.core announces missing Transformer Engine/Apex on import; irrelevant to preprocessing.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

try:
    import megasimpo  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasimpo.data.preprocess import PreprocessConfig, run, summary_lines  # noqa: E402

PROG = "preprocess_data"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (docs/architecture.md, "Contracts")."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL/JSON/Parquet files or saved datasets directories, read in order")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer directory or SentencePiece .model")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.bin/.idx/.summary.json)")
    p.add_argument("--max-length", type=int, default=None,
                   help="max prompt+response tokens; prompts are cut from the left, pairs whose "
                        "response alone does not fit are dropped")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--split-eval", type=float, default=0.0,
                   help="share of pairs held out to PREFIX_eval (seeded random split)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="count invalid records as skips instead of failing")
    p.add_argument("--seed", type=int, default=1234, help="seed of the eval split")
    p.add_argument("--force", action="store_true",
                   help="replace existing PREFIX.* / PREFIX_eval.* outputs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--chat-template", choices=("auto", "always", "never"), default="auto",
                   help="which records go through the chat template: auto (default, TRL's rule): "
                        "conversational records only, plain strings tokenized as they are; "
                        "always: every text record (a string prompt is one user turn); never: "
                        "none (conversations need --turn-separator)")
    p.add_argument("--chat-template-file", metavar="FILE", default=None,
                   help="a Jinja chat template used instead of the tokenizer's (with auto for "
                        "conversational records, or always)")
    p.add_argument("--turn-separator", metavar="TEXT", default=None,
                   help="with --chat-template never: a conversation's prompt is each earlier "
                        "turn's content followed by TEXT (roles dropped), then the response")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        config = PreprocessConfig(
            inputs=tuple(args.input), tokenizer=args.tokenizer, out=args.out,
            max_length=args.max_length, workers=args.workers, split_eval=args.split_eval,
            skip_invalid=args.skip_invalid, seed=args.seed, force=args.force,
            chat_template=args.chat_template, chat_template_file=args.chat_template_file,
            turn_separator=args.turn_separator)
        summaries = run(config, progress=not args.no_progress)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for summary in summaries:
        print("\n".join(summary_lines(summary)))
        print(f"[{summary['split']}] summary: {summary['prefix']}.summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
