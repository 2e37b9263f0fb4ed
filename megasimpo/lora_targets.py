"""What ``--lora-targets`` names: the one home of LoRA's target names and how they map.

A target is one adapter per layer (its own A [r, in] and B [out, r]). Two layouts adapt the
fused projections of Megatron's layer:

* fused (the default; megasimpo's own): ``linear_qkv`` and ``linear_fc1`` get one adapter each,
  one A shared by the projections fused in them;
* per projection (PEFT's layout, Megatron-Bridge's "canonical LoRA"): ``q_proj``, ``k_proj``,
  ``v_proj`` adapt the q, k and v rows of ``linear_qkv``, and ``gate_proj``, ``up_proj`` the
  gate and up rows of ``linear_fc1``, each with its own A; what they add is laid out as the fused
  projection's rows (QKV interleaved per query group, fc1 gate rows then up rows), so each is
  sharded over TP as its rows are.

``linear_proj`` and ``linear_fc2`` are one projection each, so PEFT's ``o_proj`` and
``down_proj`` are the same targets and are mapped to them. PEFT's ``all-linear`` is every
projection, per projection. Pure names and arithmetic: no torch, no megasimpo imports.

On a mixture-of-experts model only the attention targets (:data:`ATTENTION`) exist: its MLPs
are routed experts (and a router, never a target), and adapters on them are refused
(:func:`check_model`), on its dense MLP layers too (Qwen3-MoE's ``mlp_only_layers``), so that
every layer of an MoE model carries the same adapters. There the default targets are
``linear_qkv linear_proj`` (:func:`for_model`).
"""

FUSED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # the default targets
# The per-projection targets of a fused projection, in the order of its rows.
SPLIT = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_fc1": ("gate_proj", "up_proj")}
ALIASES = {"o_proj": "linear_proj", "down_proj": "linear_fc2"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "linear_proj", "gate_proj", "up_proj", "linear_fc2")
# Every target in its canonical order: the projections' order, a fused one's members in row order.
ORDER = tuple(t for p in FUSED for t in (p,) + SPLIT.get(p, ()))
PROJECTION = {t: next(p for p in FUSED if t == p or t in SPLIT.get(p, ())) for t in ORDER}
# The HF (PEFT) module each target adapts; a fused target adapts several (SPLIT).
HF_MODULE = {**{t: t for s in SPLIT.values() for t in s},
             **{v: k for k, v in ALIASES.items()}}
PEFT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLUMN = ("linear_qkv", "linear_fc1") + tuple(t for s in SPLIT.values() for t in s)
# The targets of the attention projections: those an MoE model takes (the rest adapt the MLP).
ATTENTION = tuple(t for t in ORDER if PROJECTION[t] in ("linear_qkv", "linear_proj"))
MOE_FIX = ("LoRA on a mixture-of-experts model adapts the attention projections only (not the "
           "experts, the router, nor the model's dense MLP layers): pass --lora-targets "
           "linear_qkv linear_proj (fused), or some of q_proj k_proj v_proj o_proj (per "
           "projection, PEFT's names)")


def normalize(targets) -> tuple:
    """``--lora-targets`` as given (Megatron names, PEFT's names, ``all-linear``) -> the targets
    in canonical order; ValueError naming the flag on an unknown name, a repeat, none, or a fused
    target together with one of its members."""
    given = " ".join(targets) or "(none)"
    out = []
    for name in targets:
        names = ALL_LINEAR if name == "all-linear" else (ALIASES.get(name, name),)
        if names[0] not in ORDER:
            raise ValueError(f"--lora-targets {given}: each must be one of {', '.join(FUSED)} "
                             f"(fused), {', '.join(PEFT_NAMES)} (per projection, PEFT's names) "
                             f"or all-linear, not {name!r}")
        out += names
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--lora-targets {given}: name each projection once")
    for fused, members in SPLIT.items():
        both = [m for m in members if m in out]
        if fused in out and both:
            raise ValueError(f"--lora-targets {given}: {fused} (one adapter for "
                             f"{', '.join(members)}) and {both[0]} both adapt the same "
                             f"projection: choose {fused} or its members")
    return tuple(t for t in ORDER if t in out)


MOE_DEFAULT = ("linear_qkv", "linear_proj")  # the default targets on a mixture of experts


def for_model(targets, model) -> tuple:
    """(targets, note): the default targets (:data:`FUSED`) on a mixture-of-experts ``model``
    become the attention ones (:data:`MOE_DEFAULT`), with a note saying so; anything else is
    returned as given (and checked by :func:`check_model`). The same list of four given by hand
    is read as the default: the MLP ones do not exist on such a model."""
    if getattr(model, "num_experts", 0) and tuple(targets) == FUSED:
        return MOE_DEFAULT, (f"--lora-targets: {model.architecture} is a mixture of experts, so "
                             f"the default targets are its attention projections: "
                             f"{' '.join(MOE_DEFAULT)} (its MLPs are routed experts)")
    return tuple(targets), None


def check_model(targets, model) -> None:
    """ValueError when ``targets`` (normalized) adapt an MLP of a mixture-of-experts ``model``
    (a ``ModelConfig``), naming them and the targets that work (:data:`MOE_FIX`)."""
    mlp = [t for t in targets if t not in ATTENTION]
    if not getattr(model, "num_experts", 0) or not mlp:
        return
    given = " ".join(targets) + (" (the default)" if tuple(targets) == FUSED else "")
    verb = "adapts" if len(mlp) == 1 else "adapt"
    raise ValueError(f"--lora-targets {given}: {', '.join(mlp)} {verb} the MLP, but "
                     f"{model.architecture} is a mixture-of-experts model. {MOE_FIX}")


def members(projection: str, targets) -> tuple:
    """The targets among ``targets`` that adapt ``projection`` (itself, or its members)."""
    return tuple(t for t in targets if PROJECTION[t] == projection)


def is_split(targets, projection: str) -> bool:
    """Whether ``projection`` is adapted per projection (by members of it) in ``targets``."""
    return any(t in SPLIT.get(projection, ()) for t in targets)


def gemm(shapes, target: str) -> tuple:
    """(in, out) features of what ``target`` adapts (``shapes``: a ``shapes.LayerShapes``)."""
    if shapes.experts and target not in ATTENTION:  # no dense MLP in this layer to adapt
        raise ValueError(f"--lora-targets {target}: a mixture-of-experts layer has no dense MLP "
                         f"projection to adapt. {MOE_FIX}")
    h, f, kv = shapes.hidden, shapes.ffn, shapes.kv // 2
    split = {"q_proj": (h, shapes.q), "k_proj": (h, kv), "v_proj": (h, kv),
             "gate_proj": (h, f), "up_proj": (h, f)}
    return split.get(target) or shapes.gemms[target.removeprefix("linear_")]
