"""bench/bench_logprobs.py on CPU: both paths measured, figures merged under ``logprobs``."""

import json
import math
import os

from multirank import run_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "bench_logprobs.py")


def test_runs_on_cpu_and_merges_results(tmp_path):
    out = tmp_path / "cpu.json"
    out.write_text(json.dumps({"simpo": {"step_time_s": 1.0}}))  # another script's row
    p = run_main(SCRIPT, ["--tokens", "2x64", "--vocab", "1000", "--hidden", "32", "--chunk", "16",
                          "--repeats", "1", "--out", str(out)], timeout=300, cwd=REPO,
                 env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| ratio fused/plain |" in p.stdout
    data = json.loads(out.read_text())
    assert data["simpo"] == {"step_time_s": 1.0}
    lp = data["logprobs"]
    assert lp["device"] == "cpu" and lp["tokens"] == [2, 64] and lp["vocab"] == 1000
    for path in ("plain", "fused"):
        r = lp["results"][path]
        assert r["time_ms"] > 0 and math.isfinite(r["time_ms"])
    # Saved-for-backward bytes are exact (not timing noise): the plain path keeps the [128, 1024]
    # fp32 logits (at least), the fused one a 4-byte log-sum-exp per token.
    assert lp["results"]["plain"]["saved_bytes"] >= 128 * 1024 * 4
    assert lp["results"]["fused"]["saved_bytes"] == 128 * 4
