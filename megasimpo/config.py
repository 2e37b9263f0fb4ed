"""Typed, frozen run configuration, grouped by concern.

Every field is documented where it is declared; values are validated in ``__post_init__`` so a bad
value fails at start-up with the value in the message. Values derived from the checkpoint or the world
(layout, batch split) come from the planner and ``ModelConfig.from_hf``, not from the user.
"""

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from megasimpo import lora_targets
from megasimpo.pipeline_split import default_split, stage_layer_counts
# The architecture's config lives in model_config.py; imported here too, where callers look for it.
from megasimpo.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling  # noqa: F401

LOSSES = ("simpo", "dpo", "ipo", "cpo", "orpo", "rdpo", "sft", "dpo_norm", "alphapo")
REFERENCE_LOSSES = ("dpo", "ipo", "rdpo", "dpo_norm")  # losses that need reference-model log-probs
# Losses with a Bradley-Terry term: hinge can replace its sigmoid, label smoothing reaches that
# sigmoid. Elsewhere (ipo, orpo, sft) either option would be silently ignored, so it is refused.
HINGE_LOSSES = ("simpo", "dpo", "cpo", "rdpo")
# Label smoothing also reaches AlphaPO's sigmoid (TRL's CPO "simpo" form), which has no hinge in
# TRL; dpo_norm is TRL's "sigmoid_norm", whose plain -logsigmoid takes neither option.
LABEL_SMOOTHING_LOSSES = HINGE_LOSSES + ("alphapo",)
# dpo_norm: TRL's DPOConfig default (its log-ratios are per token, so useful values are larger);
# alphapo: SimPO's, whose loss it reshapes (TRL's CPOConfig default 0.1 is CPO's).
DEFAULT_BETA = {"simpo": 2.0, "dpo": 0.1, "ipo": 0.1, "cpo": 0.1, "orpo": 0.1, "rdpo": 0.1,
                "sft": 1.0, "dpo_norm": 0.1, "alphapo": 2.0}
# Tokens per chunk of the fused output layer + log-probs: [1024, v/tp] fp32 logits at a time
# (0.5 GB at Llama-3's vocabulary and TP=1), small next to the full [2b x s, v/tp] they replace.
LOGPROB_CHUNK = 1024
# Core attention implementations (megasimpo/layer_spec.py); "auto" resolves to te or sdpa.
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "unfused")
# Megatron-Core's token dispatchers for MoE layers (how tokens reach their experts' ranks).
MOE_DISPATCHERS = ("alltoall", "allgather")
CP_BACKENDS = ("auto", "te", "sdpa")  # those with context parallelism (auto: te or sdpa)
LOSS_TYPES = ("sigmoid", "hinge")
REFERENCE_SOURCES = ("live", "precomputed")
PRECISIONS = ("bf16", "fp8", "fp32")
# Projections LoRA can adapt (Megatron names): attention QKV and output, MLP fc1 (gate+up) and fc2;
# the per-projection (PEFT) names and their mapping: megasimpo/lora_targets.py.
LORA_TARGETS = lora_targets.FUSED


def option(default=dataclasses.MISSING, doc: str = "", *, choices: tuple = (),
           factory=dataclasses.MISSING, ge=None, gt=None, le=None, lt=None):
    """A run-configuration field with its documentation (the flag's help: megasimpo/train_flags.py
    builds the train flags from these), for a string its allowed values, and for a number its
    range: ``ge``/``le`` inclusive and ``gt``/``lt`` exclusive bounds (checked by
    ``check_options``, for flags, ``--config`` files and direct construction alike)."""
    return field(default=default, default_factory=factory,
                 metadata={"doc": doc, "choices": choices, "range": (ge, gt, le, lt)})


# Fields whose flag is not their name: LossConfig's name is --loss, LoraConfig's are --lora-*.
RENAMED_FLAGS = {("LossConfig", "name"): "loss"}
FLAG_PREFIXES = {"LoraConfig": "lora_"}


def flag_name(cls, name: str) -> str:
    """The flag of field ``name`` of dataclass ``cls`` (``--lora-rank`` for LoraConfig.rank)."""
    cls_name = cls.__name__ if isinstance(cls, type) else type(cls).__name__
    name = RENAMED_FLAGS.get((cls_name, name), FLAG_PREFIXES.get(cls_name, "") + name)
    return "--" + name.replace("_", "-")


