"""The embedded default run: a tiny Llama, a learnable synthetic preference task, SimPO at TP=2.

Task ("stay on topic"): the vocabulary holds two topics of tokens. A prompt is a run of tokens from
one topic; the chosen response continues in the prompt's topic, the rejected one drifts to the other
topic. Which response is preferred depends on the prompt, and chosen/rejected lengths are drawn
independently (either may be longer), so neither a unigram bias nor length explains the preference.
"""

import os
import subprocess
import sys

import numpy as np

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


def write_demo_data(data_dir: str, seed: int = 0) -> tuple[str, str]:
    """Writes train (512 pairs) and eval (128 pairs) datasets; returns their prefixes."""
    from megasimpo.data.indexed import write_pairs

    train, held_out = os.path.join(data_dir, "train"), os.path.join(data_dir, "eval")
    write_pairs(train, synthetic_pairs(512, seed), DEMO_MODEL.vocab_size)
    write_pairs(held_out, synthetic_pairs(128, seed + 1), DEMO_MODEL.vocab_size)
    return train, held_out


def write_random_model(path: str, model: ModelConfig = DEMO_MODEL, seed: int = 0) -> None:
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
        checkpoint.save_model(chunks, model, path, source=f"random init, seed {seed}")
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_demo(out: str, steps: int = 60, nproc: int = 2, tp: int = 2) -> dict:
    """Creates model and data under ``out``, trains SimPO on ``nproc`` gloo ranks, reports."""
    from megasimpo.metrics import read_metrics

    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    print(f"[demo] tiny Llama ({DEMO_MODEL.num_parameters:,} parameters) -> {model_dir}", flush=True)
    write_random_model(model_dir)
    train, held_out = write_demo_data(os.path.join(out, "data"))
    print(f"[demo] stay-on-topic pairs -> {train}, {held_out}", flush=True)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megasimpo", "train", "--load", model_dir,
           "--data", train, "--eval-data", held_out, "--out", out, "--tp", str(tp),
           "--steps", str(steps), "--global-batch-size", "32", "--micro-batch-size", "8",
           "--lr", "3e-3", "--eval-interval", "10", "--seed", "0"]
    print("[demo] " + " ".join(cmd[2:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env)
    rows = read_metrics(out)
    evals = [r for r in rows if "eval_rank_accuracy" in r]
    before, after = evals[0], evals[-1]
    png = plot_run(out)
    print("\n[demo] held-out (128 pairs)      before    after")
    for key, name in (("eval_rank_accuracy", "likelihood-ranking accuracy"),
                      ("eval_rewards/accuracies", "reward accuracy"),
                      ("eval_rewards/margins", "reward margin")):
        print(f"[demo]   {name:<28}{before[key]:>7.3f}  {after[key]:>7.3f}")
    print(f"[demo] metrics: {os.path.join(out, 'metrics.jsonl')}  plot: {png}  "
          f"trained model: {os.path.join(out, 'final_model')}")
    return {"before": before, "after": after}
