"""PEFT LoRA adapter directories <-> megasimpo's adapters (the format only; no checkpoint I/O).

A PEFT directory is ``adapter_config.json`` + ``adapter_model.safetensors`` holding, per adapted
HF module, ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` [r, in]
and ``lora_B.weight`` [out, r]; PEFT adds ``lora_alpha / r * B A`` (rsLoRA: ``/ sqrt(r)``) to the
module's output. megasimpo's targets (megasimpo/lora_targets.py) map to HF modules so:

  linear_qkv  -> q_proj, k_proj, v_proj  fused: one A shared by the three; their B are the q/k/v
                                         row blocks of the fused B (Megatron's per-KV-group rows,
                                         ``mapping.qkv_from_mcore``)
  linear_fc1  -> gate_proj, up_proj      fused: one A shared; B's gate rows, then its up rows
  q_proj ... up_proj                     per projection: each its own A and B, as PEFT has them
  linear_proj -> o_proj,  linear_fc2 -> down_proj

On a mixture-of-experts base only the attention modules (q/k/v/o_proj) are adapted: an adapter
of its MLP modules (experts, router, dense MLP layers) is refused (``lora_targets.MOE_FIX``).

Writing splits exactly. Reading picks, per fused projection, the fused target when every layer
has all its members with one shared A (what megasimpo writes of fused targets), else the
per-projection targets of the members present (what ``peft`` writes: a separate A per module,
often only some members, e.g. q_proj + v_proj).
"""

import json
import os
import re
from typing import Optional

import torch

from megasimpo import lora_targets
from megasimpo.config import LORA_TARGETS, LoraConfig, ModelConfig
from megasimpo.hf import mapping

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# megasimpo target -> (HF parent module, HF modules in the order of the fused B's row blocks)
MODULES = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
           "linear_proj": ("self_attn", ("o_proj",)),
           "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
           "linear_fc2": ("mlp", ("down_proj",))}
TARGET_OF = {mod: target for target, (_, mods) in MODULES.items() for mod in mods}
HF_ORDER = tuple(mod for target in LORA_TARGETS for mod in MODULES[target][1])
UNIT_OF = {mod: lora_targets.ALIASES.get(mod, mod) for mod in HF_ORDER}  # per-projection target
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")
_FIX = ("merge it into its base with peft (`PeftModel.from_pretrained(...).merge_and_unload()"
        ".save_pretrained(DIR)`) and import the merged model")
# adapter_config.json options that change what the adapter computes or trains (each is off when
# absent, false, null or empty), with why megasimpo refuses each; then those written (known to
# PEFT since 0.9) with their off values
_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vector and weight norm are not in megasimpo's adapters",
    "rank_pattern": "megasimpo's adapters have one rank (r) for every module",
    "alpha_pattern": "megasimpo's adapters have one lora_alpha for every module",
    "modules_to_save": "it trains those modules whole, which megasimpo's LoRA checkpoints do "
                       "not hold",
    "lora_bias": "megasimpo's adapters have no bias"}
_UNSUPPORTED.update({k: "megasimpo's adapters are plain LoRA" for k in (
    "fan_in_fan_out", "use_qalora", "use_bdlora", "layer_replication", "target_parameters",
    "trainable_token_indices", "alora_invocation_tokens", "arrow_config")})
_WRITTEN_OFF = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}}


def key(layer: int, module: str, which: str) -> str:
    """The safetensors key of ``module``'s lora_A / lora_B (``which``: "A" | "B") at ``layer``."""
    return f"base_model.model.model.layers.{layer}.{MODULES[TARGET_OF[module]][0]}.{module}" \
        f".lora_{which}.weight"


def module_shapes(m: ModelConfig) -> dict:
    """HF module -> (in, out) features."""
    h, f, q, kv = (m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.head_dim,
                   m.num_query_groups * m.head_dim)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def split(target: str, a: torch.Tensor, b: torch.Tensor, m: ModelConfig) -> dict:
    """One megasimpo adapter (A [r, in], B [out, r] in Megatron's row layout) -> {HF module:
    (A, B)}; the members of a fused projection share A; a per-projection target is its module."""
    if target not in MODULES:
        return {lora_targets.HF_MODULE[target]: (a, b)}
    mods = MODULES[target][1]
    if target == "linear_qkv":
        bs = mapping.qkv_from_mcore(b, m.num_attention_heads, m.num_query_groups, m.head_dim)
    elif target == "linear_fc1":
        bs = tuple(t.clone() for t in b.split(m.ffn_hidden_size))
    else:
        bs = (b,)
    return {mod: (a, part) for mod, part in zip(mods, bs)}