def range_text(f: dataclasses.Field) -> str:
    """The allowed range of a numeric field as a user reads it (">= 1", "in [0, 1)"), or ""."""
    ge, gt, le, lt = f.metadata.get("range", (None,) * 4)
    low = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else None
    high = f"{le:g}]" if le is not None else f"{lt:g})" if lt is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if ge is not None else "> ") + low[1:]
    if high:
        return ("<= " if le is not None else "< ") + high[:-1]
    return ""


def range_problem(f: dataclasses.Field, value) -> str:
    """Why ``value`` is outside field ``f``'s declared range ("must be >= 0"), or "" when it is
    inside (or not a number). Non-finite floats are refused for every float field."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    ge, gt, le, lt = f.metadata.get("range", (None,) * 4)
    if ((ge is not None and value < ge) or (gt is not None and value <= gt)
            or (le is not None and value > le) or (lt is not None and value >= lt)):
        return f"must be {range_text(f)}"
    return ""


def _range_error(cls, f: dataclasses.Field, value, problem: str) -> ValueError:
    doc = f.metadata.get("doc")
    return ValueError(f"{flag_name(cls, f.name)} {value!r} {problem}" + (f" ({doc})" if doc else ""))


def check_value(cls, name: str, value) -> None:
    """ValueError naming the flag, the value and the range when ``value`` is outside the range
    field ``name`` of ``cls`` declares (for values checked before the dataclass is built)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    problem = range_problem(f, value)
    if problem:
        raise _range_error(cls, f, value, problem)


