"""Memory model of the layout planner: predicted peak bytes per GPU of one layout.

Pure arithmetic: no process group, no torch, no Megatron. ``megasimpo.planner`` searches the
layouts; this module says how much memory each one needs, in bytes per GPU on the pipeline stage
with the highest total (first, last, or with an uneven split the first middle one):

* parameters per GPU: the stage's layers (its own count: an uneven split gives the first and last
  stages their own, ``pipeline_split.py``) / TP (norm weights replicated), plus the (padded)
  embedding / TP on the first stage and the output layer / TP on the last (tied embeddings are
  kept on both ends when PP > 1, as Megatron does);
* Megatron's distributed optimizer: bf16 weights 2 B + fp32 main gradients 4 B
  (``grad_reduce_in_fp32``) + fp32 master weights and Adam m, v 12 B / (DP x CP) (the optimizer
  shards over the data-parallel group including CP ranks), i.e. 6 + 12/(DP*CP) B per parameter;
* live DPO reference (``REFERENCE_LOSSES`` with ``ref="live"``): a frozen bf16 copy at the
  same sharding, 2 B per parameter. Its forward-only pass runs before the policy's and frees its
  activations, so it adds no activation memory;
* activations per layer per micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", re-derived for a Llama layer with Transformer Engine flash attention: no
  dropout masks, no s^2 scores, SwiGLU, GQA with g = KV heads / heads), with s = seq/CP tokens and
  b = 2 x micro-batch sequences (chosen and rejected), in bf16:
  ``s*b*((14 + 6g)*h + 6*f)`` bytes = two norm inputs, QKV input, the QKV projection's output
  (Q, K and V: it stays alive under the V view attention saves), the rotary-embedded Q and K
  (new tensors), attention output, fc1 input (each s*b*h, K and V g times that), the SwiGLU
  input [s, b, 2f] and fc2 input [s, b, f]. Sequence parallelism shards all of it over TP;
  without it the norm inputs, QKV input and fc1 input (8*s*b*h) are replicated. ~36*s*b*h for
  Llama-3 (g = 1/8, f = 3.5h); Korthikanti's 34 has no rotary copies. Calibrated against
  ``plan --simulate`` (one real step on fake tensors), which measures the local spec with
  memory-lean norm and SwiGLU kernels (``local_kernels.py``): TE's fused layers save the same;
  Full recompute keeps only each layer's input (2*s*b*h / TP with SP). One extra layer's worth is
  the working set of the layer being (re)computed and back-propagated;
* in-flight micro-batches (Megatron's schedules): without pipelining 1; 1F1B stage r holds
  min(pp - r, num_microbatches); interleaved stage r holds min(2*(pp-r-1) + (vpp-1)*pp + 1,
  num_microbatches*vpp) model chunks of (the stage's layers)/vpp layers. Stage 0 thus holds all layers'
  activations of ~one micro-batch (x (1 + (pp-1)/(pp*vpp)) when interleaved);
* last stage, plain path (``logprob_chunk`` 0): logits [2*mbs, s, v/TP] at 10 B per element (bf16
  output-layer result, the fp32 working copy kept as the softmax for backward, and the fp32
  gradient / bf16 cast in backward); fused path (the default): the same 10 B for one chunk of
  ``logprob_chunk`` tokens only, plus the bf16 [v/TP, h] weight-gradient product buffer and 8 B
  per token x h (the fp32 hidden states Float16Module hands over, their bf16 cast and the bf16
  input gradient); both plus the final-norm and output-layer inputs;
* ``OVERHEAD_GB`` fixed: CUDA context, cuBLAS/TE workspaces, NCCL buffers, allocator slack.

Mixture of experts (``ModelConfig.num_experts``; each layer priced by its own
``shapes.layer_shapes(model, i)``, so ``dense_layers`` keep the dense price). An MoE layer's
attention, norms and router are dense parameters as above (the router [E, h] replicated over TP,
like the norms). Its E experts are sharded by EP x ETP (``expert_tp``: ETP, default TP): E/EP
experts of width F/ETP per GPU. Expert parameters are data-parallel over the expert-DP group of
world / (ETP x EP x PP) ranks, so the distributed optimizer shards their 12 B over that group:
per GPU 6 + 12/(world/(ETP*EP*PP)) B per expert parameter held. Activations of an MoE layer
(``moe_layer_bytes``), with T = tokens / SP-split the rank's tokens and k the top-k: the
attention part and the router's input as in a dense layer (the pre-MLP norm's output, where a
dense layer keeps its fc1 input), no dense SwiGLU/fc2 terms; the router's fp32 logits and
softmax and the top-k probabilities, ``ROUTER_BYTES`` per token x expert; then under **uniform
routing** (each EP rank receives its experts' share, T x k token copies, all-gathered over ETP to
n = T x k x ETP) per token copy the expert fc1 input 2h and fc2 input 2F/ETP (none when LoRA
freezes the experts: a frozen linear saves no input), the SwiGLU terms ``EXPERT_SWIGLU_BYTES`` x
F/ETP (fitted to ``plan --simulate`` of Qwen3-30B-A3B; smaller shapes are over-predicted, a
1024-wide toy by about 20%), the permuted probability and index (``COPY_BYTES``). The layer
being (re)computed also holds the dispatcher's token buffers, ``DISPATCH_BUFFERS`` x n x 2h
(permuted, exchanged, sorted tokens and the expert outputs on their way back). Dropless routing is
never uniform, and the busiest rank's buffers set the peak: every token-copy-proportional byte
above is multiplied by
``MOE_IMBALANCE`` and the excess over uniform is reported on its own line (``imbalance``), so
``plan --simulate`` (which routes uniformly) compares with the rest.

LoRA (``lora``, ``megasimpo/lora.py``): every base parameter is frozen, so it is bf16 weights only
(2 B, no gradient buffer, no main copy, no Adam moments) and the adapters are the trainable
parameters at 2 + 4 + 12/(DP*CP) B, sharded as lora.py shards them: column targets (QKV, fc1)
A [r, in] whole and B [out/TP, r]; row targets (proj, fc2) A [r, in/TP] and B [out, r] whole. A
live reference is the base with its adapters off: no copy. Activations: a frozen linear (Megatron's
and TE's alike) saves no input, so a projection's input is kept only when an adapter uses it (QKV
and fc1 inputs, fc2 input; the attention output is kept by attention anyway), plus per adapter its
[s, b, r] product in bf16 (whole sequence for column targets: it is all-gathered before B); TE's
fused norm + linear hands the adapter the norm's input, so the adapter re-normalises it and keeps
the fp32 copy and the bf16 result (6 B per element of [s, b, h]); adapter dropout keeps its output
and its mask (3 B per input element) instead of the input. The frozen output layer needs no
weight-gradient product buffer (fused path) and keeps no input (plain path).

GB are 1e9 bytes, like ``mem_peak_gb`` in the metrics.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from megasimpo import lora_targets
from megasimpo.config import LOGPROB_CHUNK, REFERENCE_LOSSES, LoraConfig, ModelConfig
from megasimpo.pipeline_split import stage_layer_counts
from megasimpo.shapes import layer_shapes, padded_vocab_size

GB = 1e9
OVERHEAD_GB = 4.0  # CUDA context + workspaces + NCCL buffers + fragmentation
LOGIT_BYTES = 10  # per element of [2*mbs, s, v/tp], see the module docstring
MOE_IMBALANCE = 1.25  # the busiest EP rank receives this times its uniform share of token copies
ROUTER_BYTES = 10  # per token x expert: fp32 logits and softmax output, the top-k probabilities
COPY_BYTES = 12  # per routed token copy: its fp32 probability and int64 permutation index
# Per routed token copy and expert channel, besides the GEMM inputs: the SwiGLU input (4) and 5
# for its output and the product with the fp32 routing probability. Fitted to `plan --simulate`
# of Qwen3-30B-A3B (full fine-tuning and LoRA agree to 0.1% in activations; a first-principles 8
# under-counted them by 14%).
EXPERT_SWIGLU_BYTES = 9
DISPATCH_BUFFERS = 3  # [n, h] token buffers of the MoE layer being (re)computed, beyond saved ones
# lora.py's column-parallel targets (output split over TP: A whole, B split); the rest are row
# targets (input split over TP: A split, B whole). lora.py imports torch, this module must not.
LORA_COLUMN_TARGETS = lora_targets.COLUMN


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak memory of one GPU in GB (1e9 bytes), on pipeline stage ``stage``."""

    weights: float  # bf16 policy weights (with LoRA: the frozen base and the adapters)
    grads: float  # fp32 main gradients (of the trainable parameters)
    optimizer: float  # fp32 master weights + Adam m, v of the trainable ones, / DP x CP
    reference: float  # frozen bf16 reference model (live DPO-style reference), else 0
    activations: float  # saved activations of the in-flight micro-batches + one layer's working set
    logits: float  # output-layer / log-prob buffers (last stage only)
    overhead: float  # fixed: CUDA context, workspaces, NCCL buffers, fragmentation
    stage: int = 0  # pipeline rank these numbers are for (the one with the highest total)
    imbalance: float = 0.0  # MoE: routed-token activations above uniform routing (MOE_IMBALANCE)

    @property
    def total(self) -> float:
        """Sum of the parts, GB."""
        return (self.weights + self.grads + self.optimizer + self.reference + self.activations
                + self.logits + self.overhead + self.imbalance)

    def to_dict(self) -> dict:
        """GB per part plus ``total`` (rounded to 0.01 GB), without the stage (nor, for a dense
        model, the MoE imbalance headroom)."""
        d = {k: round(v, 2) for k, v in asdict(self).items()
             if k != "stage" and (k != "imbalance" or v)}
        d["total"] = round(self.total, 2)
        return d


