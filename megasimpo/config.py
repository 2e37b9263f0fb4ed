"""Typed, frozen run configuration, grouped by concern.

Every field is documented where it is declared; values are validated in ``__post_init__`` so a bad
value fails at start-up with the value in the message. Values derived from the checkpoint or the world
(layout, batch split) come from the planner and ``ModelConfig.from_hf``, not from the user.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

LOSSES = ("simpo", "dpo", "ipo", "cpo", "orpo", "rdpo", "sft")
REFERENCE_LOSSES = ("dpo", "ipo", "rdpo")  # losses that need reference-model log-probs
# Losses with a Bradley-Terry term: hinge can replace its sigmoid, label smoothing reaches that
# sigmoid. Elsewhere (ipo, orpo, sft) either option would be silently ignored, so it is refused.
HINGE_LOSSES = ("simpo", "dpo", "cpo", "rdpo")
DEFAULT_BETA = {"simpo": 2.0, "dpo": 0.1, "ipo": 0.1, "cpo": 0.1, "orpo": 0.1, "rdpo": 0.1,
                "sft": 1.0}
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Tokens per chunk of the fused output layer + log-probs: [1024, v/tp] fp32 logits at a time
# (0.5 GB at Llama-3's vocabulary and TP=1), small next to the full [2b x s, v/tp] they replace.
LOGPROB_CHUNK = 1024
# Core attention implementations (megasimpo/layer_spec.py); "auto" resolves to te or sdpa.
ATTENTION_BACKENDS = ("auto", "te", "sdpa", "unfused")
LOSS_TYPES = ("sigmoid", "hinge")
REFERENCE_SOURCES = ("live", "precomputed")
PRECISIONS = ("bf16", "fp8", "fp32")


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
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder, as read from an HF ``config.json``."""

    architecture: str = "LlamaForCausalLM"  # HF architectures[0]
    num_layers: int  # transformer layers
    hidden_size: int  # model width
    ffn_hidden_size: int  # SwiGLU intermediate size
    num_attention_heads: int  # query heads
    num_query_groups: int  # KV heads (GQA); == num_attention_heads for MHA
    head_dim: int  # per-head width (kv_channels)
    vocab_size: int  # embedding rows (unpadded, as in the checkpoint)
    max_position_embeddings: int  # longest sequence the model was built for
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[RopeScaling] = None  # Llama-3 scaling, None for plain RoPE
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # output layer shares the input embedding
    qkv_bias: bool = False  # Qwen2-style bias on Q, K, V projections
    sliding_window: Optional[int] = None  # Mistral/Qwen2 windowed attention; runs must fit in it
    dtype: str = "bfloat16"  # dtype the weights were stored in

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_query_groups}"
            )

    @property
    def num_parameters(self) -> int:
        """Total parameter count (embeddings counted once when tied, at the HF vocabulary size)."""
        from megasimpo.shapes import layer_shapes

        h, v = self.hidden_size, self.vocab_size
        return (self.num_layers * layer_shapes(self).parameters + h
                + v * h * (1 if self.tie_word_embeddings else 2))

    @classmethod
    def from_hf(cls, path: str) -> "ModelConfig":
        """Reads an HF ``config.json`` (or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf_dict(hf, source=path)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Builds a ModelConfig from the parsed HF config dictionary."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures={hf.get('architectures')} is not supported; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        heads = need("num_attention_heads")
        rope = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta", 10000.0)
        if rope is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
            params = hf["rope_parameters"]
            rope_theta = params.get("rope_theta", rope_theta)
            rope = params if params.get("rope_type", "default") != "default" else None
        scaling = None
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind != "llama3":
                raise ValueError(
                    f"{source}: rope_scaling type {kind!r} is not supported (supported: llama3)"
                )
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", 8192)
                ),
            )
        for key in ("attention_bias", "mlp_bias"):
            if arch != "Qwen2ForCausalLM" and hf.get(key):
                raise ValueError(f"{source}: {key}=true (biases on the output/MLP projections) is "
                                 "not supported: Megatron's GPTModel here has no such biases")
        window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            window = None
        hidden = need("hidden_size")
        return cls(
            architecture=arch,
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            vocab_size=need("vocab_size"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            sliding_window=int(window) if window else None,
            dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
        )

    def to_dict(self) -> dict:
        """Plain-dict form for metadata files and config.yaml."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference loss, and its hyper-parameters (paper defaults)."""

    name: str = option("simpo", "the preference loss (flag --loss)", choices=LOSSES)
    beta: Optional[float] = option(None, "reward scale; default per loss (DEFAULT_BETA); IPO's tau, "
                                         "ORPO's lambda")
    gamma_beta_ratio: float = option(0.5, "SimPO target margin over beta (gamma = beta x ratio)")
    label_smoothing: float = option(0.0, "conservative-DPO / SimPO label smoothing in [0, 0.5)")
    loss_type: str = option("sigmoid", "Bradley-Terry term of simpo, dpo, cpo, rdpo",
                            choices=LOSS_TYPES)
    sft_weight: float = option(0.0, "SimPO: weight of the chosen-response NLL added to the loss")
    cpo_alpha: float = option(1.0, "CPO: weight of the chosen-response NLL")
    rdpo_alpha: float = option(0.0, "R-DPO: length-regularisation strength alpha (per token)")

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
        if self.label_smoothing > 0 and (self.name not in HINGE_LOSSES or self.loss_type == "hinge"):
            raise ValueError(
                f"--label-smoothing {self.label_smoothing} has no effect for --loss {self.name} "
                f"with --loss-type {self.loss_type} (only the sigmoid form of "
                + ", ".join(HINGE_LOSSES) + ")")
        if self.sft_weight > 0 and self.name != "simpo":
            raise ValueError(f"--sft-weight {self.sft_weight} applies to simpo only, not {self.name}")

    @property
    def gamma(self) -> float:
        """SimPO's absolute target reward margin."""
        return self.beta * self.gamma_beta_ratio

    @property
    def needs_reference(self) -> bool:
        """Whether this loss compares against a reference model."""
        return self.name in REFERENCE_LOSSES


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one model replica is split over ranks, and how many replicas there are."""

    tp: int = 1  # tensor-parallel size (splits heads, FFN and vocabulary)
    pp: int = 1  # pipeline-parallel stages
    vpp: Optional[int] = None  # virtual stages (model chunks) per pipeline rank, interleaved schedule
    cp: int = 1  # context-parallel size (splits the sequence; needs Transformer Engine attention)
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
    ref: str = option("live", "reference log-probs of dpo/ipo/rdpo: a live frozen copy, or "
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

    def to_dict(self) -> dict:
        """Plain dict (for config.yaml)."""
        d = dataclasses.asdict(self)
        d["data"], d["eval_data"] = list(self.data), list(self.eval_data)
        d["ref_logps"] = list(self.ref_logps)
        return d
