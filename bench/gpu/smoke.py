"""First row of bench/gpu/run_all.sh: cheap GPU checks that the benchmark rows depend on.

Reports torch/CUDA/cuDNN and the device; one bf16 and one FP8 ``te.Linear`` forward+backward
(skipped, with the reason, without Transformer Engine); one TE ``DotProductAttention`` call; and,
for the 8B-width attention shape (b=2, 32 heads, 8 KV heads, head_dim 128, seq 4096, bf16, causal),
which PyTorch SDPA kernels run, in how many ms, and which one serves a call that names none.
Each section is caught and recorded on its own and the JSON is rewritten after every section, so
a failure or a kill keeps what came before. Figures are printed and stored, never asserted.
"""

import argparse
import json
import os
import sys
import traceback

B, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 2, 32, 8, 128, 4096


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "smoke.json"),
                   help="JSON report (default $OUT/smoke.json)")
    p.add_argument("--seq", type=int, default=4096, help="attention sequence length")
    p.add_argument("--iters", type=int, default=3, help="timed calls per measurement")
    return p.parse_args()


def _time_ms(torch, fn, iters):
    """Mean ms of ``fn`` over ``iters`` calls after one untimed call (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 3)


def _kernels(torch, fn, top=4):
    """Names of the CUDA kernels one call of ``fn`` launches, most device time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()

    def device_us(e):
        return getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)

    rows = sorted((e for e in prof.key_averages() if device_us(e) > 0), key=device_us, reverse=True)
    return [e.key[:120] for e in rows[:top]]


def _kind(names):
    """Which attention implementation a list of kernel names points to (best effort)."""
    text = " ".join(names).lower()
    for word, kind in (("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "efficient"),
                       ("efficient", "efficient"), ("cutlass", "efficient")):
        if word in text:
            return kind
    return "math (no fused attention kernel seen)"


def _fwd_bwd(out_fn, inputs):
    """A closure that runs ``out_fn()`` forward and backward (grads of ``inputs`` reset)."""
    def step():
        for t in inputs:
            t.grad = None
        out = out_fn()
        out.backward(out.new_ones(out.shape))
    return step


def _linear(torch, te, fp8, iters):
    x = torch.randn(4096, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lin = te.Linear(HIDDEN, HIDDEN, params_dtype=torch.bfloat16, device="cuda")
    out = {}
    if fp8:
        from transformer_engine.common.recipe import DelayedScaling

        ok, reason = te.is_fp8_available(return_reason=True)
        out["fp8_available"], out["fp8_reason"] = bool(ok), reason
        if not ok:
            return {**out, "skipped": reason}

        def fwd():
            with te.autocast(enabled=True, recipe=DelayedScaling()):
                return lin(x)
    else:
        def fwd():
            return lin(x)
    y = fwd()
    ref = x.detach().float() @ lin.weight.detach().float().t()
    if getattr(lin, "bias", None) is not None:
        ref += lin.bias.detach().float()
    out["max_rel_err_vs_fp32"] = round(float((y.float() - ref).abs().max() / ref.abs().max()), 5)
    out["finite"] = bool(torch.isfinite(y.float()).all())
    out["fwd_bwd_ms"] = _time_ms(torch, _fwd_bwd(fwd, [x]), iters)
    return out


def _te_attention(torch, te, seq, iters):
    dpa = te.DotProductAttention(HEADS, HEAD_DIM, num_gqa_groups=KV_HEADS,
                                 attn_mask_type="causal", qkv_format="bshd")
    q = torch.randn(B, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k, v = (torch.randn(B, seq, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    step = _fwd_bwd(lambda: dpa(q, k, v), [q, k, v])
    names = _kernels(torch, step)
    return {"backend": _kind(names), "kernels": names, "fwd_bwd_ms": _time_ms(torch, step, iters)}


def _sdpa(torch, seq, iters):
    """Each SDPBackend alone (GQA via enable_gqa, and with K/V expanded to 32 heads), then the
    kernels of a call that names no backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(heads):
        return torch.randn(B, heads, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True)

    q, k, v = make(HEADS), make(KV_HEADS), make(KV_HEADS)
    ke, ve = (t.detach().repeat_interleave(HEADS // KV_HEADS, dim=1).requires_grad_()
              for t in (k, v))
    layouts = {"gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                             enable_gqa=True),
               "expanded_kv": lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)}
    grads = {"gqa": [q, k, v], "expanded_kv": [q, ke, ve]}
    out = {"shape": {"b": B, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                     "seq": seq, "dtype": "bf16", "causal": True}}
    for layout, fn in layouts.items():
        step = _fwd_bwd(fn, grads[layout])
        res = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel(backend):
                    res[backend.name] = {"fwd_bwd_ms": _time_ms(torch, step, iters)}
            except Exception as e:  # a backend that refuses this shape says why
                res[backend.name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
        try:  # no backend named: which one PyTorch picks for this shape
            names = _kernels(torch, step)
            res["default"] = {"serves": _kind(names), "kernels": names,
                              "fwd_bwd_ms": _time_ms(torch, step, iters)}
        except Exception as e:
            res["default"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        out[layout] = res
    return out


def main():
    args = _args()
    import torch

    report = {"ok": True}

    def record(name, fn):
        try:
            report[name] = fn()
        except Exception as e:
            report["ok"] = False
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                            "where": traceback.format_exc().splitlines()[-3:]}
        print(f"smoke {name}: {json.dumps(report[name])}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    te, te_error = None, None
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # recorded; the TE sections skip with this reason
        te_error = f"Transformer Engine did not import: {type(e).__name__}: {e}"[:300]
    cuda = torch.cuda.is_available()
    record("env", lambda: {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "transformer_engine": __import__("transformer_engine").__version__ if te else te_error})
    if not cuda:
        record("skipped", lambda: "no CUDA device: nothing else to check")
        return 0
    n = args.iters
    if te is None:
        for name in ("te_linear_bf16", "te_linear_fp8", "te_attention"):
            record(name, lambda: {"skipped": te_error})
    else:
        record("te_linear_bf16", lambda: _linear(torch, te, False, n))
        record("te_linear_fp8", lambda: _linear(torch, te, True, n))
        record("te_attention", lambda: _te_attention(torch, te, args.seq, n))
    record("sdpa", lambda: _sdpa(torch, args.seq, n))
    print(f"smoke: wrote {args.out}; all sections ran: {report['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
