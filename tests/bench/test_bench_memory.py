"""bench/bench_memory.py on a tiny model: every loss row is planned and simulated, the JSON
and the plot are written, and the simulated peak grows with the sequence length."""

import json
import os

from fixtures import write_tiny_hf_config
from multirank import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_memory_tiny(tmp_path):
    config = write_tiny_hf_config(tmp_path / "config.json", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, vocab_size=256, max_position_embeddings=512)
    out, png = tmp_path / "memory.json", tmp_path / "memory.png"
    run = run_main("bench/bench_memory.py", ["--hf-config", str(config), "--gpus", "2", "--seqs",
                                             "64,256", "--out", str(out), "--plot", str(png)],
                   timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["seq_length"], r["loss"], r["ref"]) for r in rows] == [
        (s, loss, ref) for s in (64, 256)
        for loss, ref in (("simpo", "live"), ("dpo", "live"), ("dpo", "precomputed"))]
    assert all(r["status"] == "simulated" and r["simulated_gb"] > 0 for r in rows)
    by = {(r["seq_length"], r["loss"], r["ref"]): r for r in rows}
    assert by[(256, "simpo", "live")]["activations_gb"] > by[(64, "simpo", "live")]["activations_gb"]
    assert png.stat().st_size > 1000
    assert "| model, GPUs |" in run.stdout
