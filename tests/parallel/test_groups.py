"""init_distributed picking MASTER_PORT for a plain single-process run, when the port is taken.

Each case runs as a plain ``python -c`` program in a pool rank (tests/multirank.py):
init_distributed starts a default process group and, without CUDA, enables the process-wide CPU
redirect, neither of which may leak into the test process; the rank is put back after it.
"""

import json
import os
import pytest

from multirank import run_main

pytestmark = pytest.mark.fast  # in `make test-fast`

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Holds a listening socket on a port, makes the first port init_distributed picks that one (the
# race of two runs started at once, made certain), then reports the outcome as one JSON line.
SCRIPT = r"""
import json, os, socket, sys

import torch.distributed as dist

from megasimpo.parallel import groups

for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(key, None)
busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
port = busy.getsockname()[1]
if sys.argv[1] == "fixed":
    os.environ["MASTER_PORT"] = str(port)
picks, free_port = [], groups._free_port

def colliding_free_port():
    picks.append(free_port() if picks else port)
    return picks[-1]

groups._free_port = colliding_free_port
out = {"busy": port}
try:
    out["rank_world"] = list(groups.init_distributed())
    out["master_port"] = int(os.environ["MASTER_PORT"])
    dist.destroy_process_group()
except RuntimeError as e:
    out["error"] = str(e)
finally:
    groups._free_port = free_port
    busy.close()
out["picks"] = picks
print(json.dumps(out))
"""


def _run(mode: str) -> dict:
    p = run_main("-c", [SCRIPT, mode], cwd=ROOT, timeout=120)  # no launcher variables: plain python
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_picked_port_taken_retries_with_a_new_one():
    out = _run("picked")
    assert "error" not in out, out["error"]
    assert out["rank_world"] == [0, 1]
    assert out["picks"][0] == out["busy"] and len(out["picks"]) == 2
    assert out["master_port"] == out["picks"][1] != out["busy"]


def test_port_set_by_launcher_is_not_replaced():
    # torchrun's MASTER_PORT is shared by every rank: a busy one is an error, not a retry.
    out = _run("fixed")
    assert out["picks"] == []
    assert "EADDRINUSE" in out["error"], out["error"]  # what _address_in_use matches
    assert "rank_world" not in out
