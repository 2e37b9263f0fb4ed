"""A checkpoint's ``megasimpo.json``: its format tag and the reader every load starts with.

It lives below both ``checkpoint.py`` (save/load) and ``safe_load.py`` (which validates this JSON
before any pickle of the checkpoint is opened), so that neither imports the other for it.
"""

import json
import os

from megasimpo.run_paths import META_FILE, model_of

FORMAT = "megasimpo-checkpoint-v1"


def read_meta(path: str) -> dict:
    """The metadata of a checkpoint directory; ValueError if ``path`` is not one."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(
            f"{path}: not a megasimpo checkpoint (no {META_FILE}); "
            + (model_of(path) or "convert an HF model with "
               "`python tools/convert_hf.py import --hf HF_DIR --out CKPT`")
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta
