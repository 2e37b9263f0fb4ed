"""The local spec's memory-lean RMSNorm and SwiGLU against torch's own ops (values, gradients,
and what they keep for backward)."""

import pytest
import torch
import torch.nn.functional as F

from megasimpo.local_kernels import SwiGLU, _RMSNorm, rms_norm

pytestmark = pytest.mark.fast  # in `make test-fast`


def _saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn(*inputs)``."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    ids = {x.untyped_storage().data_ptr() for x in inputs}
    return out, sum(v for k, v in seen.items() if k not in ids)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_torch(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 32, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32)).to(dtype).requires_grad_()
    ours = rms_norm(x, w, 1e-5)
    ref = F.rms_norm(x, (32,), w, 1e-5)
    assert torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol)
    g = torch.randn_like(ours)
    gx, gw = torch.autograd.grad(ours, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    assert torch.allclose(gx.float(), rx.float(), rtol=tol, atol=tol)
    assert torch.allclose(gw.float(), rw.float(), rtol=tol, atol=tol * 10)


def test_rms_norm_keeps_only_input_and_rstd():
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(128, dtype=torch.bfloat16, requires_grad=True)
    _, lean = _saved_bytes(lambda a, b: _RMSNorm.apply(a, b, 1e-5), x, w)
    _, composite = _saved_bytes(lambda a, b: F.rms_norm(a, (128,), b, 1e-5), x, w)
    assert lean == 64 * 4  # 1/rms per row in fp32; x and the weight are the inputs themselves
    assert composite > 64 * 128 * 4  # torch's CPU composite keeps an fp32 copy (at least)


def test_swiglu_matches_torch_and_keeps_only_its_input():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 2 * 24, requires_grad=True)
    act = SwiGLU()
    ours, lean = _saved_bytes(act, x)
    a, b = x.chunk(2, -1)
    ref, plain = _saved_bytes(lambda t: F.silu(t.chunk(2, -1)[0]) * t.chunk(2, -1)[1], x)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-6)
    assert lean == 0 and plain > 0  # only x itself, an input
