"""Where benchmark figures go: one JSON file per device under bench/results, merged by key.

Several scripts (bench_step.py, bench_trl.py, bench_logprobs.py) add their rows to the same
``bench/results/<device>.json``; each run replaces only the keys it measured, so a file collects
one device's figures without any script clobbering another's. Writes are atomic (temp + rename).
"""

import json
import os
import re
from typing import Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    """File-name form of this machine's accelerator: 'nvidia-h100-80gb-hbm3', or 'cpu'."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def results_path(out: Optional[str] = None) -> str:
    """``out`` when given, else bench/results/<device>.json."""
    return out or os.path.join(RESULTS_DIR, f"{device_name()}.json")


def _merge(old: dict, new: dict) -> dict:
    """Recursive dict update: nested mappings merge, everything else is replaced."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_results(path: str, update: dict) -> dict:
    """Merges ``update`` into the JSON object at ``path`` (created if absent); returns the whole."""
    current = {}
    if os.path.exists(path):
        with open(path) as f:
            current = json.load(f)
        if not isinstance(current, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(current).__name__}")
    merged = _merge(current, update)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return merged


def mean(values) -> Optional[float]:
    """Mean of ``values``; None when there are none or any is None (an unmeasured figure)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def markdown_table(rows: dict, columns: list) -> str:
    """``rows`` {name: {column: value}} as a markdown table; floats to 3 significant digits."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
