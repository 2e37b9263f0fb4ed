"""Tiny models and datasets built on the fly for tests (no downloads)."""

import importlib.util
import os

from megasimpo.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str):
    """A script of the repository (``tools/review_run.py``, ``examples/...``) as a module, to call
    its functions in-process (a child interpreter costs seconds of imports)."""
    path = os.path.join(REPO, relpath)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TINY = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   num_query_groups=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                   tie_word_embeddings=False, dtype="float32")


def tiny_run_inputs(root: str, model: ModelConfig = TINY, num_pairs: int = 64, seed: int = 0):
    """Writes a random checkpoint and train/eval datasets under ``root`` (in a child process,
    so this process never holds Megatron's global state); returns (ckpt, train, eval)."""
    ckpt = os.path.join(root, "model")
    if not os.path.exists(ckpt):
        from multirank import run_ranks

        run_ranks(_write, 1, root, model, num_pairs, seed)
    return ckpt, os.path.join(root, "data", "train"), os.path.join(root, "data", "eval")


def writable_copy(src: str, dst: str) -> str:
    """A copy of a shared (read-only) input that a test may change; returns ``dst``."""
    import shutil
    import stat

    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for dirpath, _, filenames in os.walk(dst):
        for path in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    return dst


def _write(rank, world, root, model, num_pairs, seed):
    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.data.indexed import write_pairs
    from megasimpo.demo import synthetic_pairs
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    layout = Layout.resolve(model, 1)
    groups.initialize(layout, seed)
    chunks = build_chunks(model, layout, Precision(name="fp32"), seed=seed)
    checkpoint.save_model(chunks, model, os.path.join(root, "model"), source="test")
    write_pairs(os.path.join(root, "data", "train"), synthetic_pairs(num_pairs, seed), model.vocab_size)
    write_pairs(os.path.join(root, "data", "eval"), synthetic_pairs(16, seed + 1), model.vocab_size)


def write_tiny_hf_config(path, **fields) -> str:
    """A small Llama ``config.json`` at ``path`` (fields override); returns the path."""
    import json

    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
              "vocab_size": 64, "max_position_embeddings": 64}
    config.update(fields)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)
