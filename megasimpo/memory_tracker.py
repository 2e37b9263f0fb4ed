"""Live tensor-storage bytes by category, and their peak, for real or fake tensors.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every ATen op that runs while it is active
(module construction, forward, autograd's backward, collectives, the optimizer) passes through
it, and every storage an op's outputs hold is counted once, from its first appearance until it is
freed (a weak reference on the storage says when). Each storage is charged to the category that
was current when it appeared (:meth:`phase`) and can be charged to another later
(:meth:`relabel`); the peak of the live total is kept with its breakdown at that instant.

It counts what a caching allocator is asked for, not what it reserves: no fragmentation, no
CUDA context, no communication buffers outside PyTorch (those are ``memory_model.OVERHEAD_GB``).
Views share their base's storage, so a view costs nothing; a storage is counted at its full size
even when only a slice of it is still referenced, as the allocator would keep it.

Under ``FakeTensorMode`` (``megasimpo/simulate.py``) the same ops run with no memory behind them;
data-dependent scalars (``.item()``, ``.tolist()``) of fake tensors then come from ``scalar``, and
``overrides`` stands in for ops that have no fake implementation.
"""

import contextlib
import itertools
import weakref
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("weights", "grads", "optimizer", "reference", "activations", "logits", "pipeline",
              "other")


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes per category; ``peak`` / ``peak_by_category`` hold the maximum.

    ``scalar(tensor)`` answers ``_local_scalar_dense`` (``.item()``) for fake tensors; real
    tensors always give their real value.
    """

    def __init__(self, scalar: Optional[Callable] = None, overrides: Optional[dict] = None):
        super().__init__()
        self.scalar = scalar
        self.overrides = dict(overrides or {})  # op -> fn(*args, **kwargs) run instead
        self._category = ["other"]
        self._storages = WeakIdKeyDictionary()  # storage -> key
        self._entries = {}  # key -> [nbytes, category]
        self._keys = itertools.count()
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_by_category = dict(self.by_category)

    # ----- bookkeeping ----------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, category: str):
        """Charges storages that appear inside the block to ``category``."""
        assert category in CATEGORIES, category
        self._category.append(category)
        try:
            yield
        finally:
            self._category.pop()

    def _add(self, storage) -> None:
        if storage in self._storages:
            return
        key = next(self._keys)
        nbytes = storage.nbytes()
        self._storages[storage] = key
        self._entries[key] = [nbytes, self._category[-1]]
        weakref.finalize(storage, self._free, key)
        self.by_category[self._category[-1]] += nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_category = dict(self.by_category)

    def _free(self, key) -> None:
        nbytes, category = self._entries.pop(key)
        self.by_category[category] -= nbytes
        self.current -= nbytes

    def track(self, tensors) -> None:
        """Counts tensors made outside the tracker (e.g. before it started), in the current
        category."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._add(t.untyped_storage())

    def relabel(self, tensors, category: str) -> int:
        """Charges the storages of ``tensors`` to ``category`` from now on; returns their bytes."""
        assert category in CATEGORIES, category
        moved = 0
        for t in tree_flatten(tensors)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            key = self._storages.get(t.untyped_storage())
            if key is None:
                continue
            entry = self._entries[key]
            if entry[1] != category:
                self.by_category[entry[1]] -= entry[0]
                self.by_category[category] += entry[0]
                entry[1] = category
                moved += entry[0]
        return moved

    def reset_peak(self) -> None:
        """Forgets the peak so far: from now on the peak is at least what is live now."""
        self.peak = self.current
        self.peak_by_category = dict(self.by_category)

    # ----- dispatch -------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and self.scalar is not None:
            from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

            t = args[0]
            if isinstance(t, FakeTensor):
                if t.constant is not None:
                    return t.constant.item()
                return self.scalar(t)
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = self.overrides.get(func, func)(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # sparse: no storage
                self._add(t.untyped_storage())
        return out
