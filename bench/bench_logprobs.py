"""Peak memory and time, plain vs fused output-layer log-probs (figures printed, never asserted).

    python bench/bench_logprobs.py [--tokens 4x4096] [--vocab 128256] [--hidden 4096]
                                   [--chunk 1024] [--dtype bf16] [--repeats 3] [--out FILE]

Figures go under the key ``logprobs`` of bench/results/<device>.json (bench/report.py).

plain: ``logits = hidden @ W^T`` -> ``mask_padded_vocab`` -> ``vocab_parallel_logprobs``;
fused: ``fused_vocab_parallel_logprobs`` (chunked, logits recomputed in backward). Both single rank
(tp_group None), forward + backward of ``sum(logprobs)``; the vocabulary is padded to a multiple of
128 as Megatron does. Defaults: the Llama-3-8B output layer on CUDA, a small problem on CPU.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` above what the inputs hold. CPU: there is no
allocator peak for torch (tracemalloc does not see its allocations), so each path runs in its own
subprocess and reports (a) the bytes of tensors autograd saves for backward (via
``saved_tensors_hooks``, inputs excluded) and (b) the peak-RSS growth over fwd+bwd (``ru_maxrss``),
which includes allocator and thread-pool noise.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import report  # noqa: E402

from megasimpo.parallel.fused_logprobs import fused_vocab_parallel_logprobs  # noqa: E402
from megasimpo.parallel.logprobs import vocab_parallel_logprobs  # noqa: E402
from megasimpo.step import mask_padded_vocab  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def make_inputs(args, device):
    """hidden [s, b, h], weight [v_pad, h] (both requires_grad), labels [s, b]."""
    b, s = args.tokens
    v_pad = -(-args.vocab // 128) * 128
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(s, b, args.hidden, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v_pad, args.hidden, generator=g) * args.hidden ** -0.5)
    weight = weight.to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (s, b), generator=g).to(device)
    return hidden, weight, labels


def run_path(path, hidden, weight, labels, args):
    """One forward + backward of sum(logprobs) on ``path``; returns the loss (detached)."""
    if path == "plain":
        logits = mask_padded_vocab(hidden @ weight.t(), args.vocab, 0)
        out = vocab_parallel_logprobs(logits, labels, None)
    else:
        out = fused_vocab_parallel_logprobs(hidden, weight, labels, tp_group=None,
                                            vocab_size=args.vocab, chunk_size=args.chunk)
    out.sum().backward()
    return out.detach()


def saved_bytes(path, hidden, weight, labels, args):
    """Bytes autograd saves for backward on ``path``, inputs' storage excluded."""
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, weight, labels)}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if path == "plain":
            logits = mask_padded_vocab(hidden @ weight.t(), args.vocab, 0)
            vocab_parallel_logprobs(logits, labels, None)
        else:
            fused_vocab_parallel_logprobs(hidden, weight, labels, tp_group=None,
                                          vocab_size=args.vocab, chunk_size=args.chunk)
    return total[0]


def measure(path, args, device):
    """{time_ms, peak_bytes, saved_bytes} of one path (on CPU: called in a fresh process)."""
    hidden, weight, labels = make_inputs(args, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        sync()
        start = time.perf_counter()
        run_path(path, hidden, weight, labels, args)
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # After the peak is read: on CPU ru_maxrss is a high-water mark this pass must not raise first.
    saved = saved_bytes(path, hidden, weight, labels, args)
    # The first repeat pays one-time costs (allocator growth, kernel selection): report the best.
    return {"time_ms": 1e3 * min(times), "peak_bytes": peak, "saved_bytes": saved}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--tokens", default="4x4096" if cuda else "2x256",
                   help="BxS micro-batch tokens (default 4x4096 on CUDA, 2x256 on CPU)")
    p.add_argument("--vocab", type=int, default=128256 if cuda else 32000)
    p.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    p.add_argument("--chunk", type=int, default=1024 if cuda else 128,
                   help="fused path: tokens per chunk (default 1024 on CUDA, 128 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<device>.json)")
    p.add_argument("--child", choices=["plain", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.tokens = tuple(int(x) for x in args.tokens.lower().split("x"))
        assert len(args.tokens) == 2
    except (ValueError, AssertionError):
        p.error(f"--tokens must be BxS, got {args.tokens!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:  # CPU: one path per process, so ru_maxrss is this path's own peak
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        print(json.dumps(measure(args.child, args, "cpu")))
        return
    results = {}
    for path in ("plain", "fused"):
        if args.device == "cuda":
            results[path] = measure(path, args, "cuda")
            torch.cuda.empty_cache()
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", path] + \
                (argv if argv is not None else sys.argv[1:])
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[path] = json.loads(line.strip().splitlines()[-1])

    b, s = args.tokens
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    mem_label = "peak alloc" if args.device == "cuda" else "peak RSS delta"
    print(f"\ntokens {b}x{s}, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, "
          f"chunk {args.chunk}, device {device_name}\n")
    print(f"| path | time ms fwd+bwd | {mem_label} MiB | saved for bwd KiB |")
    print("|---|---|---|---|")
    for path in ("plain", "fused"):
        r = results[path]
        print(f"| {path} | {r['time_ms']:.1f} | {r['peak_bytes'] / 2**20:.1f} | "
              f"{r['saved_bytes'] / 2**10:.1f} |")
    p, f = results["plain"], results["fused"]
    ratio = {k: (f[k] / p[k] if p[k] else float("nan"))
             for k in ("time_ms", "peak_bytes", "saved_bytes")}
    print(f"| ratio fused/plain | {ratio['time_ms']:.2f} | {ratio['peak_bytes']:.3f} | "
          f"{ratio['saved_bytes']:.4f} |")
    if args.device == "cpu":
        print("\nCPU memory: peak RSS growth per path in its own process (allocator noise "
              "included) and the bytes autograd saves for backward; not an allocator peak.")

    out_path = report.results_path(args.out)
    report.merge_results(out_path, {"device": report.device_name(), "logprobs": {
        "device": device_name, "tokens": [b, s], "vocab": args.vocab, "hidden": args.hidden,
        "dtype": args.dtype, "chunk": args.chunk, "memory_metric": mem_label,
        "results": results, "ratio": ratio}})
    print(f"\nwrote {out_path} (key 'logprobs')")


if __name__ == "__main__":
    main()