def fuse(target: str, parts: dict, m: ModelConfig) -> tuple:
    """Inverse of :func:`split`: {HF module: (A, B)} (a fused projection's members, sharing A;
    one that is absent gets a zero B, which is exact) -> (A, B)."""
    mods = MODULES[target][1]
    a = next(iter(parts.values()))[0]
    shapes, r = module_shapes(m), a.shape[0]
    bs = [parts[mod][1] if mod in parts else a.new_zeros(shapes[mod][1], r) for mod in mods]
    if target == "linear_qkv":
        return a, mapping.qkv_to_mcore(*bs, m.num_query_groups)
    return a, torch.cat(bs) if len(bs) > 1 else bs[0]


def _layout(found: dict, m: ModelConfig) -> list:
    """The targets of {(layer, HF module): {"A", "B"}}: per fused projection, itself when every
    layer has all its members and they share A, else the per-projection targets present."""
    targets = []
    for target, (_, mods) in MODULES.items():
        present = [mod for mod in mods if any(mod == k for _, k in found)]
        if not present:
            continue
        shared = len(mods) > 1 and len(present) == len(mods) and all(
            (i, mod) in found and torch.equal(found[(i, mod)]["A"], found[(i, mods[0])]["A"])
            for i in range(m.num_layers) for mod in mods)
        targets += [target] if shared or len(mods) == 1 else [UNIT_OF[mod] for mod in present]
    return list(lora_targets.normalize(targets))


