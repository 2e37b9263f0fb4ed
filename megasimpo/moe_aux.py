"""The routers of a mixture of experts in training: transformers' load-balancing loss and the
routing metrics.

**The loss** (``--moe-aux-loss-coeff C``, off by default as in transformers and TRL, whose
published MoE configs say ``output_router_logits: false``). For MoE layer l and a micro-batch,
over its *real* tokens only (padding rows and a packed row's padding tail excluded)::

    A_l = E * sum_e f_e * P_e,   f_e = tokens whose top-k includes expert e / tokens,
                                 P_e = mean over tokens of softmax(router logits)_e

which is transformers' ``load_balancing_loss_func((logits_l,), E, k, attention_mask)``
(its ``tokens_per_expert`` summed over the k choices is f). The micro-batch's aux loss is the
mean of A_l over the model's MoE layers, and ``C x aux x (pairs in the micro-batch)`` joins the
loss sum, so after the division by the step's pair count it is the pair-weighted mean: C times
the aux loss, added per pair. One difference from transformers, stated: its function
concatenates all layers' logits before taking the two means (a product of means over every
layer's tokens), which does not split over pipeline stages; megasimpo averages the per-layer
values, as Megatron-Core and the Switch Transformer do. The two agree for one MoE layer.

f has no gradient; P does. Each rank computes its share from its own tokens with f and the token
count made global over the ranks that split one micro-batch's tokens (TP under sequence
parallelism, CP), so the shares add up to A_l and so do their gradients (Megatron sums the
router's gradients over those ranks). The share's gradient is attached to the router's output
with Megatron-Core's ``MoEAuxLossAutoScaler`` (its backward uses the schedule's loss scale), and
is multiplied by CP, as the loss itself is (``step.PairStep.loss_func``). Megatron's own aux
loss stays off (``model._moe_fields``): it scales by local token counts for a per-token loss and
sums over layers.

**The metrics**, per step, over the real tokens of every micro-batch: ``moe/aux_loss`` (the
pair-weighted aux loss, before C; logged with C = 0 too) and ``moe/load_imbalance``, over the
MoE layers the largest ratio of an expert's routed tokens to the mean over experts (1.0 is
perfectly balanced; E/k means a layer sends every token to the same k experts).

Only the policy's routers are hooked, and only passes with gradients count: a live reference
(a frozen copy, or the LoRA base under ``torch.no_grad``), held-out evaluation and ``score`` add
nothing. Under full recompute the hook counts in the recomputed forward (the one with
gradients), and the padding mask travels as an argument of the recomputed function.
"""

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from megasimpo.parallel.groups import all_reduce_host


def padding_mask(batch, groups, pre_process: bool):
    """[rows, s(/tp)] bool, True at padding: what GPTModel's ``padding_mask`` takes for
    ``batch`` (this CP rank's share already). A first stage gets the whole row (Megatron splits
    it for sequence parallelism there); a later stage gets this TP rank's share itself."""
    if batch.packed is not None:  # the padding tail holds segment id 2b
        padding = batch.packed.segment_ids >= len(batch.lengths)
    else:
        lengths = torch.tensor(batch.lengths, device=batch.position_ids.device)
        padding = batch.position_ids >= lengths[:, None]
    lay = groups.layout
    if lay.sequence_parallel and not pre_process:
        padding = padding.t().chunk(lay.tp, 0)[groups.tp_rank].t()
    return padding.contiguous()


class RouterStats:
    """Hooks on the policy's routers: adds the aux loss to training passes and keeps the step's
    routing counts (module docstring)."""

    def __init__(self, chunks: list, model_cfg, groups, coeff: float, pairs_per_microbatch: int,
                 pairs_per_step: int):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from megasimpo.model import unwrap

        self.autoscaler = MoEAuxLossAutoScaler
        self.experts, self.layers = model_cfg.num_experts, model_cfg.num_layers
        self.num_moe_layers = model_cfg.num_layers - len(model_cfg.dense_layers)
        self.coeff, self.pairs, self.pairs_per_step = coeff, pairs_per_microbatch, pairs_per_step
        self.groups, lay = groups, groups.layout
        # Ranks that hold parts of one micro-batch's tokens at the router.
        self.token_groups = ([groups.tp] if lay.sequence_parallel else []) + (
            [groups.cp] if lay.cp > 1 else [])
        # Ranks that hold the same counts after those reductions (or replicated without SP).
        self.replicas = lay.tp * lay.cp
        self.share_replicas = 1 if lay.sequence_parallel else lay.tp
        # Per layer: routed real tokens per expert, then the pair-weighted aux share; kept on the
        # device (created at the first routing) and read once per step, not per layer.
        self.sums, self.fake = None, False
        for chunk in chunks:
            for layer in unwrap(chunk).decoder.layers:
                if hasattr(layer.mlp, "router"):
                    layer.mlp.router.register_forward_hook(self._hook_for(layer.layer_number - 1))

    def _hook_for(self, index: int):
        def hook(router, args, output):
            if not torch.is_grad_enabled():
                return None
            return self._route(index, router, args, output)

        return hook

    def _route(self, index: int, router, args, output):
        hidden, padding = args[0], args[1] if len(args) > 1 else None
        probs, routing_map = output
        x = hidden.reshape(-1, hidden.shape[-1])
        # transformers: the gate's logits in the activations' dtype, the softmax in float32
        soft = F.linear(x, router.weight).float().softmax(dim=-1)
        real = (torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if padding is None
                else ~padding.reshape(-1).to(x.device))
        chosen = (routing_map.reshape(x.shape[0], -1) & real[:, None]).float()
        totals = torch.cat([chosen.sum(0), real.sum().float().reshape(1)]).detach()
        for group in self.token_groups:
            torch.distributed.all_reduce(totals, group=group)
        counts, n = totals[:-1], totals[-1].clamp(min=1.0)
        share = self.experts * ((counts / n) * (soft * real[:, None]).sum(0) / n).sum()
        if is_fake(share):  # plan --simulate: shapes only, nothing to count
            self.fake = True
        else:
            if self.sums is None:
                self.sums = torch.zeros(self.layers, self.experts + 1, dtype=torch.float64,
                                        device=x.device)
            self.sums[index, :-1] += counts.double()
            self.sums[index, -1] += share.detach().double() * self.pairs / self.num_moe_layers
        if self.coeff:
            scale = self.coeff * self.pairs * self.groups.layout.cp / self.num_moe_layers
            probs = self.autoscaler.apply(probs, share * scale)
        return probs, routing_map

    def step_metrics(self) -> dict:
        """This step's ``moe/aux_loss`` and ``moe/load_imbalance`` (collective: every rank calls
        it), and the counters reset. Nothing under ``plan --simulate``'s fake tensors."""
        if self.fake:
            return {}
        sums = (torch.zeros(self.layers, self.experts + 1, dtype=torch.float64)
                if self.sums is None else self.sums.cpu())  # a stage without an MoE layer
        sums = all_reduce_host(sums)
        aux, counts = sums[:, -1].sum().item(), sums[:, :-1] / self.replicas
        moe = counts[counts.sum(1) > 0]
        imbalance = (moe.max(1).values / moe.mean(1)).max().item() if len(moe) else float("nan")
        if self.sums is not None:
            self.sums.zero_()
        return {"moe/aux_loss": aux / self.share_replicas / self.pairs_per_step,
                "moe/load_imbalance": imbalance}
