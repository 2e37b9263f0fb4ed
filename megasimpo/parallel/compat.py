"""Everything that reaches into Megatron-Core's private or version-specific internals, in one place.

Written for Megatron-Core 0.16 (``WRITTEN_FOR``); each entry point first checks that the installed
release is that minor (``megasimpo.versions.check``) and that the internals it uses still exist,
and refuses otherwise with ``UPGRADE_CHECKLIST``, what to re-check. Three patches:

- ``emit_hidden_states``: a last-stage GPTModel's output layer (a ColumnParallelLinear) hands its
  input over instead of computing logits, its ``forward`` replaced on the instance;
- ``apply_rope_scaling``: Llama-3 RoPE frequencies through RotaryEmbedding's private
  ``_apply_scaling``, with all four of the checkpoint's scaling constants (GPTModel forwards only
  the factor) written to its ``inv_freq``;
- ``prepare_optimizer_for_load`` / ``finish_optimizer_load``: without Transformer Engine or apex,
  Megatron runs ``torch.optim.AdamW``, whose per-parameter state carries a ``step`` counter that
  Megatron's distributed optimizer handles in two places only half-way:

  * ``init_state_fn`` creates ``exp_avg``/``exp_avg_sq`` but no ``step``, while ``state_dict()``
    (needed to build the sharded state to load into) asserts every parameter has one;
  * loading the fully reshardable format copies every key of the destination state from the
    checkpoint, ``step`` included, but the checkpoint's per-parameter tensors have no ``step``
    (it travels in the param groups and is restored from there): the class-wide patch of
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` skips that copy;
  * that restore puts ONE shared ``step`` tensor into every parameter's state, and torch Adam
    increments it in place once per parameter, so after the first resumed update each
    parameter's bias correction uses a different, wrong step.

  Neither path is taken with TE or apex (NGC containers), where the optimizer keeps its step per
  group. Nothing here changes a value: the counters are the ones Megatron restores itself;
- ``define_router_gemm``: without Transformer Engine, ``moe_utils`` never defines the name
  ``te_general_gemm`` that its router GEMM tests against None, so every MoE router raises
  NameError: the name is defined as None, which selects the router's plain torch path.
"""

import functools
import inspect
import types

import torch

from megasimpo import versions

WRITTEN_FOR = {"megatron.core": "0.16"}
UPGRADE_CHECKLIST = (
    "re-check on upgrade: (1) emit_hidden_states: ColumnParallelLinear.forward(input_, weight, "
    "runtime_gather_output) still returns (output, bias), GPTModel still calls output_layer only "
    "on the last stage with the final-norm output, and the sequence-parallel all-gather "
    "(gather_from_sequence_parallel_region, tensor_parallel_output_grad=True, self.tp_group) is "
    "still what the layer does to its input; (2) apply_rope_scaling: RotaryEmbedding."
    "_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, "
    "original_max_position_embeddings) and that forward reads self.inv_freq; (3) the AdamW "
    "fallback (HAVE_APEX_OR_TE false): whether init_state_fn now creates 'step', "
    "DistributedOptimizer._set_main_param_and_optimizer_states(model_param, tensors) still "
    "copies every state key, and whether the restored 'step' is still one shared tensor; (4) "
    "define_router_gemm: whether moe_utils now defines te_general_gemm without TE; then "
    "update WRITTEN_FOR in megasimpo/parallel/compat.py"
)


@functools.cache
def _check() -> None:
    """The installed Megatron-Core is the one this module was written for (module docstring)."""
    versions.check("megasimpo.parallel.compat", WRITTEN_FOR, UPGRADE_CHECKLIST)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    forward = inspect.signature(ColumnParallelLinear.forward).parameters
    if not ({"input_", "weight", "runtime_gather_output"} <= set(forward)
            and hasattr(RotaryEmbedding, "_apply_scaling")
            and hasattr(DistributedOptimizer, "_set_main_param_and_optimizer_states")):
        raise RuntimeError(f"megatron.core {versions.installed('megatron.core')}: an internal that "
                           f"megasimpo.parallel.compat relies on changed; {UPGRADE_CHECKLIST}")


# ---------------------------------------------------------------- output-layer passthrough

def _output_passthrough(self, input_, weight=None, runtime_gather_output=None):
    """ColumnParallelLinear.forward replacement: the layer's input, whole sequence, no logits.

    With sequence parallelism the input is this rank's [s/tp, b, h] slice; it is all-gathered
    like the real layer does, and the gradient is reduce-scattered in backward (the fused
    log-prob kernel then leaves its per-rank partial gradient unreduced).
    """
    if self.sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                      group=self.tp_group)
    return input_, None


def emit_hidden_states(gpt) -> None:
    """Makes a last-stage GPTModel return its final-norm hidden states [b, s, h] instead of logits.

    The loss then computes output layer and log-probs together, in chunks, without materialising
    the [b, s, v/tp] logits (``parallel/fused_logprobs.py``); the output weight stays where it is,
    so checkpoints, DDP buckets and the tied-embedding sync are unchanged. ``model.output_weight``
    gives that weight. Only the instance's output layer changes; other chunks are left alone.
    """
    _check()
    if gpt.post_process and not getattr(gpt, "emits_hidden", False):
        gpt.output_layer.forward = types.MethodType(_output_passthrough, gpt.output_layer)
        gpt.emits_hidden = True


# ---------------------------------------------------------------- Llama-3 RoPE scaling

def apply_rope_scaling(gpt, model) -> None:
    """Sets the RoPE frequencies of ``gpt`` from ``model`` (a ``config.ModelConfig``):
    ``rope_theta``, Llama-3 scaled with the checkpoint's own scaling parameters when it has them.

    GPTModel only forwards the factor (with Llama-3.1's other constants hard-coded), so the
    frequencies are recomputed from the full set the HF config gives.
    """
    _check()
    rope = gpt.rotary_pos_emb
    s = model.rope_scaling
    dim = model.head_dim
    base = 1.0 / (model.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    if s is not None:
        base = rope._apply_scaling(base, factor=s.factor, low_freq_factor=s.low_freq_factor,
                                   high_freq_factor=s.high_freq_factor,
                                   original_max_position_embeddings=s.original_max_position_embeddings)
    rope.inv_freq = base


# ---------------------------------------------------------------- torch-Adam fallback

_patched = False


def _fallback_active() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def prepare_optimizer_for_load(optimizer) -> None:
    """Gives a fresh optimizer the state a load needs, and skips the ``step`` copy (idempotent)."""
    global _patched
    _check()
    if not _fallback_active():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not _patched:
        original = DistributedOptimizer._set_main_param_and_optimizer_states

        def set_states(self, model_param, tensors):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            step = state.pop("step", None)  # restored from the param groups, not copied
            try:
                original(self, model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        _patched = True
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                state.setdefault("step", torch.tensor(0.0))


def finish_optimizer_load(optimizer) -> None:
    """Gives every parameter its own ``step`` counter after a load (see the module docstring)."""
    _check()
    if not _fallback_active():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


# ---------------------------------------------------------------- MoE router without TE


def define_router_gemm() -> None:
    """Defines ``moe_utils.te_general_gemm`` as None when Transformer Engine is absent (module
    docstring, patch 4); idempotent, and nothing when TE defined it."""
    _check()
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