def check_options(cfg) -> None:
    """ValueError naming the flag when a field declared with ``choices`` holds another value, or
    a numeric field is outside its declared range."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{flag_name(cfg, f.name)} {value!r} is not one of "
                             + ", ".join(choices))
        problem = range_problem(f, value)
        if problem:
            raise _range_error(type(cfg), f, value, problem)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference loss, and its hyper-parameters (paper defaults)."""

    name: str = option("simpo", "the preference loss (flag --loss)", choices=LOSSES)
    beta: Optional[float] = option(None, "reward scale, IPO's tau, ORPO's lambda; default per "
                                         "loss: " + ", ".join(f"{k} {v:g}" for k, v in
                                                              DEFAULT_BETA.items()), gt=0)
    gamma_beta_ratio: float = option(0.5, "SimPO / AlphaPO target margin over beta (gamma = beta "
                                          "x ratio)", ge=0)
    label_smoothing: float = option(0.0, "conservative-DPO / SimPO label smoothing in [0, 0.5) "
                                         "(simpo, dpo, cpo, rdpo, alphapo)", ge=0, lt=0.5)
    loss_type: str = option("sigmoid", "Bradley-Terry term of simpo, dpo, cpo, rdpo",
                            choices=LOSS_TYPES)
    sft_weight: float = option(0.0, "SimPO: weight of the chosen-response NLL added to the loss",
                               ge=0)
    cpo_alpha: float = option(1.0, "CPO: weight of the chosen-response NLL", ge=0)
    rdpo_alpha: float = option(0.0, "R-DPO: length-regularisation strength alpha (per token; "
                                    "negative favours longer responses)")
    alphapo_alpha: float = option(0.0, "AlphaPO: reward shape alpha, r = (1 - p^-alpha) / alpha "
                                       "of the per-token average p (TRL's CPOConfig.alpha; 0: "
                                       "log p, SimPO)")

    def __post_init__(self):
        check_options(self)
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.name])
        # A setting the chosen loss would silently ignore is a user error, not a no-op.
        if self.loss_type == "hinge" and self.name not in HINGE_LOSSES:
            raise ValueError(f"--loss-type hinge is not defined for --loss {self.name} (only "
                             + ", ".join(HINGE_LOSSES) + ")")
        if self.label_smoothing > 0 and (self.name not in LABEL_SMOOTHING_LOSSES
                                         or self.loss_type == "hinge"):
            raise ValueError(
                f"--label-smoothing {self.label_smoothing} has no effect for --loss {self.name} "
                f"with --loss-type {self.loss_type} (only the sigmoid form of "
                + ", ".join(LABEL_SMOOTHING_LOSSES) + ")")
        if self.sft_weight > 0 and self.name != "simpo":
            raise ValueError(f"--sft-weight {self.sft_weight} applies to simpo only, not {self.name}")
        if self.alphapo_alpha != 0 and self.name != "alphapo":
            raise ValueError(f"--alphapo-alpha {self.alphapo_alpha} has no effect for --loss "
                             f"{self.name} (alphapo only)")

    @property
    def gamma(self) -> float:
        """SimPO's absolute target reward margin."""
        return self.beta * self.gamma_beta_ratio

    @property
    def needs_reference(self) -> bool:
        """Whether this loss compares against a reference model."""
        return self.name in REFERENCE_LOSSES

    def check_reference(self, ref: str, ref_logps: tuple) -> None:
        """ValueError when reference options are given to a loss without a reference (they
        would be silently ignored)."""
        if self.needs_reference:
            return
        if ref == "precomputed":
            raise ValueError(f"--ref precomputed has no effect for --loss {self.name}: only "
                             + ", ".join(REFERENCE_LOSSES) + " use a reference model; drop --ref")
        if ref_logps:
            raise ValueError(f"--ref-logps has no effect for --loss {self.name}: only "
                             + ", ".join(REFERENCE_LOSSES) + " use reference log-probs; drop it")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters on the attention and MLP projections (megasimpo/lora.py); rank 0: off."""

    rank: int = option(0, "LoRA rank r of every adapter; 0: off (full fine-tuning)", ge=0)
    alpha: Optional[float] = option(None, "LoRA scale numerator: the delta is alpha / r x B A "
                                          "(default 2r)", ge=0)
    dropout: float = option(0.0, "dropout on each adapter's input", ge=0, lt=1)
    targets: tuple = option(LORA_TARGETS, "projections that get adapters: Megatron's fused ones, "
                            "or per projection as PEFT names them (q_proj k_proj v_proj o_proj "
                            "gate_proj up_proj down_proj, or all-linear)")
    rslora: bool = option(False, "rsLoRA: scale B A by alpha / sqrt(r) instead of alpha / r")

    def __post_init__(self):
        check_options(self)
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        if self.rank and self.alpha == 0:  # 0 is the recorded default only when LoRA is off
            raise ValueError(f"--lora-alpha {self.alpha} must be > 0 with --lora-rank {self.rank}")
        object.__setattr__(self, "targets", lora_targets.normalize(self.targets))

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (rank > 0) instead of the whole model."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / r, the factor of B A (rsLoRA: alpha / sqrt(r))."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one model replica is split over ranks, and how many replicas there are."""

    tp: int = option(1, "tensor-parallel size (splits heads, FFN and vocabulary)", ge=1)
    pp: int = option(1, "pipeline-parallel stages", ge=1)
    vpp: Optional[int] = option(None, "virtual stages (model chunks) per pipeline rank, "
                                      "interleaved schedule", ge=1)
    cp: int = option(1, "context-parallel size (splits the sequence; te or sdpa attention)",
                     ge=1)
    dp: int = option(1, "data-parallel replicas = world / (tp * pp * cp)", ge=1)
    sequence_parallel: bool = option(False, "shard norms/dropout activations over TP (only with "
                                            "tp > 1)")
    first_stage_layers: Optional[int] = option(None, "transformer layers on the first pipeline "
                                                     "stage (uneven split; None: even)", ge=1)
    last_stage_layers: Optional[int] = option(None, "transformer layers on the last pipeline "
                                                    "stage (uneven split; None: even)", ge=1)
    ep: int = option(1, "expert-parallel size (splits an MoE layer's experts over ranks)", ge=1)
    etp: Optional[int] = option(None, "expert tensor-parallel size (splits each expert; None: "
                                      "tp, as in Megatron-Core)", ge=1)
    moe_dispatcher: str = option("alltoall", "how an MoE layer's tokens reach their experts' "
                                             "ranks (Megatron-Core's token dispatcher)",
                                 choices=MOE_DISPATCHERS)

    def __post_init__(self):
        check_options(self)

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size as built (``etp``, else ``tp``)."""
        return self.etp or self.tp

    def stage_layers(self, num_layers: int) -> tuple:
        """Transformer layers of each pipeline stage (``stage_layer_counts``)."""
        return stage_layer_counts(num_layers, self.pp, self.vpp, self.first_stage_layers,
                                  self.last_stage_layers)

    @property
    def world_size(self) -> int:
        """Ranks the layout occupies."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def num_chunks(self) -> int:
        """Model chunks each rank holds (vpp, or 1 without interleaving)."""
        return self.vpp or 1

    @classmethod
    def resolve(cls, model: ModelConfig, world_size: int, *, tp: int = 1, pp: int = 1,
                vpp: Optional[int] = None, cp: int = 1,
                sequence_parallel: Optional[bool] = None,
                first_stage_layers: Optional[int] = None,
                last_stage_layers: Optional[int] = None, ep: int = 1,
                etp: Optional[int] = None, moe_dispatcher: str = "alltoall") -> "Layout":
        """Checks a requested split against the model and the world; DP takes the remaining ranks.

        Raises ValueError naming the offending values, so a bad layout fails before any process
        group or weight is created. Sequence parallelism is on by default whenever tp > 1 (every
        layer spec supports it, ``layer_spec.TorchRMSNorm`` included). Layers that do not divide
        by pp x vpp get ``default_split`` unless ``first_stage_layers``/``last_stage_layers``
        say (at PP=2 one of them is enough).
        """
        for name, v in (("tp", tp), ("pp", pp), ("cp", cp)):
            check_value(cls, name, v)
        model_ranks = tp * pp * cp
        if world_size % model_ranks:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_ranks}"
            )
        if model.num_attention_heads % tp:
            raise ValueError(
                f"--tp {tp} does not divide the model's {model.num_attention_heads} attention heads"
            )
        if model.num_query_groups % tp:
            raise ValueError(
                f"--tp {tp} does not divide the model's {model.num_query_groups} KV heads"
                " (num_key_value_heads)"
            )
        if vpp is not None and vpp > 1 and pp == 1:
            raise ValueError(f"--vpp {vpp} needs --pp > 1 (interleaving splits pipeline stages)")
        vpp = vpp if vpp and vpp > 1 else None
        first, last = first_stage_layers, last_stage_layers
        if pp == 2 and (first is None) != (last is None):  # the other stage takes the rest
            first, last = first or model.num_layers - last, last or model.num_layers - first
        if first is None and last is None and model.num_layers % (pp * (vpp or 1)):
            first, last = default_split(model.num_layers, pp, vpp)
        stage_layer_counts(model.num_layers, pp, vpp, first, last)  # words the errors
        if sequence_parallel is None:
            sequence_parallel = tp > 1
        if sequence_parallel and tp == 1:
            raise ValueError("sequence parallelism needs --tp > 1")
        check_experts(model, world_size, pp, ep, etp, tp, sequence_parallel)
        return cls(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=world_size // model_ranks,
                   sequence_parallel=sequence_parallel, first_stage_layers=first,
                   last_stage_layers=last, ep=ep, etp=etp, moe_dispatcher=moe_dispatcher)



