"""The names megasimpo gives what it writes, and what a path handed to ``--load`` turns out to be.

A checkpoint is a directory with ``megasimpo.json``; a run directory holds ``status.json``,
``checkpoints/`` (with the ``latest`` pointer) and, once finished, ``final_model/``. These names
live here, below both ``checkpoint.py`` and ``run_dir.py``, so that either can name the other's
files without importing it.
"""

import os

META_FILE = "megasimpo.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATUS_FILE = "status.json"
FINAL_MODEL = "final_model"


def final_model_of(checkpoint_path: str) -> str:
    """``RUN/final_model`` for a step checkpoint ``RUN/checkpoints/step_N`` (whether or not it
    exists yet)."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))
    return os.path.join(run, FINAL_MODEL)


def model_of(path: str) -> str:
    """When ``path`` is a run directory, where its model is ("PATH is a run directory: ...");
    else "". For a --load that names a run instead of a checkpoint."""
    final = os.path.join(path, FINAL_MODEL)
    if os.path.isdir(final):
        return f"{path} is a run directory; its trained model is {final}"
    if not os.path.isfile(os.path.join(path, STATUS_FILE)):
        return ""
    latest, pointer = None, os.path.join(path, CHECKPOINTS, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            target = os.path.join(path, CHECKPOINTS, f.read().strip())
        # a broken pointer: say only what is certain
        latest = target if os.path.isfile(os.path.join(target, META_FILE)) else None
    return (f"{path} is a run directory without a final_model yet (unfinished)"
            + (f"; its latest checkpoint is {latest}" if latest else ""))
