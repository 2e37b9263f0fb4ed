"""HF <-> megasimpo checkpoint conversion (docs/architecture.md, "Contracts").

    python tools/convert_hf.py import --hf HF_DIR --out CKPT [--force]
    python tools/convert_hf.py import --hf BASE --adapter PEFT_DIR --out CKPT [--ignore-base-name]
    python tools/convert_hf.py export --load CKPT --out HF_DIR [--force] [--max-shard-size 5GB]
        [--dtype bf16|fp32|fp16]
    python tools/convert_hf.py export --load LORA_CKPT --out PEFT_DIR --adapter-only

export writes the weights in the dtype the checkpoint records for them (fp32 after an fp32 run;
the model's own dtype for a checkpoint that records none) unless --dtype says otherwise.
A LoRA checkpoint exports merged (W + alpha/r B A), or with --adapter-only
as a PEFT adapter directory (``peft.PeftModel.from_pretrained(base, PEFT_DIR)``). import
--adapter writes the base to CKPT/base and, in CKPT, a LoRA checkpoint of the adapter over it.

Both stream tensor by tensor (memory stays near the largest tensor, not the model), write to
OUT.partial and rename at the end. User errors print ``convert_hf: error: ...`` and exit 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="convert_hf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory (config.json + safetensors) -> checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory")
    imp.add_argument("--out", required=True, help="checkpoint directory to write")
    imp.add_argument("--adapter", metavar="PEFT_DIR",
                     help="a PEFT LoRA adapter over --hf: write a LoRA checkpoint (base in OUT/base)")
    imp.add_argument("--ignore-base-name", action="store_true",
                     help="accept an --adapter whose base_model_name_or_path names another model")
    exp = sub.add_parser("export", help="checkpoint (any layout) -> HF directory")
    exp.add_argument("--load", required=True, help="checkpoint directory")
    exp.add_argument("--out", required=True, help="HF directory to write")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file (bytes or 5GB, 500MB, ...; default 5GB)")
    exp.add_argument("--dtype", choices=("bf16", "fp32", "fp16"),
                     help="dtype of the exported weights (default: the one the checkpoint records "
                          "for its weights, fp32 after an fp32 run; bf16 rounds them)")
    exp.add_argument("--adapter-only", action="store_true",
                     help="a LoRA checkpoint's adapters as a PEFT directory, not merged weights")
    for sp in (imp, exp):
        sp.add_argument("--force", action="store_true", help="replace --out if it exists")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    from megasimpo.known_warnings import quiet_known_warnings

    quiet_known_warnings()
    try:
        from megasimpo.hf import export_hf, import_hf, parse_size

        if args.command == "import":
            model = import_hf(args.hf, args.out, force=args.force, progress=not args.no_progress,
                              adapter=args.adapter, ignore_base_name=args.ignore_base_name)
        else:
            model = export_hf(args.load, args.out, force=args.force,
                              max_shard_size=parse_size(args.max_shard_size),
                              progress=not args.no_progress, adapter_only=args.adapter_only,
                              dtype=args.dtype)
    except (ValueError, OSError) as e:  # user errors: bad input, existing output, disk
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_hf: {args.command}: wrote {args.out} ({model.architecture}, {model.num_layers} "
          f"layers, {model.num_parameters / 1e6:.1f}M parameters, {model.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