def layer_parameters(model: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of one transformer layer."""
    layer = layer_shapes(model)
    return layer.sharded_parameters, layer.replicated_parameters


def lora_on(lora: Optional[LoraConfig]) -> bool:
    """Whether ``lora`` (a LoraConfig or None) trains adapters instead of the whole model."""
    return lora is not None and lora.enabled


def lora_layer_parameters(model: ModelConfig, lora: Optional[LoraConfig], tp: int = 1) -> float:
    """Adapter parameters of one layer on one GPU of a TP group (see the module docstring); at
    TP 1 the sum over targets of r x (in + out), ``LayerShapes.lora_parameters``."""
    if not lora_on(lora):
        return 0.0
    shapes, r = layer_shapes(model), lora.rank
    return sum(r * (n_in + n_out / tp) if t in LORA_COLUMN_TARGETS else r * (n_in / tp + n_out)
               for t in lora_targets_of(shapes, lora.targets)
               for n_in, n_out in [lora_targets.gemm(shapes, t)])


def lora_targets_of(shapes, targets) -> tuple:
    """The ``targets`` a layer has: an MoE layer has no dense fc1/fc2 (adapters on its experts
    are not priced here)."""
    def has(t):
        try:
            lora_targets.gemm(shapes, t)
        except KeyError:
            return False
        return True
    return tuple(t for t in targets if has(t))


def model_parameters(model: ModelConfig, lora: Optional[LoraConfig] = None) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: with LoRA the adapters, of the base plus
    the adapters; without it all of them, twice."""
    if not lora_on(lora):
        return model.num_parameters, model.num_parameters
    adapters = model.num_layers * layer_shapes(model).lora_parameters(
        lora.rank, lora_targets_of(layer_shapes(model), lora.targets))
    return adapters, model.num_parameters + adapters


def layer_kinds(model: ModelConfig) -> tuple:
    """(dense layer, MoE layer) LayerShapes of ``model``, None for a kind it has none of."""
    moe = [i for i in range(model.num_layers) if i not in model.dense_layers] if model.is_moe else []
    dense = [i for i in range(model.num_layers) if not model.is_moe or i in model.dense_layers]
    return (layer_shapes(model, dense[0]) if dense else None,
            layer_shapes(model, moe[0]) if moe else None)


def stage_moe_layers(model: ModelConfig, counts: tuple, stage: int,
                     vpp: Optional[int] = None) -> int:
    """MoE layers among pipeline stage ``stage``'s (``counts``: layers per stage). Model chunk c
    of stage r holds the (c x pp + r)-th run of count/vpp layers (Megatron's interleaving; an
    uneven split with vpp is counted as its contiguous runs)."""
    if not model.is_moe:
        return 0
    v, pp = vpp or 1, len(counts)
    if v > 1 and len(set(counts)) == 1:
        per = counts[0] // v
        own = [(c * pp + stage) * per + j for c in range(v) for j in range(per)]
    else:
        start = sum(counts[:stage])
        own = range(start, start + counts[stage])
    return sum(1 for i in own if i not in model.dense_layers)


def stage_parameter_parts(model: ModelConfig, tp: int, pp: int, stage: int,
                          layers: Optional[int] = None, *, moe_layers: int = 0, ep: int = 1,
                          etp: Optional[int] = None) -> tuple:
    """(dense, expert) parameters held by one GPU of pipeline stage ``stage`` holding ``layers``
    transformer layers (None: an even split, num_layers / pp), ``moe_layers`` of them MoE
    layers, experts split over ``ep`` x ``etp`` (None: tp)."""
    dense_shapes, moe_shapes = layer_kinds(model)
    layers = model.num_layers // pp if layers is None else layers
    params, experts = 0.0, 0.0
    if layers - moe_layers:
        params += (layers - moe_layers) * (dense_shapes.sharded_parameters / tp
                                           + dense_shapes.replicated_parameters)
    if moe_layers:
        params += moe_layers * (moe_shapes.sharded_parameters / tp
                                + moe_shapes.replicated_parameters)
        experts = moe_layers * moe_shapes.expert_parameters / (ep * (etp or tp))
    embedding = padded_vocab_size(model.vocab_size) * model.hidden_size / tp
    if stage == 0:
        params += embedding
    if stage == pp - 1:
        params += model.hidden_size  # final norm
        if pp > 1 or not model.tie_word_embeddings:
            params += embedding  # output layer (a tied copy on the last stage when pp > 1)
    return params, experts


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int,
                     layers: Optional[int] = None, **experts) -> float:
    """Parameters held by one GPU of pipeline stage ``stage`` holding ``layers`` transformer
    layers (None: an even split, num_layers / pp); ``experts``: moe_layers, ep, etp of
    :func:`stage_parameter_parts`."""
    return sum(stage_parameter_parts(model, tp, pp, stage, layers, **experts))