def adapter_config(cfg: LoraConfig, base_name: Optional[str]) -> dict:
    """adapter_config.json of ``cfg``'s adapters (HF module names)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    modules = [mod for mod in HF_ORDER if TARGET_OF[mod] in cfg.targets
               or UNIT_OF[mod] in cfg.targets]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
            "target_modules": modules, "bias": "none", "inference_mode": True,
            "use_rslora": cfg.rslora,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "revision": None, **_WRITTEN_OFF}


def write(out_dir: str, cfg: LoraConfig, base_name: Optional[str], tensors: dict) -> None:
    """Writes the PEFT directory: config and safetensors (``tensors``: key -> tensor)."""
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()},
              os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(cfg, base_name), f, indent=2)


def to_peft(layer: int, adapters: dict, m: ModelConfig, dtype: torch.dtype) -> dict:
    """{target: (A, B)} of one layer -> {safetensors key: tensor in ``dtype``}."""
    out = {}
    for target, (a, b) in adapters.items():
        for mod, (ma, mb) in split(target, a, b, m).items():
            out[key(layer, mod, "A")] = ma.to(dtype).clone()  # no storage shared between keys
            out[key(layer, mod, "B")] = mb.to(dtype).clone()
    return out


def read_config(adapter_dir: str) -> dict:
    """adapter_config.json, its options checked: ValueError naming any megasimpo cannot express."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--adapter {adapter_dir}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters import")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {cfg['task_type']!r}; only CAUSAL_LM adapters import")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {cfg['bias']!r} trains the base biases, which megasimpo's "
                         "adapters do not hold; only bias \"none\" imports")
    for name, why in _UNSUPPORTED.items():
        value = cfg.get(name)
        if value:
            raise ValueError(f"{path}: {name} = {json.dumps(value)} is not supported ({why}): "
                             f"{_FIX}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"{path}: r {r!r} and lora_alpha {alpha!r} must be positive numbers")
    listed = cfg.get("target_modules")
    if isinstance(listed, (list, tuple)):
        unknown = [t for t in listed if t not in TARGET_OF]
        if unknown:
            raise ValueError(f"{path}: target module(s) {', '.join(unknown)} unknown to megasimpo, "
                             f"which adapts only {', '.join(HF_ORDER)}: {_FIX}")
    if cfg.get("use_rslora") not in (None, False, True):
        raise ValueError(f"{path}: use_rslora {cfg['use_rslora']!r} must be true or false")
    return cfg


def check_base_name(cfg: dict, hf_dir: str, adapter_dir: str) -> None:
    """ValueError when the adapter's ``base_model_name_or_path`` names another model than
    ``hf_dir`` (compared as paths here, else by their last component)."""
    hint = cfg.get("base_model_name_or_path")
    if not hint:
        return
    names = {os.path.realpath(hf_dir)}
    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            names.add(json.load(f).get("_name_or_path") or hf_dir)
    except (OSError, json.JSONDecodeError):
        pass

    def tail(s: str) -> str:
        return os.path.basename(os.path.normpath(s)).lower()

    if os.path.realpath(hint) in names or tail(hint) in {tail(n) for n in names}:
        return
    raise ValueError(f"--adapter {adapter_dir} was made for the base model {hint!r} (its "
                     f"{CONFIG_FILE}'s base_model_name_or_path), not --hf {hf_dir}: adapters on "
                     "other weights compute something else. Import it over the base it was "
                     f"trained on; if {hf_dir} is that model under another name, pass "
                     "--ignore-base-name")


def _other_base(cfg: dict, hf_dir: Optional[str]) -> str:
    """The end of an error about an adapter that does not fit the base: what it was made for and
    the fix."""
    made_for = cfg.get("base_model_name_or_path") or "not named in its config"
    given = f"--hf {hf_dir}" if hf_dir else "this base"
    return (f"the adapter was made for another base model ({made_for}) than {given}: import it "
            "with --hf set to the model it was trained on")


def read(adapter_dir: str, m: ModelConfig, *, hf_dir: Optional[str] = None) -> tuple:
    """(LoraConfig with megasimpo's targets, {(layer, target): (A, B)} (fused or per projection,
    :func:`_layout`), stored dtype, the adapter config) of a PEFT directory over a base of config
    ``m`` (read from ``hf_dir``, which errors name); ValueError on anything that does not fit
    that base."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(adapter_dir)
    path = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--adapter {adapter_dir}: no {WEIGHTS_FILE} (only safetensors adapters "
                         "import; a pickled adapter_model.bin is not read)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: truncated or not a safetensors file ({e})") from None
    r, shapes, found = cfg["r"], module_shapes(m), {}
    mlp = sorted({n.split(".lora_")[0] for n in tensors if ".mlp." in n})
    if m.num_experts and mlp:  # experts (``mlp.experts.{e}.gate_proj``) or a dense MLP
        more = f" and {len(mlp) - 1} more" if len(mlp) > 1 else ""
        raise ValueError(f"{path}: adapts {mlp[0]}{more}, an MLP module of the "
                         f"mixture-of-experts base {m.architecture}. "
                         f"{lora_targets.MOE_FIX}; or {_FIX}")
    for name, t in tensors.items():
        match = _KEY.fullmatch(name)
        module = match and match.group(3)
        if not match or module not in TARGET_OF or match.group(2) != MODULES[TARGET_OF[module]][0]:
            raise ValueError(f"{name} in {path}: not a LoRA tensor of a module megasimpo adapts "
                             f"({', '.join(HF_ORDER)} of the decoder layers): {_FIX}")
        layer, which = int(match.group(1)), match.group(4)
        if layer >= m.num_layers:
            raise ValueError(f"{name} in {path}: layer {layer}, but the base model has "
                             f"{m.num_layers} layers: {_other_base(cfg, hf_dir)}")
        n_in, n_out = shapes[module]
        want = (r, n_in) if which == "A" else (n_out, r)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} in {path}: shape {list(t.shape)}, but over this base (r={r}) "
                             f"it must be {list(want)}: {_other_base(cfg, hf_dir)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} in {path}: dtype {t.dtype} is not floating point")
        found.setdefault((layer, module), {})[which] = t
    if not found:
        raise ValueError(f"{path}: holds no LoRA tensors")
    for (layer, module), ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: layer {layer}'s {module} has lora_{''.join(ab)} only")
    targets = _layout(found, m)
    for target in targets:
        mods = MODULES[target][1] if target in MODULES else (lora_targets.HF_MODULE[target],)
        layers = {i for i, mod in found if mod in mods}
        if len(layers) != m.num_layers:
            raise ValueError(f"{path}: {'/'.join(mods)} adapted in layers {sorted(layers)} only, "
                             f"but megasimpo adapts every layer (all {m.num_layers}); if it "
                             f"was trained on this base, {_FIX}; else {_other_base(cfg, hf_dir)}")
    adapters = {}
    for layer in range(m.num_layers):
        for target in targets:
            if target in MODULES:
                parts = {mod: (found[(layer, mod)]["A"], found[(layer, mod)]["B"])
                         for mod in MODULES[target][1] if (layer, mod) in found}
                adapters[(layer, target)] = fuse(target, parts, m)
            else:
                ab = found[(layer, lora_targets.HF_MODULE[target])]
                adapters[(layer, target)] = (ab["A"], ab["B"])
    dtype = next(iter(tensors.values())).dtype
    lora = LoraConfig(rank=r, alpha=float(cfg["lora_alpha"]),
                      dropout=float(cfg.get("lora_dropout") or 0.0), targets=tuple(targets),
                      rslora=bool(cfg.get("use_rslora")))
    return lora, adapters, dtype, cfg
