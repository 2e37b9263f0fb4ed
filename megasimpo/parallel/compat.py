"""Megatron-Core 0.16 without Transformer Engine or apex: fixes for its torch-Adam fallback.

Megatron then runs ``torch.optim.AdamW``, whose per-parameter state carries a ``step`` counter
that Megatron's distributed optimizer handles in two places only half-way:
- ``init_state_fn`` creates ``exp_avg``/``exp_avg_sq`` but no ``step``, while ``state_dict()``
  (needed to build the sharded state to load into) asserts every parameter has one;
- loading the fully reshardable format copies every key of the destination state from the
  checkpoint, ``step`` included, but the checkpoint's per-parameter tensors have no ``step``
  (it travels in the param groups and is restored from there);
- that restore puts ONE shared ``step`` tensor into every parameter's state, and torch Adam
  increments it in place once per parameter, so after the first resumed update each parameter's
  bias correction uses a different, wrong step.
Neither path is taken with TE or apex (NGC containers), where the optimizer keeps its step per
group. Nothing here changes a value: the counters are the ones Megatron restores itself.
"""

import torch

_patched = False


def _fallback_active() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def prepare_optimizer_for_load(optimizer) -> None:
    """Gives a fresh optimizer the state a load needs, and skips the ``step`` copy (idempotent)."""
    global _patched
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
    if not _fallback_active():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
