"""RMSNorm and SwiGLU for Megatron's local layer spec that save what fused GPU kernels save.

Without Transformer Engine the local spec would run torch's composite ``rms_norm`` (off CUDA it
upcasts the input and keeps the fp32 copy and the normalised product for backward) and
Megatron's unfused ``glu`` (it keeps the SiLU output and an ``x + 0`` copy of the linear half).
These autograd functions keep only what CUDA's fused RMSNorm and Megatron's fused
``bias_swiglu`` keep: the input (and, for the norm, 1/rms per row), recomputing the rest in
backward. Values are computed exactly as torch's ``rms_norm`` and ``silu(a) * b`` compute them
(fp32 opmath for the norm's statistics, the input dtype for the products), so a run on them
trains like one on the torch ops (``tests/test_local_kernels.py``).
"""

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """x [..., h], weight [h] -> (x * rsqrt(mean(x^2) + eps)).type_as(x) * weight."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        out = (x32 * rstd).type_as(x) * weight
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        normed = x32 * rstd
        grad_weight = (grad * normed.type_as(x)).reshape(-1, x.shape[-1]).sum(0)
        g = (grad * weight).float()
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.type_as(x), grad_weight.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: torch's fused kernel on CUDA (it saves the input and
    1/rms only), elsewhere :class:`_RMSNorm`, which saves the same."""
    if x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """x [..., 2f] = [a | b] -> silu(a) * b [..., f]; saves x only (Megatron's swiglu_back)."""

    @staticmethod
    def forward(ctx, x):
        a, b = torch.chunk(x, 2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        # d/da = grad * b * s * (1 + a * (1 - s)), d/db = grad * a * s, s = sigmoid(a); written
        # into the two halves of one [..., 2f] buffer, with s the only temporary.
        (x,) = ctx.saved_tensors
        a, b = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_a, grad_b = torch.chunk(grad_x, 2, dim=-1)
        sig = torch.sigmoid(a)
        grad_b.copy_(a).mul_(sig).mul_(grad)
        grad_a.copy_(sig).neg_().add_(1).mul_(a).add_(1).mul_(sig).mul_(b).mul_(grad)
        return grad_x


class SwiGLU(torch.nn.Module):
    """The MLP activation module of the local spec (Megatron builds it with the config)."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2f] -> [..., f]."""
        return _SwiGLU.apply(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata=None) -> dict:
        """No parameters, nothing to checkpoint (Megatron's MLP asks every child)."""
        return {}