def layer_activation_bytes(model: ModelConfig, *, tokens: int, tp: int, sequence_parallel: bool,
                           recompute: bool, seq: int = 0, attention_backend: str = "te",
                           lora: Optional[LoraConfig] = None, cp: int = 1, moe: bool = False,
                           etp: int = 1, imbalance: float = 1.0, working: bool = False) -> float:
    """Saved activations of one layer for ``tokens`` = ``seq`` (s/cp) x sequences, bytes on one
    GPU. ``attention_backend`` "unfused" adds Megatron's saved score matrices (see
    :func:`attention_score_bytes`), "sdpa" with ``cp`` > 1 the all-gathered K and V (see
    :func:`cp_gather_bytes`), ``lora`` the adapters' (see :func:`lora_saved_per_token`); ``moe``
    prices an MoE layer's router and experts instead of the dense MLP (:func:`moe_layer_bytes`,
    experts split over ``etp``, routed token copies times ``imbalance``, and when ``working``
    the dispatcher's buffers of the layer being computed)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    split = tp if sequence_parallel else 1
    if recompute:
        return 2 * tokens * h / split  # the layer input only
    g = model.num_query_groups / model.num_attention_heads
    # QKV output (Q, K, V), rotary Q and K, attention output, SwiGLU input
    sharded = (6 + 6 * g) * h + (0 if moe else 4 * f)
    if lora_on(lora):
        replicated, adapted, whole = lora_saved_per_token(model, lora, attention_backend, split)
        sharded += adapted
    else:
        # norm inputs (2), QKV input, fc1 (MoE: router) input: split by SP only
        replicated, whole = 8 * h, 0.0
        sharded += 0 if moe else 2 * f  # fc2 input (the SwiGLU output)
    if moe:
        whole += moe_layer_bytes(model, tokens / split, etp, imbalance, working,
                                 frozen=lora_on(lora)) / tokens
    # bf16: the factor 2 is in the counts
    saved = tokens * (replicated / split + sharded / tp + whole)
    if attention_backend == "unfused":
        saved += attention_score_bytes(model, tokens=tokens, seq=seq, tp=tp)
    if attention_backend == "sdpa" and cp > 1:
        saved += cp_gather_bytes(model, tokens=tokens, seq=seq, tp=tp, cp=cp)
    return saved


def moe_layer_bytes(model: ModelConfig, tokens: float, etp: int, imbalance: float = 1.0,
                    working: bool = False, frozen: bool = False) -> float:
    """What an MoE layer's router and experts save for ``tokens`` tokens of this rank (after the
    SP split), bytes: ``ROUTER_BYTES`` per token x expert, and per routed token copy (n = tokens x
    k x ``etp`` x ``imbalance``) the experts' SwiGLU terms (``EXPERT_SWIGLU_BYTES`` x F/ETP),
    their GEMM inputs 2h + 2F/ETP unless the experts are ``frozen`` (LoRA: a frozen linear saves
    no input) and ``COPY_BYTES``; when ``working``, the dispatcher's ``DISPATCH_BUFFERS`` [n, h]
    buffers too (module docstring)."""
    shapes = layer_kinds(model)[1]
    h, F = shapes.hidden, shapes.expert_ffn / etp
    copies = tokens * shapes.topk * etp * imbalance
    per_copy = (EXPERT_SWIGLU_BYTES * F + (0 if frozen else 2 * h + 2 * F) + COPY_BYTES
                + (DISPATCH_BUFFERS * 2 * h if working else 0))
    return ROUTER_BYTES * tokens * shapes.experts + copies * per_copy


def cp_gather_bytes(model: ModelConfig, *, tokens: int, seq: int, tp: int, cp: int) -> float:
    """What SDPA's context parallelism (``parallel/cp_attention.py``) saves beyond this rank's
    own K and V, per layer: K and V of the other cp-1 ranks (all-gathered, bf16, KV heads / tp).
    (Its [s/cp, s] mask is one per micro-batch, shared by the layers: ``stage_memory``.)"""
    kv = model.num_query_groups / tp * model.head_dim
    return 2 * 2 * (cp - 1) * tokens * kv


def lora_saved_per_token(model: ModelConfig, lora: LoraConfig, attention_backend: str,
                         split: int) -> tuple:
    """Bytes per token a layer with frozen projections and ``lora``'s adapters saves, beyond what
    attention and SwiGLU keep: (split by SP only, split by TP, the rest). Frozen projections save
    no inputs; each adapter keeps the input its A needs (2 B, shared with the norm output of the
    local spec; TE's fused norm + linear: the adapter's own fp32 re-normalisation and its bf16
    result, 6 B; dropout: its output and mask, 3 B, instead) and the bf16 [s, b, r] product its B
    needs, gathered over the whole sequence for column targets (the third part, already divided
    by SP where SP splits it)."""
    shapes, r = layer_shapes(model), lora.rank
    keep = 3 if lora.dropout else 2
    replicated, sharded, whole = 4.0 * model.hidden_size, 0.0, 0.0  # the two norm inputs
    for t in lora_targets_of(shapes, lora.targets):
        n_in = lora_targets.gemm(shapes, t)[0]
        if t in LORA_COLUMN_TARGETS:
            # per-projection members of one projection share its input (and its TE
            # re-normalisation); only dropout gives each its own copy
            first = lora_targets.members(lora_targets.PROJECTION[t], lora.targets)[0] == t
            replicated += ((4 if attention_backend == "te" and first else 0)
                           + (keep if first or lora.dropout else 0)) * n_in
            whole += 2 * r
        else:  # proj's input (the attention output) is saved by attention anyway
            sharded += (keep if t == "linear_fc2" or lora.dropout else 0) * n_in
            whole += 2 * r / split
    return replicated, sharded, whole


def attention_score_bytes(model: ModelConfig, *, tokens: int, seq: int, tp: int) -> float:
    """What Megatron's unfused DotProductAttention saves beyond a flash kernel, per layer: the
    softmax probabilities [rows x heads/tp, s, s] in fp32 (softmax backward) and in bf16 (the
    probs x V matmul), 6 B per score, plus K and V repeated from KV heads to all heads
    (GQA), bf16."""
    heads = model.num_attention_heads / tp
    g = model.num_query_groups / model.num_attention_heads
    repeated_kv = 2 * 2 * (1 - g) * heads * model.head_dim * tokens
    return 6 * tokens * seq * heads + repeated_kv


def in_flight_chunks(pp: int, vpp: Optional[int], stage: int, num_microbatches: int) -> int:
    """Model-chunk forward passes whose activations stage ``stage`` holds at its peak."""
    if pp == 1:
        return 1
    if not vpp or vpp == 1:
        return min(pp - stage, num_microbatches)
    warmup = 2 * (pp - stage - 1) + (vpp - 1) * pp
    return min(warmup + 1, num_microbatches * vpp)


def stage_memory(model: ModelConfig, *, tp: int, pp: int, vpp: Optional[int], cp: int, dp: int,
                 sequence_parallel: bool, seq_length: int, micro_batch_size: int,
                 num_microbatches: int, loss: str, recompute: bool, stage: int,
                 ref: str = "live", logprob_chunk: int = LOGPROB_CHUNK,
                 attention_backend: str = "te",
                 lora: Optional[LoraConfig] = None,
                 layers: Optional[int] = None, moe_layers: Optional[int] = None, ep: int = 1,
                 etp: Optional[int] = None) -> MemoryBreakdown:
    """Predicted memory of one GPU on pipeline stage ``stage``, which holds ``layers``
    transformer layers (None: num_layers / pp), ``moe_layers`` of them MoE layers (None: those
    of an even split's stage) with experts over ``ep`` x ``etp`` (None: tp), see the module
    docstring."""
    layers = model.num_layers // pp if layers is None else layers
    if moe_layers is None:
        moe_layers = stage_moe_layers(model, (layers,) * pp, stage, vpp) if model.is_moe else 0
    etp = etp or tp
    params, experts = stage_parameter_parts(model, tp, pp, stage, layers, moe_layers=moe_layers,
                                            ep=ep, etp=etp)
    adapters = layers * lora_layer_parameters(model, lora, tp)
    trainable = adapters if lora_on(lora) else params + experts
    expert_dp = tp * cp * dp // (ep * etp)  # world / (etp x ep x pp)
    optimizer = (12 * adapters / (dp * cp) if lora_on(lora)
                 else 12 * params / (dp * cp) + 12 * experts / max(expert_dp, 1))
    tokens = seq_length // cp * 2 * micro_batch_size
    per_layer = dict(tokens=tokens, tp=tp, sequence_parallel=sequence_parallel,
                     seq=seq_length // cp, attention_backend=attention_backend, lora=lora, cp=cp)
    layers_per_chunk = layers / (vpp or 1)
    chunks = in_flight_chunks(pp, vpp, stage, num_microbatches)

    def saved(imbalance):
        stored = layer_activation_bytes(model, recompute=recompute, **per_layer)
        working = layer_activation_bytes(model, recompute=False, **per_layer)
        if moe_layers:
            moe = dict(moe=True, etp=etp, imbalance=imbalance)
            mixed = layer_activation_bytes(model, recompute=recompute, **per_layer, **moe)
            stored += moe_layers / layers * (mixed - stored)
            working = max(working if moe_layers < layers else 0.0, layer_activation_bytes(
                model, recompute=False, working=True, **per_layer, **moe))
        return chunks * layers_per_chunk * stored + working

    activations = saved(1.0)
    imbalance = saved(MOE_IMBALANCE) - activations if moe_layers else 0.0
    if attention_backend == "sdpa" and cp > 1:  # model.context_parallel_mask: bf16 [s/cp, s]
        activations += chunks * 2 * seq_length // cp * seq_length
    logits = 0.0
    if stage == pp - 1:
        vocab = padded_vocab_size(model.vocab_size) / tp
        split = tp if sequence_parallel else 1
        h = model.hidden_size
        frozen = lora_on(lora)  # a frozen output layer: no wgrad buffer (fused), no input saved
        inputs = (1 if frozen and not logprob_chunk else 2) * (2 * tokens * h / split)
        if logprob_chunk:  # fused: one chunk's logits; hidden handed over in fp32, cast, dgrad
            chunk = min(logprob_chunk, tokens)
            logits = (chunk * vocab * LOGIT_BYTES + (0 if frozen else 2 * vocab * h)
                      + (4 + 2 + 2) * tokens * h)
        else:
            logits = tokens * vocab * LOGIT_BYTES
        logits += inputs
    # a live reference with LoRA is the same weights with the adapters off: no copy
    live_copy = loss in REFERENCE_LOSSES and ref == "live" and not lora_on(lora)
    reference = 2 * (params + experts) if live_copy else 0.0
    return MemoryBreakdown(weights=2 * (params + experts + adapters) / GB,
                           grads=4 * trainable / GB, optimizer=optimizer / GB,
                           reference=reference / GB, activations=activations / GB,
                           logits=logits / GB, overhead=OVERHEAD_GB, stage=stage,
                           imbalance=imbalance / GB)


def stage_breakdowns(model: ModelConfig, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                     cp: int = 1, dp: int = 1, sequence_parallel: Optional[bool] = None,
                     seq_length: int = 4096, micro_batch_size: int = 1,
                     num_microbatches: Optional[int] = None, loss: str = "simpo",
                     recompute: bool = False, ref: str = "live",
                     logprob_chunk: int = LOGPROB_CHUNK, attention_backend: str = "te",
                     lora: Optional[LoraConfig] = None, first_stage_layers: Optional[int] = None,
                     last_stage_layers: Optional[int] = None, ep: int = 1,
                     etp: Optional[int] = None) -> tuple:
    """Memory of the first and (when pp > 1) the last pipeline stage, each priced with its own
    layer count (``pipeline_split.stage_layer_counts``); of an uneven split also the first
    middle stage (stage 1: the most in-flight micro-batches of the middle ones, which hold the
    same layers). Even splits need no middle stage: it holds less than stage 0.

    ``sequence_parallel`` None means on when tp > 1; ``num_microbatches`` None means plenty
    (at least pp x vpp, the pipeline is full); ``lora`` a LoraConfig (None or rank 0: full
    fine-tuning); ``first/last_stage_layers`` an uneven split (None: even); ``ep`` and ``etp``
    (None: tp) the expert layout of an MoE model.
    """
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    nm = num_microbatches or pp * (vpp or 1)
    counts = stage_layer_counts(model.num_layers, pp, vpp, first_stage_layers, last_stage_layers)
    uneven = first_stage_layers is not None
    return tuple(stage_memory(model, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sequence_parallel=sp,
                              seq_length=seq_length, micro_batch_size=micro_batch_size,
                              num_microbatches=nm, loss=loss, recompute=recompute, stage=s, ref=ref,
                              logprob_chunk=logprob_chunk, attention_backend=attention_backend,
                              lora=lora, layers=counts[s], ep=ep, etp=etp,
                              moe_layers=stage_moe_layers(model, counts, s, vpp))
                 for s in sorted({0, pp - 1} | ({1} if uneven and pp > 2 else set())))


def memory_breakdown(model: ModelConfig, **layout) -> MemoryBreakdown:
    """Peak per-GPU memory of a layout: the first or last pipeline stage, whichever is higher.
    Takes the keyword arguments of :func:`stage_breakdowns`."""
    return max(stage_breakdowns(model, **layout), key=lambda m: m.total)
