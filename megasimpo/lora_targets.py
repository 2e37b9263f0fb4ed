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


def members(projection: str, targets) -> tuple:
    """The targets among ``targets`` that adapt ``projection`` (itself, or its members)."""
    return tuple(t for t in targets if PROJECTION[t] == projection)


def is_split(targets, projection: str) -> bool:
    """Whether ``projection`` is adapted per projection (by members of it) in ``targets``."""
    return any(t in SPLIT.get(projection, ()) for t in targets)


def gemm(shapes, target: str) -> tuple:
    """(in, out) features of what ``target`` adapts (``shapes``: a ``shapes.LayerShapes``)."""
    h, f, kv = shapes.hidden, shapes.ffn, shapes.kv // 2
    split = {"q_proj": (h, shapes.q), "k_proj": (h, kv), "v_proj": (h, kv),
             "gate_proj": (h, f), "up_proj": (h, f)}
    return split.get(target) or shapes.gemms[target.removeprefix("linear_")]
