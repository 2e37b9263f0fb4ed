"""The .idx trailer: fingerprint checks on open, Megatron compatibility, stamping, token range and
file modes (no process group)."""

import json
import os
import shutil
import stat

import pytest
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megasimpo.data import fingerprint as fp
from megasimpo.data.batches import ConcatPairs
from megasimpo.data.indexed import PairDataset, check_token_range, write_pairs
from megasimpo.data.stamp import main as stamp_main
from megasimpo.data.stamp import stamp

pytestmark = pytest.mark.fast  # in `make test-fast`

PAIRS = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12]), ([13, 14], [15], [16, 17, 18])]


def _write(tmp_path, name, pairs=PAIRS, vocab_size=100):
    prefix = str(tmp_path / name)
    write_pairs(prefix, pairs, vocab_size)
    return prefix


def _as_lists(ds):
    return [tuple(a.tolist() for a in (p.prompt_ids, p.chosen_ids, p.rejected_ids)) for p in ds]


def test_trailer_is_written_and_megatron_still_reads_the_file(tmp_path):
    prefix = _write(tmp_path, "a", PAIRS + [([99], [0, 1], [2, 3])])
    ds = PairDataset(prefix)
    assert ds.max_token_id == 99 and ds.vocab_size == 100
    assert len(ds.fingerprint) == 32 and int(ds.fingerprint, 16) >= 0
    trailer = fp.read_trailer(prefix + ".idx", fp.read_index(prefix + ".idx"))
    assert trailer == {"format": fp.FORMAT, "fingerprint": ds.fingerprint, "max_token_id": 99,
                       "vocab_size": 100, "num_pairs": 4}
    megatron = IndexedDataset(prefix)  # ignores the bytes after its arrays
    assert len(megatron) == 12 and megatron[3].tolist() == [7]


def test_idx_of_another_write_with_the_same_sizes_is_rejected(tmp_path):
    a = _write(tmp_path, "a")
    b = _write(tmp_path, "b", PAIRS[::-1])  # same records, other order: same .bin size
    shutil.copy(b + ".idx", a + ".idx")
    with pytest.raises(ValueError, match=r"a\.idx.*a\.bin.*come from different writes.*re-run"):
        PairDataset(a)


def test_sampled_fingerprint_of_a_large_bin_sees_a_changed_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "FULL_HASH_LIMIT", 8)  # every .bin here counts as "large"
    monkeypatch.setattr(fp, "SAMPLE_SIZE", 4)
    prefix = _write(tmp_path, "a")
    assert len(PairDataset(prefix)) == 3
    with open(prefix + ".bin", "r+b") as f:  # the last block is always sampled
        f.seek(-1, os.SEEK_END)
        f.write(b"\x07")
    with pytest.raises(ValueError, match="come from different writes"):
        PairDataset(prefix)


def test_bad_trailers_are_rejected(tmp_path):
    prefix = _write(tmp_path, "a")
    idx = prefix + ".idx"
    index = fp.read_index(idx)
    content = open(idx, "rb").read()[:index.end]
    real = PairDataset(prefix).fingerprint
    with open(idx, "wb") as f:
        f.write(content + fp.encode_trailer(real, 18, 100, num_pairs=5))
    with pytest.raises(ValueError, match=r"a\.idx.*trailer counts 5 pairs but the index holds 3"):
        PairDataset(prefix)
    with open(idx, "wb") as f:
        f.write(content + b"junk after the index")
    with pytest.raises(ValueError, match=r"a\.idx.*not a megasimpo trailer"):
        PairDataset(prefix)


def test_summary_with_another_fingerprint_is_rejected(tmp_path):
    prefix = _write(tmp_path, "a")
    summary = tmp_path / "a.summary.json"
    summary.write_text(json.dumps({"pairs_out": 3}))  # older megasimpo: nothing to compare
    assert len(PairDataset(prefix)) == 3
    summary.write_text(json.dumps({"fingerprint": "0" * 32}))
    with pytest.raises(ValueError, match=r"a\.summary\.json has fingerprint 0+ but .*a\.idx"):
        PairDataset(prefix)


def test_megatron_merge_needs_a_stamp_then_reads(tmp_path, capsys):
    a, b = _write(tmp_path, "a"), _write(tmp_path, "b", [([50], [60, 61], [70])])
    merged = str(tmp_path / "merged")
    builder = IndexedDatasetBuilder(merged + ".bin", dtype=DType.optimal_dtype(100))
    builder.add_index(a)  # Megatron reads our .idx despite the trailer...
    builder.add_index(b)
    builder.finalize(merged + ".idx")  # ...and writes one without
    with pytest.raises(ValueError, match=r"merged\.idx.*no megasimpo trailer.*"
                                         r"python -m megasimpo\.data\.stamp .*merged"):
        PairDataset(merged)
    os.chmod(merged + ".idx", 0o640)
    with pytest.raises(ValueError, match=r"token id 70 >= --vocab-size 70"):
        stamp(merged, vocab_size=70)
    assert stamp_main([merged, "--vocab-size", "100"]) == 0
    assert "stamped" in capsys.readouterr().out
    assert stat.S_IMODE(os.stat(merged + ".idx").st_mode) == 0o640  # the mode is kept
    ds = PairDataset(merged)
    assert _as_lists(ds) == PAIRS + [([50], [60, 61], [70])]
    assert ds.max_token_id == 70 and ds.vocab_size == 100
    assert stamp_main([merged]) == 2  # a second stamp changes nothing
    assert "already stamped" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{n}.{e}" for n in ("a", "b", "merged") for e in ("bin", "idx"))  # no temporaries


def test_stamp_without_vocab_size(tmp_path):
    merged = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(merged + ".bin", dtype=DType.optimal_dtype(100))
    builder.add_index(_write(tmp_path, "a"))
    builder.finalize(merged + ".idx")
    assert stamp(merged)["max_token_id"] == 18
    assert PairDataset(merged).vocab_size is None


def test_check_token_range(tmp_path):
    a = _write(tmp_path, "a")  # max id 18
    b = _write(tmp_path, "b", [([1], [2, 3], [40])])
    concat = ConcatPairs([a, b])
    assert concat.max_token_id == 40
    check_token_range([a, b], 41, "ckpt")  # ids 0..40 fit a 41-token vocabulary
    check_token_range(concat, 41, "ckpt")
    check_token_range(PairDataset(a), 19, "ckpt")
    with pytest.raises(ValueError, match=(
            rf"^{b}: token id 40 >= the model's vocabulary size 40 \(CKPT\): this dataset was "
            r"tokenized for another model; re-run tools/preprocess_data.py with the "
            r"checkpoint's tokenizer$")):
        check_token_range([a, b], 40, "CKPT")
    with pytest.raises(ValueError, match=rf"^{b}: token id 40 >= .* 40 \(x\)"):
        check_token_range(concat, 40, "x")
    with pytest.raises(ValueError, match=rf"^{a}: token id 18 >="):
        check_token_range(a, 18, "x")


def test_published_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        prefix = _write(tmp_path, "a")
    finally:
        os.umask(old)
    for ext in (".bin", ".idx"):
        assert stat.S_IMODE(os.stat(prefix + ext).st_mode) == 0o644
