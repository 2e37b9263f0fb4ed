"""How a model's transformer layers split over pipeline stages: evenly, or unevenly with
Megatron-Core's first/last-stage counts (``num_layers_in_first/last_pipeline_stage``).

Pure arithmetic, the one home of the rule: ``Layout.stage_layers`` (config.py), the memory model,
the planner and model.py all read the counts from here.
"""

from typing import Optional


def stage_layer_counts(num_layers: int, pp: int, vpp: Optional[int] = None,
                       first: Optional[int] = None, last: Optional[int] = None) -> tuple:
    """Transformer layers of each of the ``pp`` pipeline stages: ``num_layers / pp`` each when
    ``first`` and ``last`` are None (Megatron's even split), else ``first`` on stage 0, ``last``
    on stage pp-1 and the rest spread evenly over the middle stages (Megatron-Core's
    ``num_layers_in_first/last_pipeline_stage``). With interleaving every stage's count must be
    a multiple of ``vpp`` (each model chunk holds count / vpp layers). ValueError naming the
    values otherwise."""
    v = vpp or 1
    what = f"the model's {num_layers} layers"
    if first is None and last is None:
        if num_layers % (pp * v):
            raise ValueError(f"{what} do not split evenly over pp*vpp = {pp}*{v} = {pp * v} "
                             "pipeline chunks; give --first-stage-layers and "
                             "--last-stage-layers for an uneven split")
        return (num_layers // pp,) * pp
    if pp < 2 or first is None or last is None:
        raise ValueError("an uneven pipeline split needs --pp >= 2 and both "
                         "--first-stage-layers and --last-stage-layers "
                         f"(got pp={pp}, first={first}, last={last})")
    middle, rest = pp - 2, num_layers - first - last
    if rest < middle or (middle and rest % middle) or (not middle and rest):
        raise ValueError(f"{what} do not split as {first} (first stage) + {last} (last stage)"
                         + (f" + {middle} equal middle stages" if middle else "")
                         + f" over pp={pp}: give counts that leave "
                         + ("a multiple of the middle stages" if middle else "no layer"))
    counts = (first,) + (rest // middle if middle else 0,) * middle + (last,)
    if min(counts) < 1 or any(c % v for c in counts):
        raise ValueError(f"{what} split {'+'.join(map(str, counts))} over pp={pp} stages: each "
                         f"stage needs at least one layer" + (f" and a multiple of vpp={v}"
                                                              if v > 1 else ""))
    return counts


def uneven_splits(num_layers: int, pp: int, vpp: Optional[int] = None) -> list:
    """Every valid (first, middle, last) stage layer count of an uneven split whose end stages
    hold no more than a middle one (the embedding and the output layer weigh on them anyway);
    at PP=2 (no middle stage) every split, middle None. Sorted by middle, then first."""
    v, out = vpp or 1, []
    if pp < 2:
        return out
    if pp == 2:
        return [(f, None, num_layers - f) for f in range(v, num_layers - v + 1, v)
                if (num_layers - f) % v == 0]
    for middle in range(v, num_layers // (pp - 2) + 1, v):
        rest = num_layers - (pp - 2) * middle
        out += [(f, middle, rest - f) for f in range(v, min(middle, rest - v) + 1, v)
                if v <= rest - f <= middle and (rest - f) % v == 0]
    return out


def default_split(num_layers: int, pp: int, vpp: Optional[int] = None) -> tuple:
    """(first, last) stage layers when the layers do not divide by pp x vpp and nobody chose:
    the middle stages as full as the most even split, the ends sharing the rest (the first one
    the smaller half). ValueError when no split exists."""
    splits = uneven_splits(num_layers, pp, vpp)
    if not splits:
        stage_layer_counts(num_layers, pp, vpp)  # raises, naming the values
    per_stage = -(-num_layers // pp)
    best = min(splits, key=lambda s: (abs((s[1] or per_stage) - per_stage), abs(s[0] - s[2]),
                                      s[0] - s[2]))
    return best[0], best[2]

