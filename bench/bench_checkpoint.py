"""What the per-item checksums cost a checkpoint save and load (docs/checkpoints.md, "Checksums").

    python bench/bench_checkpoint.py [--layers 8 --hidden 1024 --vocab 32000] [--repeats 7]
        [--dir DIR] [--precision fp32|bf16]

One rank on the CPU (gloo): a Llama-shaped model (by default 8 layers, hidden 1024, vocab 32000:
~170 M parameters, ~0.7 GB in fp32) is saved with ``checkpoint.save_model`` (Megatron's
``torch_dist`` writer, as every training checkpoint) and loaded back with
``checkpoint.load_model``, alternately with checksums (as megasimpo runs) and without (the
checksum hooks replaced by no-ops), ``--repeats`` times each. Loads read what the save just wrote,
mostly from the page cache, so the load figure is the CPU-bound worst case for the checksums'
share. Prints median and best seconds per variant, the difference of the medians, and the time
spent hashing (load: measured inside the load; save: the same tensors hashed on one core, an
upper bound of what Megatron's writer processes spend on it), which is the checksums' cost
without the noise of a shared machine.
"""

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def _timed_hashing(seconds: list):
    """Adds the time spent in the checksum functions (in this process) to ``seconds[0]``."""
    from megasimpo import checksums

    saved = checksums.tensor_digest, checksums.bytes_digest

    def timed(fn):
        def run(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                seconds[0] += time.perf_counter() - t
        return run

    checksums.tensor_digest, checksums.bytes_digest = map(timed, saved)
    try:
        yield
    finally:
        checksums.tensor_digest, checksums.bytes_digest = saved


@contextlib.contextmanager
def _without_checksums():
    """The checksum hooks (writes and reads) as no-ops: the code as it was before them."""
    from megasimpo import torch_compat

    saved = torch_compat.checksummed_writes, torch_compat.verified_reads
    torch_compat.checksummed_writes = torch_compat.verified_reads = contextlib.nullcontext
    try:
        yield
    finally:
        torch_compat.checksummed_writes, torch_compat.verified_reads = saved


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megasimpo import checkpoint, checksums, safe_load
    from megasimpo.config import Layout, ModelConfig
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                        ffn_hidden_size=args.hidden * 11 // 4, num_attention_heads=16,
                        num_query_groups=4, head_dim=args.hidden // 16, vocab_size=args.vocab,
                        max_position_embeddings=2048, tie_word_embeddings=False,
                        dtype="float32" if args.precision == "fp32" else "bfloat16")
    groups.init_distributed()
    layout = Layout.resolve(model, 1)
    groups.initialize(layout, 0)
    chunks = build_chunks(model, layout, Precision(name=args.precision), seed=0)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    root = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    os.makedirs(root, exist_ok=True)
    times = {(v, op): [] for v in ("with", "without") for op in ("save", "load")}
    hash_load = []
    try:
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for variant in (("with", "without") if r % 2 else ("without", "with")):
                path = os.path.join(root, f"ckpt_{variant}")
                shutil.rmtree(path, ignore_errors=True)
                with (contextlib.nullcontext() if variant == "with" else _without_checksums()):
                    t0 = time.perf_counter()
                    checkpoint.save_model(chunks, model, path, source="bench")
                    t1 = time.perf_counter()
                    hashing = [0.0]
                    with contextlib.redirect_stdout(io.StringIO()), _timed_hashing(hashing):
                        checkpoint.load_model(chunks, path)  # (stdout: the note, without)
                    t2 = time.perf_counter()
                have, total = checksums.count(safe_load.read_dcp_metadata(path))
                assert have == (total if variant == "with" else 0), (variant, have, total)
                if r:
                    times[(variant, "save")].append(t1 - t0)
                    times[(variant, "load")].append(t2 - t1)
                    if variant == "with":
                        hash_load.append(hashing[0])
        # The save hashes in Megatron's forked writer processes: the same tensors hashed here,
        # on one core, bound what that costs.
        tensors = [t for c in chunks for t in c.state_dict().values() if hasattr(t, "dtype")]
        hash_save = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for t in tensors:
                checksums.tensor_digest(t)
            hash_save.append(time.perf_counter() - t0)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        groups.destroy()
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: "
          f"{params / 1e6:.0f} M parameters, {args.precision}, checkpoint {size / 1e9:.2f} GB; "
          f"{args.repeats} repeats, 1 rank on the CPU")
    print("| op | without checksums (s) | with checksums (s) | difference of medians | "
          "hashing (s) | hashing / without |")
    print("|---|---|---|---|---|---|")
    for op, hashing in (("save", hash_save), ("load", hash_load)):
        a, b = times[("without", op)], times[("with", op)]
        ma, mb, mh = statistics.median(a), statistics.median(b), statistics.median(hashing)
        print(f"| {op} | {ma:.3f} (best {min(a):.3f}) | {mb:.3f} (best {min(b):.3f}) | "
              f"{100 * (mb - ma) / ma:+.1f}% | {mh:.3f} | {100 * mh / ma:.1f}% |")


if __name__ == "__main__":
    main()
