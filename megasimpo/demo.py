"""The embedded default run: a tiny Llama, a learnable synthetic preference task, SimPO at TP=2.

Task ("stay on topic"): the vocabulary holds two topics of words (a0..a25, b0..b25). A prompt is a
run of words from one topic; the chosen response continues in the prompt's topic, the rejected one
drifts to the other topic. Which response is preferred depends on the prompt, and chosen/rejected
lengths are drawn independently (either may be longer), so neither a unigram bias nor length
explains the preference.

The demo takes the path a user's data takes: text records in TRL's format (JSONL), a tokenizer
saved with the checkpoint, ``tools/preprocess_data.py``'s pipeline into indexed datasets, then
``megasimpo train`` under torchrun.
"""

import os
import subprocess
import sys

import numpy as np

from megasimpo import atomic
from megasimpo.config import ModelConfig

TOPICS = ((4, 30), (30, 56))  # token id ranges [lo, hi) of the two topics; ids < 4 are specials
BOS = 1
DEMO_MODEL = ModelConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
    head_dim=16, vocab_size=64, max_position_embeddings=64, rope_theta=10000.0, norm_eps=1e-5,
    tie_word_embeddings=False, dtype="float32")


def synthetic_pairs(num_pairs: int, seed: int):
    """``num_pairs`` (prompt, chosen, rejected) id lists of the stay-on-topic task."""
    rng = np.random.default_rng(seed)
    for _ in range(num_pairs):
        topic = int(rng.integers(2))
        own, other = TOPICS[topic], TOPICS[1 - topic]
        prompt = [BOS] + rng.integers(*own, size=int(rng.integers(4, 9))).tolist()
        chosen = rng.integers(*own, size=int(rng.integers(2, 7))).tolist()
        rejected = rng.integers(*other, size=int(rng.integers(2, 7))).tolist()
        yield prompt, chosen, rejected


SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; <s> is BOS, </s> EOS


def demo_vocabulary() -> list:
    """Word of each token id: specials, topic a (ids 4-29), topic b (30-55), unused fillers."""
    words = list(SPECIALS) + [f"a{i}" for i in range(26)] + [f"b{i}" for i in range(26)]
    return words + [f"x{i}" for i in range(DEMO_MODEL.vocab_size - len(words))]


def write_tokenizer(path: str) -> str:
    """A word-level HF tokenizer over the demo vocabulary (no chat template: plain text pairs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


def write_records(path: str, num_pairs: int, seed: int) -> str:
    """The task as TRL-format text records, one JSON object per line."""
    import json

    words = demo_vocabulary()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for prompt, chosen, rejected in synthetic_pairs(num_pairs, seed):
            text = [" ".join(words[i] for i in ids) for ids in (prompt[1:], chosen, rejected)]
            f.write(json.dumps(dict(zip(("prompt", "chosen", "rejected"), text))) + "\n")
    return path


def write_demo_data(data_dir: str, tokenizer: str, seed: int = 0) -> tuple[str, str]:
    """JSONL records -> preprocessing pipeline -> train (512 pairs) and eval (128) prefixes."""
    from megasimpo.data.preprocess import PreprocessConfig, run

    prefixes = []
    for name, n, s in (("train", 512, seed), ("eval", 128, seed + 1)):
        records = write_records(os.path.join(data_dir, f"{name}.jsonl"), n, s)
        prefixes.append(os.path.join(data_dir, name))
        run(PreprocessConfig(inputs=(records,), tokenizer=tokenizer, out=prefixes[-1],
                             force=True),  # the demo remakes its own data each time
            progress=False)
    return prefixes[0], prefixes[1]


def write_random_model(path: str, model: ModelConfig = DEMO_MODEL, seed: int = 0,
                       tokenizer_dir=None) -> None:
    """A randomly initialised checkpoint of ``model`` at ``path`` (single process, TP=1)."""
    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    groups.init_distributed()
    try:
        layout = Layout.resolve(model, 1)
        groups.initialize(layout, seed)
        chunks = build_chunks(model, layout, Precision(name="fp32"), seed=seed)
        checkpoint.save_model(chunks, model, path, source=f"random init, seed {seed}",
                              tokenizer_dir=tokenizer_dir)
    finally:
        groups.destroy()


def plot_run(run_dir: str) -> str:
    """PNG of training loss, reward margins and accuracies (train and held-out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megasimpo.metrics import read_metrics

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "rewards/margins", "rewards/accuracies"),
                              ("loss", "reward margin", "reward accuracy")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", alpha=0.7)
        ax.plot([r["step"] for r in evals], [r["eval_" + key] for r in evals], "o-", label="held-out")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "training.png")
    atomic.save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def run_demo(out: str, steps: int = 60, nproc: int = 2, tp: int = 2) -> dict:
    """Creates model and data under ``out``, trains SimPO on ``nproc`` gloo ranks, reports."""
    from megasimpo.metrics import read_metrics

    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    print(f"[demo] tiny Llama ({DEMO_MODEL.num_parameters:,} parameters) -> {model_dir}", flush=True)
    tokenizer = write_tokenizer(os.path.join(out, "tokenizer"))
    write_random_model(model_dir, tokenizer_dir=tokenizer)
    train, held_out = write_demo_data(os.path.join(out, "data"), os.path.join(model_dir, "tokenizer"))
    print(f"[demo] stay-on-topic pairs (text JSONL -> preprocess_data pipeline) -> {train}, "
          f"{held_out}", flush=True)
    # The run directory is beside its inputs, never around them (train refuses an --out that
    # contains --load); --force: the demo redoes its own run each time it is started.
    run = os.path.join(out, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megasimpo", "train", "--load", model_dir,
           "--data", train, "--eval-data", held_out, "--out", run, "--tp", str(tp),
           "--steps", str(steps), "--global-batch-size", "32", "--micro-batch-size", "8",
           "--lr", "3e-3", "--eval-interval", "10", "--seed", "0", "--force"]
    print("[demo] " + " ".join(cmd[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env)
    rows = read_metrics(run)
    evals = [r for r in rows if "eval_rank_accuracy" in r]
    before, after = evals[0], evals[-1]
    png = plot_run(run)
    print("\n[demo] held-out (128 pairs)      before    after")
    for key, name in (("eval_rank_accuracy", "likelihood-ranking accuracy"),
                      ("eval_rewards/accuracies", "reward accuracy"),
                      ("eval_rewards/margins", "reward margin")):
        print(f"[demo]   {name:<28}{before[key]:>7.3f}  {after[key]:>7.3f}")
    print(f"[demo] metrics: {os.path.join(run, 'metrics.jsonl')}  plot: {png}  "
          f"trained model: {os.path.join(run, 'final_model')}")
    return {"before": before, "after": after}
