"""Typed, frozen run configuration, grouped by concern.

Every field is documented where it is declared; values are validated in ``__post_init__`` so a bad
value fails at start-up with the value in the message. Values derived from the checkpoint or the world
(layout, batch split) come from the planner and ``ModelConfig.from_hf``, not from the user.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

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
CP_BACKENDS = ("auto", "te", "sdpa")  # those with context parallelism (auto: te or sdpa)
LOSS_TYPES = ("sigmoid", "hinge")
REFERENCE_SOURCES = ("live", "precomputed")
PRECISIONS = ("bf16", "fp8", "fp32")
# Projections LoRA can adapt (Megatron names): attention QKV and output, MLP fc1 (gate+up) and fc2.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def option(default=dataclasses.MISSING, doc: str = "", *, choices: tuple = (),
           factory=dataclasses.MISSING):
    """A run-configuration field with its documentation (the flag's help, megasimpo/flags.py
    builds the train flags from these) and, for a string, its allowed values."""
    return field(default=default, default_factory=factory,
                 metadata={"doc": doc, "choices": choices})


def check_choices(cfg) -> None:
    """ValueError naming the flag when a field declared with ``choices`` holds another value."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            flag = "loss" if (type(cfg).__name__, f.name) == ("LossConfig", "name") else f.name
            raise ValueError(f"--{flag.replace('_', '-')} {value!r} is not one of "
                             + ", ".join(choices))


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference loss, and its hyper-parameters (paper defaults)."""

    name: str = option("simpo", "the preference loss (flag --loss)", choices=LOSSES)
    beta: Optional[float] = option(None, "reward scale; default per loss (DEFAULT_BETA); IPO's tau, "
                                         "ORPO's lambda")
    gamma_beta_ratio: float = option(0.5, "SimPO / AlphaPO target margin over beta (gamma = beta "
                                          "x ratio)")
    label_smoothing: float = option(0.0, "conservative-DPO / SimPO label smoothing in [0, 0.5) "
                                         "(simpo, dpo, cpo, rdpo, alphapo)")
    loss_type: str = option("sigmoid", "Bradley-Terry term of simpo, dpo, cpo, rdpo",
                            choices=LOSS_TYPES)
    sft_weight: float = option(0.0, "SimPO: weight of the chosen-response NLL added to the loss")
    cpo_alpha: float = option(1.0, "CPO: weight of the chosen-response NLL")
    rdpo_alpha: float = option(0.0, "R-DPO: length-regularisation strength alpha (per token)")
    alphapo_alpha: float = option(0.0, "AlphaPO: reward shape alpha, r = (1 - p^-alpha) / alpha "
                                       "of the per-token average p (TRL's CPOConfig.alpha; 0: "
                                       "log p, SimPO)")

    def __post_init__(self):
        check_choices(self)
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.name])
        if self.beta <= 0:
            raise ValueError(f"--beta {self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.sft_weight < 0:
            raise ValueError(f"--sft-weight {self.sft_weight} must be >= 0")
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
        if not math.isfinite(self.alphapo_alpha):
            raise ValueError(f"--alphapo-alpha {self.alphapo_alpha} must be finite")
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


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters on the attention and MLP projections (megasimpo/lora.py); rank 0: off."""

    rank: int = option(0, "LoRA rank r of every adapter; 0: off (full fine-tuning)")
    alpha: Optional[float] = option(None, "LoRA scale numerator: the delta is alpha / r x B A "
                                          "(default 2r)")
    dropout: float = option(0.0, "dropout on each adapter's input")
    targets: tuple = option(LORA_TARGETS, "projections that get adapters (Megatron names)")

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"--lora-rank {self.rank} must be >= 0 (0: no LoRA)")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        if self.rank and self.alpha <= 0:
            raise ValueError(f"--lora-alpha {self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout {self.dropout} must be in [0, 1)")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"--lora-targets {' '.join(self.targets) or '(none)'}: each must be "
                             "one of " + ", ".join(LORA_TARGETS) + ", once")

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (rank > 0) instead of the whole model."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / r, the factor of B A."""
        return self.alpha / self.rank


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one model replica is split over ranks, and how many replicas there are."""

    tp: int = 1  # tensor-parallel size (splits heads, FFN and vocabulary)
    pp: int = 1  # pipeline-parallel stages
    vpp: Optional[int] = None  # virtual stages (model chunks) per pipeline rank, interleaved schedule
    cp: int = 1  # context-parallel size (splits the sequence; te or sdpa attention)
    dp: int = 1  # data-parallel replicas = world / (tp * pp * cp)
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (only with tp > 1)

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
                sequence_parallel: Optional[bool] = None) -> "Layout":
        """Checks a requested split against the model and the world; DP takes the remaining ranks.

        Raises ValueError naming the offending values, so a bad layout fails before any process
        group or weight is created. Sequence parallelism is on by default whenever tp > 1 (every
        layer spec supports it, ``layer_spec.TorchRMSNorm`` included).
        """
        for name, v in (("--tp", tp), ("--pp", pp), ("--cp", cp)):
            if v < 1:
                raise ValueError(f"{name} {v} must be >= 1")
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
        chunks = pp * (vpp or 1)
        if model.num_layers % chunks:
            raise ValueError(
                f"the model's {model.num_layers} layers do not split evenly over pp*vpp = "
                f"{pp}*{vpp or 1} = {chunks} pipeline chunks"
            )
        if sequence_parallel is None:
            sequence_parallel = tp > 1
        if sequence_parallel and tp == 1:
            raise ValueError("sequence parallelism needs --tp > 1")
        return cls(tp=tp, pp=pp, vpp=vpp if vpp and vpp > 1 else None, cp=cp,
                   dp=world_size // model_ranks, sequence_parallel=sequence_parallel)



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
    tp: Optional[int] = option(None, "tensor-parallel size")
    pp: Optional[int] = option(None, "pipeline-parallel size")
    vpp: Optional[int] = option(None, "virtual pipeline chunks per rank (interleaved schedule)")
    cp: Optional[int] = option(None, "context-parallel size")
    sequence_parallel: Optional[bool] = option(None, "sequence parallelism; default: on when tp > 1")
    attention_backend: str = option("auto", "core attention (megasimpo/layer_spec.py); auto: te "
                                            "with TE on a GPU, else sdpa", choices=ATTENTION_BACKENDS)
    micro_batch_size: Optional[int] = option(None, "pairs per micro-batch per DP rank")
    recompute: Optional[bool] = option(None, "full activation recompute")
    gpu_mem_gb: Optional[float] = option(None, "memory per device the plan may use (default: "
                                                "queried)")
    global_batch_size: int = option(128, "pairs per optimizer step, all ranks")
    seq_length: Optional[int] = option(None, "tokens per sequence; default: the longest pair in "
                                             "the data (capped by the model)")
    steps: Optional[int] = option(None, "optimizer steps; default: epochs x steps per epoch")
    epochs: int = option(1, "passes over the training data when --steps is not given")
    lr: float = option(6e-7, "peak learning rate (SimPO's Llama-3-8B-Instruct setting)")
    min_lr: float = option(0.0, "cosine floor")
    warmup_ratio: float = option(0.1, "share of steps with linear warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    clip_grad: float = option(1.0, "global grad-norm clip")
    precision: Optional[str] = option(None, "default: bf16 on GPU, fp32 on CPU",
                                      choices=PRECISIONS)
    pack: Optional[bool] = option(None, "pack each micro-batch's sequences into one row (THD); "
                                        "default: with a variable-length attention kernel (TE, "
                                        "or SDPA on a GPU) and cp 1")
    logprob_chunk: int = option(LOGPROB_CHUNK, "tokens per chunk of the fused output layer + "
                                               "log-probs (no full logits); 0: plain path")
    overlap_grad_reduce: Optional[bool] = option(None, "reduce-scatter each gradient bucket "
                                                       "during backward (Megatron DDP); default: "
                                                       "on with CUDA, off on CPU")
    overlap_param_gather: Optional[bool] = option(None, "all-gather updated parameters during "
                                                        "the next forward (needs "
                                                        "--overlap-grad-reduce); default: as it")
    eval_data: tuple = option((), "held-out dataset prefix(es)")
    eval_interval: int = option(0, "evaluate every N steps (and at start and end); 0: start and "
                                   "end only")
    save_interval: int = option(0, "resumable checkpoint every N steps; 0: final model only")
    keep_checkpoints: int = option(2, "resumable checkpoints kept in RUN_DIR/checkpoints (0: all)")
    max_skipped_steps: int = option(10, "stop after this many consecutive non-finite steps")
    exit_interval: Optional[int] = option(None, "checkpoint and exit 0 after step N")
    log_interval: int = option(1, "metrics rows every N steps")
    seed: int = option(1234, "data order and any random init")
    # How this start treats what --out already holds (megasimpo/run_dir.py); not run settings.
    force: bool = option(False, "train into a finished run directory again (replaces its "
                                "final_model at the end)")
    resume_anyway: bool = option(False, "resume --out's checkpoint even though it was written "
                                        "under another configuration (the differences are "
                                        "printed)")

    def __post_init__(self):
        check_choices(self)
        if not self.data:
            raise ValueError("--data needs at least one dataset prefix")
        for name in ("micro_batch_size", "global_batch_size", "epochs", "log_interval",
                     "max_skipped_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.logprob_chunk < 0:
            raise ValueError(f"--logprob-chunk {self.logprob_chunk} must be >= 0 (0: plain path)")
        if self.overlap_param_gather and self.overlap_grad_reduce is False:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (Megatron-Core "
                             "supports the parameter all-gather overlap only with it)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"--lr {self.lr} / --min-lr {self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1)")
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