def check_experts(model: ModelConfig, world_size: int, pp: int, ep: int, etp: Optional[int],
                  tp: int, sequence_parallel: bool = True) -> None:
    """ValueError naming the flag when expert parallelism does not fit the model or the world:
    EP splits whole experts, and the expert layout (etp x ep x pp x expert-DP) must tile the same
    ranks as the dense one. ``etp`` None is ``tp``."""
    if not model.num_experts:
        if ep == 1 and etp in (None, 1):
            return
        raise ValueError(f"--ep {ep} / --etp {etp}: the model has no experts ({model.architecture} "
                         "is dense); use --ep 1")
    etp = etp or tp
    if tp > 1 and not sequence_parallel:
        raise ValueError(f"--tp {tp} with --no-sequence-parallel: Megatron-Core's MoE layer needs "
                         "sequence parallelism under tensor parallelism; drop "
                         "--no-sequence-parallel")
    if model.num_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the model's {model.num_experts} experts")
    if model.moe_ffn_hidden_size % etp:
        raise ValueError(f"--etp {etp} does not divide the experts' width "
                         f"{model.moe_ffn_hidden_size} (moe_ffn_hidden_size)")
    if world_size % (etp * ep * pp):
        raise ValueError(f"world size {world_size} is not divisible by etp*ep*pp = "
                         f"{etp}*{ep}*{pp} = {etp * ep * pp} (the expert layout)")


