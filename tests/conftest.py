"""Session-wide test set-up: import paths, the rank pools' lifetime, shared read-only inputs.

- ``tests/`` and the repository root are importable (``fixtures``, ``multirank``, ``megasimpo``).
- The long-lived rank pools (``rank_pool.py``) are stopped when the session ends.
- ``shared_inputs(model=TINY, num_pairs=64, seed=0)``: a tiny checkpoint with train/eval data,
  built once per session for each argument set and shared by every test that asks for it;
  ``shared_build(key, make)`` the same for anything else (tokenizers, HF models). They are
  read-only: the files are made unwritable, and after each test their listing, sizes and
  modification times are compared with what was built, so a test that writes into them fails
  by name (copy first: ``fixtures.writable_copy``).
"""

import hashlib
import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest_plugins = ["pytester"]  # tests/test_rank_pool.py runs inner pytest sessions

_shared: dict[str, dict] = {}  # shared input directory -> its signature when built


def signature(root: str) -> dict:
    """Every file and directory under ``root`` with its size and modification time."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def make_read_only(root: str) -> None:
    """Drops the write bits under ``root`` (root itself stays writable only for cleanup)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def share(root: str) -> str:
    """Registers ``root`` as a shared read-only input; returns it."""
    if root not in _shared:
        make_read_only(root)
        _shared[root] = signature(root)
    return root


@pytest.fixture(scope="session")
def shared_inputs(tmp_path_factory):
    """A factory: ``(ckpt, train, eval)`` of a tiny run's inputs, built once per argument set."""
    from fixtures import TINY, tiny_run_inputs

    base = tmp_path_factory.mktemp("shared")

    def make(model=TINY, num_pairs: int = 64, seed: int = 0):
        key = hashlib.sha1(repr((model, num_pairs, seed)).encode()).hexdigest()[:12]
        root = str(base / key)
        paths = tiny_run_inputs(root, model=model, num_pairs=num_pairs, seed=seed)
        share(root)
        return paths

    return make


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory):
    """A factory: ``shared_build(key, make)`` is a directory ``make(path)`` filled once per
    session for ``key`` (a tuple of strings naming what is built: a tokenizer, an HF model),
    shared read-only like ``shared_inputs``."""
    base = tmp_path_factory.mktemp("built")
    made = {}

    def get(key: tuple, make) -> str:
        if key not in made:
            path = str(base / "-".join(map(str, key)))
            make(path)
            made[key] = share(path)
        return made[key]

    return get


@pytest.fixture(autouse=True)
def _shared_inputs_unchanged(request):
    """Fails the test that wrote into a shared input (module docstring)."""
    yield
    for root, before in _shared.items():
        after = signature(root)
        if after != before:
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            pytest.fail(f"{request.node.nodeid} changed the shared input {root}: {changed[:8]}; "
                        "copy it first (fixtures.writable_copy) and write into the copy", pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    import rank_pool

    rank_pool.close_all()
