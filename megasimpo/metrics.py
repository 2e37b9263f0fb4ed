"""Where step metrics go: RUN_DIR/metrics.jsonl, TensorBoard, and the throughput figures.

FLOPs follow Megatron's accounting for a dense GQA SwiGLU decoder: every weight GEMM costs 2 FLOPs
per multiply-add per token, attention scores and values cost 2 x 2 x s x (heads x head_dim) per token
per layer, halved for the causal mask, and training costs 3x the forward (forward + 2x backward).
A step counts every position that ran (``batch_forward_flops``): all [rows, seq_length] positions
of a padded batch, as Megatron does, or each sequence of a packed row over its own length. The
figure is the work the GPU does; ``tokens_per_sec`` counts real tokens only.
"""

import json
import os
import resource
from typing import Optional

import torch

from megasimpo.config import ModelConfig
from megasimpo.jsonl import read_jsonl
from megasimpo.shapes import layer_shapes, padded_vocab_size

# Dense BF16 peak TFLOP/s by device name fragment, most specific first (FP8 is twice these on
# Hopper). SXM H100/H200 989; the PCIe and NVL H100 parts are clocked lower.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H800": 989.0,
                    "H200": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0}


def _dense_flops_per_token(model: ModelConfig) -> float:
    """Weight-GEMM FLOPs per token: QKV, output projection, SwiGLU fc1 + fc2 (an MoE layer's
    router and the token's top-k experts), logits."""
    gemm = sum(layer_shapes(model, i).active_gemm_weights for i in range(model.num_layers))
    return 2.0 * (gemm + model.hidden_size * padded_vocab_size(model.vocab_size))


def _attention_flops(model: ModelConfig, length: float) -> float:
    """QK^T and AV FLOPs of one sequence of ``length`` tokens over all layers, causal half."""
    return 2.0 * model.num_layers * layer_shapes(model).q * length * length


def forward_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of a ``seq_length`` sequence, logits included, causal attention
    halved."""
    return _dense_flops_per_token(model) + _attention_flops(model, seq_length) / seq_length


def batch_forward_flops(model: ModelConfig, batch) -> float:
    """Forward FLOPs of the positions one micro-batch (``data.batches.MicroBatch``) runs: every
    [rows, s] position of a padded batch (each row attends over s), or each packed sequence over
    its own length (THD attention computes only those blocks; the padding tail counts as one more
    sequence). Shapes and host-known segment lengths only: nothing is read from the device."""
    rows, s = batch.tokens.shape
    lengths = list(batch.packed.segments) if batch.packed is not None else [s] * rows
    return (_dense_flops_per_token(model) * rows * s
            + sum(_attention_flops(model, n) for n in lengths))


def step_flops(model: ModelConfig, seq_length: int, num_sequences: int, *,
               reference_forwards: int = 0) -> float:
    """FLOPs of one optimizer step over ``num_sequences`` padded rows (+ frozen forwards)."""
    per_seq = forward_flops_per_token(model, seq_length) * seq_length
    return per_seq * num_sequences * (3 + reference_forwards)


def peak_tflops(precision: str) -> Optional[float]:
    """This GPU's dense peak TFLOP/s for the precision, or None when unknown (CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, bf16 in PEAK_BF16_TFLOPS.items():
        if key in name:
            return bf16 * (2 if precision == "fp8" else 1) if precision != "fp32" else bf16 / 2
    return None


def peak_memory_gb() -> float:
    """Peak GPU memory allocated (GPU) or peak resident set size (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of metric ``name`` as TRL's trainers write it (transformers'
    ``TensorBoardCallback`` through ``rewrite_logs``): ``eval_x`` -> ``eval/x``, any other ``x``
    -> ``train/x``. metrics.jsonl keeps the names themselves (the contract)."""
    return "eval/" + name[len("eval_"):] if name.startswith("eval_") else "train/" + name


class MetricsSink:
    """Appends metric rows to metrics.jsonl and TensorBoard (rank 0 only; others no-op)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._file = open(self.path, "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:  # TensorBoard is optional at run time; JSONL is the contract
                self._tb = None

    def write(self, row: dict) -> None:
        """One row: {"step": int, name: float, ...}."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(tensorboard_tag(k), v, row["step"])

    def close(self) -> None:
        """Flushes and closes the files."""
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list:
    """The rows of RUN_DIR/metrics.jsonl."""
    return [row for _, row in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
