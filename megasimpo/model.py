"""Megatron-Core GPTModel chunks for a ModelConfig of a supported family.

Llama, Mistral, Qwen2 and Qwen3 are the same GPTModel: RMSNorm, SwiGLU MLP, RoPE (optionally
Llama-3 scaled), grouped-query attention, tied or untied embeddings; what a family switches on
(QKV bias, q/k norms) is its ``spec_flags`` (``megasimpo/families/``). The layer spec
follows ``--attention-backend`` (``layer_spec.py``: Transformer Engine when it imports on a GPU,
else Megatron's local spec with PyTorch SDPA attention); all of them save the same checkpoint keys
(the local spec maps its norms onto TE's fused names).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megasimpo.config import Layout, ModelConfig
from megasimpo.families.registry import family_of
from megasimpo.layer_spec import block_spec, have_te, resolve_attention_backend
from megasimpo.parallel.compat import apply_rope_scaling, define_router_gemm
from megasimpo.parallel.compat import emit_hidden_states as emit_hidden_states  # step's import
from megasimpo.shapes import padded_vocab_size


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Numerics of a run: weight/compute dtype and FP8."""

    name: str = "bf16"  # bf16 | fp8 | fp32

    def __post_init__(self):
        if self.name not in ("bf16", "fp8", "fp32"):
            raise ValueError(f"--precision {self.name!r} must be bf16, fp8 or fp32")
        if self.name == "fp8" and not have_te():
            raise ValueError("--precision fp8 needs Transformer Engine on a CUDA GPU")

    @property
    def dtype(self) -> torch.dtype:
        """Parameter and activation dtype (FP8 runs keep BF16 weights; TE casts GEMM inputs)."""
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    @classmethod
    def default(cls) -> "Precision":
        """BF16 on GPU, FP32 on CPU (CPU BF16 matmuls are slow and only approximate)."""
        return cls(name="bf16" if torch.cuda.is_available() else "fp32")


