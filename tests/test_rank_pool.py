"""The rank pool itself: a broken rank fails its own test only, and ranks come back clean.

The failing tests run in an inner pytest session (``pytester``, its own process and pools), so
this session stays green while they fail there.
"""

import os

import pytest

from multirank import run_main, run_ranks

TESTS = os.path.dirname(os.path.abspath(__file__))

INNER = '''
import os
import time

import torch
import torch.distributed as dist

from multirank import run_ranks


def _sum(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item(), os.getpid()


def _raises_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 waits for a peer that is gone
    return "unreachable"


def _hangs_on_rank1(rank, world):
    if rank == 1:
        time.sleep(3600)
    return "rank 0 done"


def test_a_before():
    assert run_ranks(_sum, 2)[0][0] == 3.0


def test_b_exception_in_rank1():
    run_ranks(_raises_on_rank1, 2)


def test_c_after_exception():
    assert [r[0] for r in run_ranks(_sum, 2)] == [3.0, 3.0]


def test_d_hang_in_rank1():
    run_ranks(_hangs_on_rank1, 2, timeout=5)


def test_e_after_hang():
    assert [r[0] for r in run_ranks(_sum, 2)] == [3.0, 3.0]


def test_f_one_rank_still_fine():
    assert run_ranks(_sum, 1)[0][0] == 1.0
'''


def test_broken_rank_fails_only_its_test(pytester):
    pytester.makepyfile(test_inner=INNER)
    pytester.makeconftest(f"import sys\nsys.path[:0] = [{TESTS!r}, {os.path.dirname(TESTS)!r}]\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                           "--timeout", "300", timeout=600)
    result.assert_outcomes(passed=4, failed=2)
    text = result.stdout.str()
    # Each failure is its own test's, with the rank's own account of it.
    assert "FAILED test_inner.py::test_b_exception_in_rank1" in text
    assert "FAILED test_inner.py::test_d_hang_in_rank1" in text
    assert "ValueError: rank 1 broke on purpose" in text  # rank 1's traceback
    assert "no answer after 5s (hung)" in text
    assert 'in _hangs_on_rank1' in text  # the hung rank's Python stack
    for passed in ("test_a_before", "test_c_after_exception", "test_e_after_hang",
                   "test_f_one_rank_still_fine"):
        assert f"FAILED test_inner.py::{passed}" not in text


def _leaves_state(rank, world):
    """Changes what a test may change in a rank, and says what it found on arrival."""
    import signal
    import sys

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    from fixtures import TINY
    from megasimpo.config import Layout
    from megasimpo.parallel import groups

    found = dict(groups=ps.model_parallel_is_initialized(),
                 tracker=mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
                 dtype=str(torch.get_default_dtype()), env=os.environ.get("LEAK_TEST"),
                 handler=signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
                 path="leaked-entry" in sys.path, cwd=os.getcwd(),
                 draw=torch.rand(1).item())
    groups.initialize(Layout.resolve(TINY, world, tp=world), seed=3)
    torch.set_default_dtype(torch.float64)
    os.environ["LEAK_TEST"] = "1"
    signal.signal(signal.SIGUSR1, lambda *a: None)
    sys.path.append("leaked-entry")
    os.chdir("/")
    return found


def test_rank_comes_back_to_its_start(tmp_path):
    with pytest.warns(UserWarning, match=r"left behind in rank \d: .*handler of SIGUSR1"):
        first = run_ranks(_leaves_state, 2)
    with pytest.warns(UserWarning, match="handler of SIGUSR1"):
        second = run_ranks(_leaves_state, 2)
    for a, b in zip(first, second):
        assert a == b  # the second task found what the first did: a fresh rank's state
        assert not a["groups"] and not a["tracker"] and a["dtype"] == "torch.float32"
        assert a["env"] is None and a["handler"] and not a["path"]


def test_run_main_is_the_program_in_process(tmp_path):
    """run_main gives what the interpreter gives: exit codes of SystemExit, of an uncaught
    exception (with its traceback on stderr), and both output streams."""
    script = tmp_path / "prog.py"
    script.write_text("import sys\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\n"
                      "if sys.argv[1] == 'raise':\n    raise KeyError('x')\nsys.exit(int(sys.argv[1]))\n")
    p = run_main(str(script), ["3"])
    assert (p.returncode, p.stdout, p.stderr) == (3, "out ['3']\n", "err\n")
    assert run_main(str(script), ["0"]).returncode == 0
    p = run_main(str(script), ["raise"])
    assert p.returncode == 1 and "KeyError: 'x'" in p.stderr and "Traceback" in p.stderr
    p = run_main("megasimpo", ["train", "--tp", "x"])
    assert p.returncode == 2 and "argument --tp: invalid int value: 'x'" in p.stderr