def check_prefix(flag: str, prefix: str) -> None:
    """ValueError when a dataset prefix is given with its .bin/.idx suffix (the files would be
    looked for as PREFIX.bin.bin): the message names the prefix to pass instead."""
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and not os.path.exists(prefix + ".bin"):
        raise ValueError(f"{flag} {prefix}: give the dataset prefix without {ext} ({flag} {stem}); "
                         "PREFIX.bin and PREFIX.idx are found from it")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: inputs, outputs, schedule and the requested (partial) layout."""

    load: str = option(doc="model checkpoint to start from (tools/convert_hf.py import, or a "
                           "run's final_model/)")
    data: tuple = option(doc="training dataset prefix(es) (.bin/.idx), concatenated")
    out: str = option(doc="run directory: metrics, config.yaml, checkpoints, final_model/")
    loss: LossConfig = option(factory=LossConfig, doc="the loss and its options (flattened flags)")
    lora: LoraConfig = option(factory=LoraConfig, doc="LoRA adapters (--lora-* flags)")
    ref: str = option("live", "reference log-probs of dpo/ipo/rdpo/dpo_norm: a live frozen copy, or "
                              "precomputed by `megasimpo score`", choices=REFERENCE_SOURCES)
    ref_logps: tuple = option((), "--ref precomputed: `megasimpo score` JSONL per --data then "
                                  "--eval-data prefix (default PREFIX.ref_logps.jsonl)")
    # Layout and batch split: None = the planner decides (megasimpo/planner.py); a value fixes it.
    tp: Optional[int] = option(None, "tensor-parallel size", ge=1)
    pp: Optional[int] = option(None, "pipeline-parallel size", ge=1)
    vpp: Optional[int] = option(None, "virtual pipeline chunks per rank (interleaved schedule)", ge=1)
    first_stage_layers: Optional[int] = option(None, "layers on the first pipeline stage (an "
                                                     "uneven split)", ge=1)
    last_stage_layers: Optional[int] = option(None, "layers on the last pipeline stage (an "
                                                    "uneven split)", ge=1)
    cp: Optional[int] = option(None, "context-parallel size", ge=1)
    ep: Optional[int] = option(None, "expert-parallel size of an MoE model (splits its experts)",
                               ge=1)
    etp: Optional[int] = option(None, "expert tensor-parallel size (default: tp)", ge=1)
    moe_dispatcher: str = option("alltoall", "MoE token dispatcher (Megatron-Core's): alltoall "
                                             "or allgather", choices=MOE_DISPATCHERS)
    moe_aux_loss_coeff: float = option(0.0, "MoE load-balancing loss: this times transformers' "
                                            "load_balancing_loss_func (mean over MoE layers, "
                                            "real tokens), added per pair; 0: off, as in "
                                            "transformers/TRL", ge=0)
    sequence_parallel: Optional[bool] = option(None, "sequence parallelism; default: on when tp > 1")
    attention_backend: str = option("auto", "core attention: te (Transformer Engine), sdpa "
                                            "(PyTorch scaled_dot_product_attention) or unfused "
                                            "(Megatron's); auto: te with TE on a GPU, else sdpa",
                                    choices=ATTENTION_BACKENDS)
    micro_batch_size: Optional[int] = option(None, "pairs per micro-batch per DP rank", ge=1)
    recompute: Optional[bool] = option(None, "full activation recompute")
    gpu_mem_gb: Optional[float] = option(None, "memory per device the plan may use (default: "
                                                "queried)", gt=0)
    global_batch_size: int = option(128, "pairs per optimizer step, all ranks", ge=1)
    seq_length: Optional[int] = option(None, "tokens per sequence; default: the longest pair in "
                                             "the data (capped by the model)", ge=1)
    steps: Optional[int] = option(None, "optimizer steps; default: epochs x steps per epoch",
                                  ge=1)
    epochs: int = option(1, "passes over the training data when --steps is not given", ge=1)
    lr: float = option(6e-7, "peak learning rate (SimPO's Llama-3-8B-Instruct setting)", gt=0)
    min_lr: float = option(0.0, "cosine floor (at most --lr)", ge=0)
    warmup_ratio: float = option(0.1, "share of steps with linear warm-up", ge=0, lt=1)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = option(0.9, "Adam beta1", ge=0, lt=1)
    adam_beta2: float = option(0.999, "Adam beta2", ge=0, lt=1)
    clip_grad: float = option(1.0, "global grad-norm clip; 0: no clipping (grad_norm is then "
                                   "not measured)", ge=0)
    precision: Optional[str] = option(None, "default: bf16 on GPU, fp32 on CPU",
                                      choices=PRECISIONS)
    pack: Optional[bool] = option(None, "pack each micro-batch's sequences into one row (THD); "
                                        "default: with a variable-length attention kernel (TE, "
                                        "or SDPA on a GPU) and cp 1")
    logprob_chunk: int = option(LOGPROB_CHUNK, "tokens per chunk of the fused output layer + "
                                               "log-probs (no full logits); 0: plain path", ge=0)
    overlap_grad_reduce: Optional[bool] = option(None, "reduce-scatter each gradient bucket "
                                                       "during backward (Megatron DDP); default: "
                                                       "on with CUDA, off on CPU")
    overlap_param_gather: Optional[bool] = option(None, "all-gather updated parameters during "
                                                        "the next forward (needs "
                                                        "--overlap-grad-reduce); default: as it")
    eval_data: tuple = option((), "held-out dataset prefix(es)")
    eval_interval: int = option(0, "evaluate every N steps (and at start and end); 0: start and "
                                   "end only", ge=0)
    save_interval: int = option(0, "resumable checkpoint every N steps; 0: final model only",
                                ge=0)
    keep_checkpoints: int = option(2, "resumable checkpoints kept in RUN_DIR/checkpoints (0: all)",
                                   ge=0)
    max_skipped_steps: int = option(10, "stop after this many consecutive non-finite steps", ge=1)
    exit_interval: Optional[int] = option(None, "checkpoint and exit 0 after step N", ge=1)
    log_interval: int = option(1, "metrics rows every N steps; without a progress bar, a "
                                  "console line every N steps, at most about 100 per run",
                               ge=1)
    progress: Optional[bool] = option(None, "a progress bar (--no-progress: a plain console line "
                                            "per --log-interval instead); default: a bar when "
                                            "stderr is a terminal")
    seed: int = option(1234, "data order and any random init", ge=0)
    # How this start treats what --out already holds (megasimpo/run_dir.py); not run settings.
    force: bool = option(False, "train into a finished run directory again (replaces its "
                                "final_model at the end)")
    resume_anyway: bool = option(False, "resume --out's checkpoint even though it was written "
                                        "under another configuration (the differences are "
                                        "printed)")

    def __post_init__(self):
        check_options(self)
        if not self.data:
            raise ValueError("--data needs at least one dataset prefix")
        if self.overlap_param_gather and self.overlap_grad_reduce is False:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (Megatron-Core "
                             "supports the parameter all-gather overlap only with it)")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be at most --lr {self.lr}")
        self.loss.check_reference(self.ref, self.ref_logps)
        for flag, prefixes in (("--data", self.data), ("--eval-data", self.eval_data)):
            for prefix in prefixes:
                check_prefix(flag, prefix)
        if (self.cp or 1) > 1 and self.attention_backend not in CP_BACKENDS:
            raise ValueError(f"--attention-backend {self.attention_backend} has no context "
                             f"parallelism (--cp {self.cp}); use --attention-backend sdpa or te")

    def to_dict(self) -> dict:
        """Plain dict (for config.yaml)."""
        d = dataclasses.asdict(self)
        d["data"], d["eval_data"] = list(self.data), list(self.eval_data)
        d["ref_logps"] = list(self.ref_logps)
        d["lora"]["targets"] = list(self.lora.targets)
        return d