def transformer_config(model: ModelConfig, layout: Layout, precision: Precision, *,
                       recompute: bool = False, attention_backend: str = "sdpa"):
    """Megatron TransformerConfig for this model, layout, precision and (resolved) backend."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    te = attention_backend == "te"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        **family_of(model).spec_flags(model),  # the family's switches: QKV bias, q/k norms
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,  # None: an even split
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=precision.dtype,
        pipeline_dtype=precision.dtype,
        bf16=precision.dtype == torch.bfloat16,
        fp8="hybrid" if precision.name == "fp8" else None,
        fp8_recipe="delayed",  # read only when fp8 is set
        fp8_amax_history_len=1024 if precision.name == "fp8" else 1,
        fp8_amax_compute_algo="max" if precision.name == "fp8" else "most_recent",
        # Fused kernels exist only on CUDA (some only with TE/apex); numerics are the same.
        # The local spec's SwiGLU is layer_spec's activation module (Megatron calls it through
        # use_te_activation_func); the TE spec uses Megatron's fused bias_swiglu on GPU.
        bias_activation_fusion=on_gpu and te,
        use_te_activation_func=not te,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=te,
        use_cpu_initialization=not on_gpu,
        # Always initialise, even before loading a checkpoint: Megatron-Core 0.16 sets the
        # tensor-parallel attributes (tensor_model_parallel, partition_dim) only while
        # initialising, and without them the grad norm counts one TP shard of each weight.
        perform_initialization=True,
        # Losses return sums over pairs and the pair count; Megatron divides by the global count.
        calculate_per_token_loss=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        deallocate_pipeline_outputs=True,
        # gloo pairs messages between two ranks by posting order; at PP=2 the previous and next
        # stage are the same rank, so batched isend/irecv can swap a forward activation with a
        # backward gradient of the same shape in the interleaved schedule. NCCL keeps batching.
        batch_p2p_comm=on_gpu,
        **_moe_fields(model, layout, te),
    )


def _moe_fields(model: ModelConfig, layout: Layout, te: bool) -> dict:
    """Megatron's MoE switches that depend on the run, not the family: expert parallelism, the
    token dispatcher, grouped GEMM (Transformer Engine's), dropless routing. Routing is what
    transformers computes: the router's logits in the activations' dtype, no capacity factor,
    and no auxiliary loss inside Megatron (``moe_aux.py`` adds transformers' own)."""
    if not model.num_experts:
        return {}
    return dict(expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.expert_tp,
                moe_token_dispatcher_type=layout.moe_dispatcher,
                moe_grouped_gemm=te,
                moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0,
                moe_expert_capacity_factor=None,
                moe_permute_fusion=False,
                moe_router_fusion=False)


def build_chunks(model: ModelConfig, layout: Layout, precision: Precision, *,
                 recompute: bool = False, seed: Optional[int] = None,
                 attention_backend: Optional[str] = None) -> list:
    """This rank's model chunks (one per virtual stage), unwrapped, on the current device.

    Weights are drawn from ``seed`` (on CPU exactly as a single-rank model would draw them: CPU
    initialisation splits a full master weight, so any layout starts identical).
    ``attention_backend``: one of ``layer_spec.ATTENTION_BACKENDS`` (None: auto); each chunk
    records the resolved one as ``attention_backend``.
    """
    from megatron.core.models.gpt import GPTModel

    from megasimpo.parallel.groups import chunk_stages

    backend = resolve_attention_backend(attention_backend)
    if model.num_experts:
        define_router_gemm()  # Megatron-version-bound: parallel/compat.py
    config = transformer_config(model, layout, precision, recompute=recompute,
                                attention_backend=backend)
    chunks = []
    if seed is not None:
        torch.manual_seed(seed)
    for vp in range(layout.num_chunks):
        vp_stage = vp if layout.vpp else None
        pre, post = chunk_stages(vp_stage)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(backend, config, vp_stage),
            vocab_size=padded_vocab_size(model.vocab_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rope_theta) if float(model.rope_theta).is_integer()
            else model.rope_theta,
            vp_stage=vp_stage,
        )
        apply_rope_scaling(gpt, model)  # Megatron-version-bound: parallel/compat.py
        _experts_apart(gpt)
        gpt.attention_backend = backend
        if torch.cuda.is_available():
            gpt.cuda(torch.cuda.current_device())
        chunks.append(gpt)
    return chunks


def _experts_apart(gpt) -> None:
    """Marks every expert weight as reduced over the expert data-parallel group, as Megatron
    marks them only at EP > 1. Megatron's optimizer then always chains a dense and an expert
    optimizer for an MoE model, so its checkpointed state has one structure at every EP and a
    run saved at EP=2 resumes at EP=1 (at EP=1 the expert data-parallel group is the dense one:
    the same reduction)."""
    for name, param in gpt.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def output_weight(gpt) -> torch.Tensor:
    """[v_pad/tp, h]: the last stage's output-layer weight (the shared embedding when tied)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def packed_attention(packed, attention_backend: str) -> tuple:
    """(attention_mask, packed_seq_params) that keep attention inside each sequence of a packed
    row (``packed``: a ``data.batches.PackedLayout``, already on the device), for the attention
    backend in use. Whether to pack is the trainer's decision, carried by the batch; this only
    says how the chosen backend reads a packed row.

    ``te`` and ``sdpa``: THD attention over ``cu_seqlens`` (no mask; RoPE restarts per sequence).
    ``unfused`` (Megatron's DotProductAttention): a block-diagonal causal mask [1, 1, T, T]
    (True = masked) from the segment ids; its RoPE runs over the packed positions, which changes
    nothing inside a block because rotary attention scores depend only on the distance between
    two positions.
    """
    if attention_backend in ("te", "sdpa"):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = packed.cu_seqlens
        return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=packed.max_seqlen,
                                     max_seqlen_kv=packed.max_seqlen)
    seg = packed.segment_ids.reshape(-1)  # the segments of block_causal_mask, tail included
    n = seg.numel()
    allowed = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    allowed &= seg[:, None] == seg[None, :]
    return ~allowed.view(1, 1, n, n), None


def context_parallel_mask(batch, cp_rank: int, cp_size: int, attention_backend: str,
                          dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The ``attention_mask`` of this CP rank's share of a micro-batch (``step.cp_slice``) for
    the ``sdpa`` backend's context parallelism (``parallel/cp_attention.py``): [s/cp, s]
    additive in ``dtype`` (0 = may attend, -inf = masked), causal by global positions and, for a
    packed row, inside each segment (from the host-known segment lengths). Built once per
    micro-batch and shared by every layer, so SDPA keeps one copy for backward. None for cp 1
    and for ``te`` (Transformer Engine's own context parallelism)."""
    if cp_size == 1 or attention_backend != "sdpa":
        return None
    from megasimpo.parallel.cp_attention import cp_attention_mask

    device = batch.tokens.device
    if batch.packed is None:
        allowed = cp_attention_mask(cp_rank, cp_size, length=batch.tokens.shape[1] * cp_size,
                                    device=device)
    else:
        allowed = cp_attention_mask(cp_rank, cp_size, segments=batch.packed.segments,
                                    device=device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed,
                                                                              float("-inf"))


DDP_BUCKET_SIZE = None  # parameters per overlapped gradient bucket; None: Megatron's default


def wrap_for_training(chunks: list, precision: Precision, *, overlap_grad_reduce: bool = False,
                      overlap_param_gather: bool = False) -> list:
    """Float16Module (BF16) + Megatron DDP with the distributed optimizer's grad buffers.

    ``overlap_grad_reduce``: each gradient bucket is reduce-scattered asynchronously once the
    backward hooks have seen all of its gradients on the last micro-batch;
    ``overlap_param_gather`` (needs it): the optimizer step leaves the parameter all-gather to
    forward pre-hooks of the next pass. The caller wires the schedule's sync functions
    (``config.no_sync_func`` / ``grad_sync_func`` / ``param_sync_func``), as Megatron-LM does.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    assert overlap_grad_reduce or not overlap_param_gather, "param gather overlap needs grad's"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        # The interleaved schedule launches the next chunk's all-gather itself (param_sync_func);
        # the other schedules never do, so there each bucket's pre-hook launches the next one.
        align_param_gather=overlap_param_gather and len(chunks) > 1,
        bucket_size=DDP_BUCKET_SIZE,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,  # non-finite steps are skipped by the trainer instead
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = chunk.config
        module = Float16Module(config, chunk) if config.bf16 else chunk
        # One bucket for chunks after the first (Megatron-LM's get_model): their reduction is
        # overlapped with the other chunks' compute anyway.
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config,
                                               module=module, disable_bucketing=i > 0))
    return wrapped


def set_sync_funcs(model: list) -> None:
    """Sets the schedule's DDP hooks on the chunks' shared TransformerConfig, per chunk (a bare
    function for one chunk), as Megatron-LM's training loop does: ``no_sync`` for all but the
    last micro-batch; with overlap, each chunk's reduction launched by the schedule once that
    chunk's backward is done (align_grad_reduce) and, in the interleaved schedule, each chunk's
    parameter all-gather launched ahead of its forward (align_param_gather)."""
    def per_chunk(name):
        fns = [getattr(m, name) for m in model]
        return fns[0] if len(fns) == 1 else fns

    config, ddp_config = unwrap(model[0]).config, model[0].ddp_config
    config.no_sync_func = per_chunk("no_sync")
    if ddp_config.overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if ddp_config.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


def finish_param_gather(model: list) -> None:
    """Completes the parameter all-gather that an optimizer step under overlap_param_gather
    leaves to the next forward's pre-hooks, so the chunks hold the updated weights (before a
    save). A no-op without that overlap (the step all-gathers synchronously)."""
    for m in model:
        if m.ddp_config.overlap_param_gather:
            m.start_param_sync(force_sync=True)


def wrap_frozen(chunks: list, precision: Precision) -> list:
    """A frozen model (live reference / scoring): precision cast, eval mode, no grads."""
    from megatron.core.transformer.module import Float16Module

    out = []
    for chunk in chunks:
        module = Float16Module(chunk.config, chunk) if chunk.config.bf16 else chunk
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        out.append(module)
    return out


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
