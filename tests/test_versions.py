"""The version rule of version-bound code, and the two modules that hold it (Megatron-Core
patches in ``parallel/compat.py``, torch ones in ``torch_compat.py``): they run on the installed
versions and refuse others with what to re-check."""

import megatron.core
import pytest
import torch

from megasimpo import torch_compat, versions
from megasimpo.parallel import compat

pytestmark = pytest.mark.fast  # in `make test-fast`


def test_minor():
    assert versions.minor("2.13.0+cpu") == (2, 13)
    assert versions.minor("0.16.1") == (0, 16)
    assert versions.minor("2.14.0a0+git1234") == (2, 14)


@pytest.mark.parametrize("torch_version, ok", [
    ("2.13.0+cpu", True), ("2.13.5", True), ("2.11.0", True),  # older torch: allowed
    ("2.14.0", False), ("3.0.0", False),
])
def test_torch_newer_refused(monkeypatch, torch_version, ok):
    monkeypatch.setattr(torch, "__version__", torch_version)
    if ok:
        versions.check("who", {"torch": "2.13"}, "CHECKLIST")
    else:
        with pytest.raises(RuntimeError, match=rf"who was written for torch 2.13, this is "
                                               rf"{torch_version}: CHECKLIST"):
            versions.check("who", {"torch": "2.13"}, "CHECKLIST")


@pytest.mark.parametrize("megatron_version, ok", [
    ("0.16.1", True), ("0.16.9", True), ("0.15.2", False), ("0.17.0", False),
])
def test_megatron_other_minor_refused(monkeypatch, megatron_version, ok):
    monkeypatch.setattr(megatron.core, "__version__", megatron_version)
    if ok:
        versions.check("who", {"megatron.core": "0.16"}, "CHECKLIST")
    else:
        with pytest.raises(RuntimeError, match="who was written for megatron.core 0.16"):
            versions.check("who", {"megatron.core": "0.16"}, "CHECKLIST")


def test_installed_versions_pass():
    for module in (compat, torch_compat):
        module._check.cache_clear()
        module._check()


@pytest.fixture
def fresh_checks():
    for module in (compat, torch_compat):
        module._check.cache_clear()
    yield
    for module in (compat, torch_compat):
        module._check.cache_clear()


def test_patches_refuse_an_upgrade(monkeypatch, fresh_checks):
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="megasimpo.parallel.compat was written for "
                                           "megatron.core 0.16.*ColumnParallelLinear.forward"):
        compat.emit_hidden_states(None)
    monkeypatch.setattr(torch, "__version__", "2.14.0")
    with pytest.raises(RuntimeError, match="megasimpo.torch_compat was written for torch "
                                           "2.13.*FileSystemWriter.write_data"):
        torch_compat.bounded_file_writer("/nonexistent")


def test_patches_refuse_a_missing_internal(monkeypatch, fresh_checks):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    monkeypatch.delattr(RotaryEmbedding, "_apply_scaling")
    with pytest.raises(RuntimeError, match="an internal that megasimpo.parallel.compat relies "
                                           "on changed"):
        compat.apply_rope_scaling(None, None)
