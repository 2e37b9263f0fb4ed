"""Ranking-accuracy study (issue #5): after preference training, does the chosen response of a pair
get the higher AVERAGE log-likelihood (the quantity generation follows)? SimPO vs DPO, same engine.

    python examples/ranking_accuracy.py --out DIR [--seed 0] [--jobs 2] [--quick]

The SimPO paper (arXiv 2405.14734) reports that after DPO only about half of the training pairs rank
the chosen response first by average log-likelihood while after SimPO about 90% do, and that DPO
lengthens generations (~+40%) while SimPO stays near the SFT length. This script measures the same
quantities on a tiny Llama and a synthetic task, end to end through the `megasimpo` CLI:

1. Task ("digit rules"): prompt = BOS, an operator (copy | shift: +1 mod 10 | reverse), 3-6 digits,
   SEP. A response is the answer digits, then 0-12 "commentary" words drawn uniformly from 96
   tokens (content-free filler), then EOS. Held-out prompts never occur in training.
2. SFT: `megasimpo train --loss sft` (mean NLL of the chosen response) from a random init, on the
   chosen responses of the injected-error pairs below.
3. Two kinds of preference pairs, each trained from that SFT model:
   - "injected": chosen = the correct answer; rejected = the answer with one error (a digit changed,
     dropped or inserted, so lengths differ both ways), commentary drawn independently, and a
     verbosity bias (the length trap): the chosen response has the longer commentary in 70% of pairs;
   - "on_policy": four samples of the SFT model per fresh prompt, scored by a rule-based judge
     (minus the edit distance of the answer to the correct one); the best-scored sample is chosen,
     the worst rejected, ties skipped (the paper's on-policy set-up; no length bias).
4. SimPO and DPO: same pairs and steps; a (beta x lr) grid each. The setting is chosen on dev prompts
   by the exact-answer accuracy of greedy generations (the task success, not the metric under
   study), ties by that of sampled ones.
5. Every model is scored by `megasimpo score` on its variant's train, dev and held-out pairs,
   exported by `tools/convert_hf.py export` and sampled with transformers `generate` on the held-out
   prompts (answer accuracy, response length). DPO's reward is the log-ratio against the SFT model,
   SimPO's beta * average log-prob (so its reward accuracy is its ranking accuracy).

Writes DIR/results.json, DIR/results.md (the tables printed at the end), DIR/ranking_accuracy.png,
and the data, runs, scores, exported models and logs under DIR. Deterministic given --seed.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a checkout without installing

# ----- the task ---------------------------------------------------------------------------------

PAD, BOS, EOS, SEP = 0, 1, 2, 3
DIGIT0 = 4  # digits 0-9 are tokens 4-13
OPS = ("copy", "shift", "reverse")  # tokens 14-16
OP0 = 14
WORDS = (32, 128)  # commentary word ids [lo, hi)
MAX_COMMENTARY = 12
VERBOSE_BIAS = 0.7  # injected pairs: share whose chosen response has the longer commentary
VOCAB = 128
VARIANTS = ("injected", "on_policy")


def answer(op: int, digits: list) -> list:
    """The correct answer digits for operator index ``op``."""
    if OPS[op] == "copy":
        return list(digits)
    if OPS[op] == "shift":
        return [(d + 1) % 10 for d in digits]
    return list(reversed(digits))


def parse_prompt(prompt) -> tuple:
    """(op index, digits) of a prompt [BOS, op, d1..dk, SEP]."""
    return int(prompt[1]) - OP0, [int(t) - DIGIT0 for t in prompt[2:-1]]


def answer_of(response: list) -> list:
    """The leading digit tokens of a response, as digits."""
    out = []
    for t in response:
        if not DIGIT0 <= t < DIGIT0 + 10:
            break
        out.append(t - DIGIT0)
    return out


def is_correct(prompt, response) -> bool:
    """The rule-based judge: the response starts with exactly the right answer."""
    return answer_of(response) == answer(*parse_prompt(prompt))


def task_prompts(num: int, rng, exclude: set, unique: bool = False) -> list:
    """``num`` prompts not in ``exclude`` (pairwise distinct with ``unique``; added to exclude)."""
    out = []
    while len(out) < num:
        op, k = int(rng.integers(len(OPS))), int(rng.integers(3, 7))
        digits = rng.integers(0, 10, size=k).tolist()
        prompt = [BOS, OP0 + op] + [DIGIT0 + d for d in digits] + [SEP]
        if tuple(prompt) in exclude:
            continue
        if unique:
            exclude.add(tuple(prompt))
        out.append(prompt)
    return out


def corrupt(ans: list, rng) -> list:
    """``ans`` with one error: a digit changed, dropped or inserted (uniformly)."""
    wrong, kind, pos = list(ans), int(rng.integers(3)), int(rng.integers(len(ans)))
    if kind == 0:
        wrong[pos] = (wrong[pos] + int(rng.integers(1, 10))) % 10
    elif kind == 1:
        del wrong[pos]
    else:
        wrong.insert(pos, int(rng.integers(10)))
    return wrong


def injected_pairs(prompts: list, rng) -> list:
    """(prompt, chosen, rejected): correct vs one injected error, verbosity-biased commentary."""
    pairs = []
    for prompt in prompts:
        ans = answer(*parse_prompt(prompt))
        short, long_ = sorted(rng.integers(0, MAX_COMMENTARY + 1, size=2).tolist())
        n_chosen, n_rejected = (long_, short) if rng.random() < VERBOSE_BIAS else (short, long_)
        words = lambda n: rng.integers(*WORDS, size=n).tolist()  # noqa: E731
        chosen = [DIGIT0 + d for d in ans] + words(n_chosen) + [EOS]
        rejected = [DIGIT0 + d for d in corrupt(ans, rng)] + words(n_rejected) + [EOS]
        pairs.append((prompt, chosen, rejected))
    return pairs


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two digit lists."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def judge(prompt, response) -> int:
    """The rule-based judge's score: minus the edit distance of the answer to the correct one."""
    return -edit_distance(answer_of(response), answer(*parse_prompt(prompt)))


def judged_pairs(prompts: list, samples: list) -> list:
    """On-policy pairs as in the paper's set-up: per prompt, the best- and the worst-judged of
    its samples (the first of equals), when their scores differ. Samples that hit the token limit
    without EOS are not candidates."""
    pairs = []
    for prompt, outs in zip(prompts, samples):
        done = [r for r in outs if r[-1] == EOS]
        if len(done) < 2:
            continue
        scores = [judge(prompt, r) for r in done]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] > scores[worst]:
            pairs.append((prompt, done[best], done[worst]))
    return pairs


# ----- study settings ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes, schedules and grids of one study."""

    num_train: int = 9600  # injected pairs; pref_steps * batch = one epoch of them
    num_dev: int = 256  # dev prompts/pairs: beta selection, training curves
    num_test: int = 512  # held-out prompts/pairs reported
    on_policy_prompts: tuple = (16000, 1600, 3200)  # sampled prompts for train, dev, held-out
    samples: int = 4  # samples per prompt (on-policy pairs; sampled generations)
    batch: int = 32  # pairs per optimizer step
    sft_steps: int = 1200
    sft_lr: float = 3e-3
    pref_steps: int = 300
    pref_lrs: tuple = (3e-4, 1e-3)  # peak lr grid (cosine, 10% warm-up), crossed with the betas
    eval_interval: int = 50
    simpo_betas: tuple = (2.0, 2.5, 10.0)
    gamma_beta_ratio: float = 0.5
    dpo_betas: tuple = (0.01, 0.1, 0.5)
    max_new_tokens: int = 24


# Enough SFT steps for the model to end its responses, so that its samples can be judged.
QUICK = Scale(num_train=64, num_dev=32, num_test=32, on_policy_prompts=(256, 64, 64),
              sft_steps=150, pref_steps=3, pref_lrs=(1e-3,), eval_interval=0, simpo_betas=(2.0,),
              dpo_betas=(0.1,))


def model_config():
    """The tiny Llama of the study (demo size, vocabulary of the task)."""
    from megasimpo.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=VOCAB,
                       max_position_embeddings=64, tie_word_embeddings=False, dtype="float32")


# ----- child processes --------------------------------------------------------------------------

def run_jobs(jobs: dict, log_dir: str, workers: int) -> None:
    """Runs {name: argv} as child processes, ``workers`` at a time, one thread each; stdout and
    stderr go to LOG_DIR/name.log. A failure raises with the log's tail."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))

    def one(name):
        log, t0 = os.path.join(log_dir, name + ".log"), time.perf_counter()
        for _ in range(2):  # two children may pick the same free port at once: retry that once
            with open(log, "w") as f:
                rc = subprocess.run(jobs[name], stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO).returncode
            with open(log) as f:
                text = f.read()
            if rc == 0 or "EADDRINUSE" not in text:
                break
        if rc:
            raise RuntimeError(f"{name} failed (exit {rc}): {' '.join(map(str, jobs[name]))}\n"
                               + "\n".join(text.splitlines()[-25:]))
        print(f"  {name:<36} {time.perf_counter() - t0:6.1f}s", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, list(jobs)))


def megasimpo(*args) -> list:
    """argv of a ``python -m megasimpo`` child."""
    return [sys.executable, "-m", "megasimpo", *map(str, args)]


def train_argv(load, run_dir, data, loss, steps, lr, scale, seed, *extra) -> list:
    """``megasimpo train`` on DATA/train with DATA/dev evaluation, single process, fp32."""
    return megasimpo("train", "--load", load, "--data", os.path.join(data, "train"),
                     "--eval-data", os.path.join(data, "dev"), "--out", run_dir, "--loss", loss,
                     "--steps", steps, "--lr", lr, "--global-batch-size", scale.batch,
                     "--micro-batch-size", scale.batch, "--eval-interval", scale.eval_interval,
                     "--seed", seed, "--precision", "fp32", *extra)


def score_job(ckpt: str, data: str, out_file: str) -> list:
    """``megasimpo score`` of every pair of DATA/all."""
    return megasimpo("score", "--load", ckpt, "--data", os.path.join(data, "all"), "--out",
                     out_file, "--micro-batch-size", 64)


def score_export_job(ckpt: str, data: str, scores_file: str, hf_dir: str) -> list:
    """One child that exports a model to HF format (for transformers ``generate``) and then
    scores DATA/all with it: the library functions behind ``tools/convert_hf.py export`` and
    ``megasimpo score``, in one process to spare a start-up of Megatron-Core per model."""
    return [sys.executable, os.path.abspath(__file__), "_score_export", ckpt,
            os.path.join(data, "all"), scores_file, hf_dir]


def _score_export(ckpt: str, data_prefix: str, scores_file: str, hf_dir: str) -> None:
    """The body of a score_export_job child."""
    from megasimpo.known_warnings import quiet_known_warnings
    from megasimpo.hf import export_hf
    from megasimpo.parallel.groups import destroy
    from megasimpo.score import score

    quiet_known_warnings()
    export_hf(ckpt, hf_dir, force=True, progress=False)
    try:
        score(ckpt, data_prefix, scores_file, micro_batch_size=64)
    finally:
        destroy()


# ----- data, scores and generations -------------------------------------------------------------

def write_splits(data: str, splits: dict) -> None:
    """DATA/{train,dev,test} and DATA/all (the three concatenated: one scoring pass per model)."""
    from megasimpo.data.indexed import write_pairs

    for name, pairs in splits.items():
        write_pairs(os.path.join(data, name), pairs, VOCAB)
    write_pairs(os.path.join(data, "all"), [p for name in ("train", "dev", "test")
                                            for p in splits[name]], VOCAB)


def read_scores(path: str, splits: dict) -> dict:
    """{split: [n, 4] chosen_logps, rejected_logps, chosen_tokens, rejected_tokens} of a score file
    over DATA/all."""
    from megasimpo.score import FIELDS

    with open(path) as f:
        table = np.array([[json.loads(line)[k] for k in FIELDS] for line in f if line.strip()])
    out, start = {}, 0
    for name in ("train", "dev", "test"):
        out[name] = table[start:start + len(splits[name])]
        start += len(splits[name])
    assert start == len(table), (path, start, len(table))
    return out


def write_reference(scores: np.ndarray, prefix: str) -> None:
    """SFT scores of one split as ``PREFIX.ref_logps.jsonl`` (DPO's --ref precomputed input)."""
    from megasimpo.score import default_scores_path, write_scores

    write_scores(default_scores_path(prefix), scores)


def pair_metrics(s: np.ndarray, ref: np.ndarray, kind: str) -> dict:
    """Ranking metrics of one model on one split; ``s``/``ref`` [n, 4] score rows (ref = SFT)."""
    from megasimpo.score import ranking_accuracy

    avg_w, avg_l = s[:, 0] / s[:, 2], s[:, 1] / s[:, 3]
    m = {"rank_acc": ranking_accuracy(s), "sum_rank_acc": float(np.mean(s[:, 0] > s[:, 1])),
         "avg_logp_chosen": float(avg_w.mean()), "avg_logp_rejected": float(avg_l.mean())}
    if kind == "dpo":  # beta * ((pi_w - ref_w) - (pi_l - ref_l)) > 0; beta > 0 drops out
        reward_ok = (s[:, 0] - ref[:, 0]) - (s[:, 1] - ref[:, 1]) > 0
        m["reward_acc"] = float(reward_ok.mean())
        # the paper's contingency: how often the DPO reward and the likelihood ranking agree
        m["reward_rank_agreement"] = float(np.mean(reward_ok == (avg_w > avg_l)))
    elif kind == "simpo":  # reward = beta * average log-prob: the ranking itself
        m["reward_acc"], m["reward_rank_agreement"] = m["rank_acc"], 1.0
    else:
        m["reward_acc"] = m["reward_rank_agreement"] = None  # the reference has no reward
    return m


def sample(hf_dir: str, prompts: list, num: int, greedy: bool, seed: int, max_new: int) -> list:
    """Per prompt, ``num`` responses (cut after EOS) of the HF model at ``hf_dir``."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # sampling is then bit-reproducible
    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    by_length, out = {}, [None] * len(prompts)
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    torch.manual_seed(seed)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0,
                                                   top_p=1.0)
    for plen, idx in sorted(by_length.items()):  # equal prompt lengths: no padding needed
        x = torch.tensor([prompts[i] for i in idx])
        with torch.no_grad():
            g = model.generate(x, attention_mask=torch.ones_like(x), num_return_sequences=num,
                               max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=PAD,
                               **kw)[:, plen:].tolist()
        for j, i in enumerate(idx):
            out[i] = [r[:r.index(EOS) + 1] if EOS in r else r for r in g[j * num:(j + 1) * num]]
    return out


def generation_metrics(hf_dir: str, prompts: list, scale: Scale, seed: int) -> dict:
    """Greedy and sampled (temperature 1) generations: answer accuracy and response length."""
    result = {}
    for mode, num in (("greedy", 1), ("sampled", scale.samples)):
        outs = sample(hf_dir, prompts, num, mode == "greedy", seed, scale.max_new_tokens)
        flat = [(p, r) for p, rs in zip(prompts, outs) for r in rs]
        result[mode] = {"answer_acc": float(np.mean([is_correct(p, r) for p, r in flat])),
                        "length": float(np.mean([len(r) for _, r in flat])),
                        "truncated": float(np.mean([r[-1] != EOS for _, r in flat]))}
    return result


def data_stats(splits: dict) -> dict:
    """Pair counts and response lengths of a variant's data."""
    lengths = np.array([[len(c), len(r)] for _, c, r in splits["train"]])
    return {"num_train": len(splits["train"]), "num_dev": len(splits["dev"]),
            "num_test": len(splits["test"]), "chosen_length": float(lengths[:, 0].mean()),
            "rejected_length": float(lengths[:, 1].mean()),
            "chosen_longer": float(np.mean(lengths[:, 0] > lengths[:, 1])),
            "chosen_shorter": float(np.mean(lengths[:, 0] < lengths[:, 1]))}


# ----- report -----------------------------------------------------------------------------------

def fmt(v, digits=3) -> str:
    """A table cell: numbers rounded, None as a dash."""
    return "—" if v is None else f"{v:.{digits}f}"


def markdown(res: dict) -> str:
    """The result tables (printed, saved as results.md, pasted into the doc)."""
    lines = []
    for variant in VARIANTS:
        v = res if variant == "injected" else res[variant]
        s = v["data"]
        lines += [f"### {variant} pairs", "", data_line(s), "",
                  "| model | beta | lr | rank acc train | rank acc held-out | reward acc train | "
                  "reward acc held-out | sum-logp rank acc held-out | avg logp chosen / rejected "
                  "held-out | answer acc greedy / sampled | mean sampled length (vs SFT) | "
                  "mean greedy length |", "|" + "---|" * 12]
        sft_len = v["sft"]["gen"]["sampled"]["length"]
        for name, label in (("sft", "SFT"), ("simpo", "SimPO"), ("dpo", "DPO")):
            r, g = v[name], v[name]["gen"]
            change = (g["sampled"]["length"] / sft_len - 1) * 100
            lr = "—" if r["lr"] is None else f"{r['lr']:g}"
            lines.append(
                f"| {label} | {fmt(r['beta'], 2)} | {lr} "
                f"| {fmt(r['train_rank_acc'])} | {fmt(r['eval_rank_acc'])} "
                f"| {fmt(r['train_reward_acc'])} | {fmt(r['eval_reward_acc'])} "
                f"| {fmt(r['eval_sum_rank_acc'])} "
                f"| {fmt(r['eval_avg_logp_chosen'], 2)} / {fmt(r['eval_avg_logp_rejected'], 2)} "
                f"| {fmt(g['greedy']['answer_acc'])} / {fmt(g['sampled']['answer_acc'])} "
                f"| {g['sampled']['length']:.2f} ({change:+.1f}%) | {g['greedy']['length']:.2f} |")
        d = v["dpo"]
        lines += ["", f"DPO reward ranking and average-log-likelihood ranking agree on "
                  f"{fmt(d['train_reward_rank_agreement'])} of train and "
                  f"{fmt(d['eval_reward_rank_agreement'])} of held-out pairs.", "",
                  "| loss | beta | lr | dev answer acc greedy / sampled | dev mean sampled length | "
                  "dev rank acc | dev reward acc | rank acc train | rank acc held-out | "
                  "reward acc held-out | selected |", "|" + "---|" * 11]
        for loss in ("simpo", "dpo"):
            for row in v["grid"][loss]:
                lines.append(
                    f"| {loss} | {row['beta']:g} | {row['lr']:g} "
                    f"| {fmt(row['dev_answer_acc_greedy'])} / "
                    f"{fmt(row['dev_answer_acc_sampled'])} | {row['dev_length_sampled']:.2f} "
                    f"| {fmt(row['dev_rank_acc'])} | {fmt(row['dev_reward_acc'])} "
                    f"| {fmt(row['train_rank_acc'])} | {fmt(row['eval_rank_acc'])} "
                    f"| {fmt(row['eval_reward_acc'])} | {'yes' if row['selected'] else ''} |")
        lines.append("")
    g = res["sft"]["dev_gen"]
    lines.append(f"SFT model on dev prompts: greedy / sampled answer accuracy "
                 f"{fmt(g['greedy']['answer_acc'])} / {fmt(g['sampled']['answer_acc'])}. "
                 f"Held-out generations: {res['data']['num_test']} prompts, greedy and "
                 f"{res['config']['scale']['samples']} samples each at temperature 1.")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: str) -> str:
    """ranking_accuracy.png: per variant, rank/reward accuracy, dev curves, generated lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megasimpo.metrics import read_metrics

    names, labels = ("sft", "simpo", "dpo"), ("SFT", "SimPO", "DPO")
    fig, all_axes = plt.subplots(len(VARIANTS), 3, figsize=(15, 4.0 * len(VARIANTS)))
    for variant, axes in zip(VARIANTS, all_axes):
        v = res if variant == "injected" else res[variant]
        ax, x = axes[0], np.arange(3)
        for k, (key, label) in enumerate((("train_rank_acc", "rank acc, train"),
                                          ("eval_rank_acc", "rank acc, held-out"),
                                          ("eval_reward_acc", "reward acc, held-out"))):
            vals = [np.nan if v[n][key] is None else v[n][key] for n in names]
            ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label, hatch="//" if k == 2 else None)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set(xticks=x, xticklabels=labels, ylim=(0, 1.05),
               title=f"{variant}: chosen ranked first (avg log-prob)")
        ax.legend(fontsize=8, loc="lower right")
        ax = axes[1]
        for loss, color in (("simpo", "C0"), ("dpo", "C3")):
            for row in v["grid"][loss]:
                rows = [r for r in read_metrics(os.path.join(out, "runs", row["name"]))
                        if "eval_rank_accuracy" in r]
                ax.plot([r["step"] for r in rows], [r["eval_rank_accuracy"] for r in rows],
                        color=color, lw=2.2 if row["selected"] else 0.9,
                        alpha=1.0 if row["selected"] else 0.45, marker="o", ms=2.5,
                        label=f"{loss} beta={row['beta']:g} lr={row['lr']:g}"
                        + (" *" if row["selected"] else ""))
        ax.set(xlabel="preference step", ylim=(0, 1.05),
               title=f"{variant}: dev likelihood-ranking accuracy (* selected)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", ncol=2)
        ax = axes[2]
        lengths = [v[n]["gen"]["sampled"]["length"] for n in names]
        ax.bar(labels, lengths, color=["gray", "C0", "C3"])
        for i, val in enumerate(lengths):
            ax.text(i, val, f"{val:.1f}", ha="center", va="bottom")
        ax.axhline(v["data"]["chosen_length"], color="k", ls="--", lw=0.8, label="train chosen")
        ax.axhline(v["data"]["rejected_length"], color="k", ls=":", lw=0.8, label="train rejected")
        ax.set(title=f"{variant}: mean sampled length, held-out prompts")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out, "ranking_accuracy.png")
    from megasimpo import atomic

    atomic.save_figure(fig, path)
    plt.close(fig)
    return path


# ----- the study --------------------------------------------------------------------------------

class Study:
    """The phases of one study under ``out`` (see the module docstring)."""

    def __init__(self, out: str, scale: Scale, seed: int, workers: int):
        self.out, self.scale, self.seed, self.workers = os.path.abspath(out), scale, seed, workers
        for sub in ("data", "runs", "scores", "hf", "logs"):  # a study always starts afresh
            shutil.rmtree(os.path.join(self.out, sub), ignore_errors=True)
        self.timings, self.splits, self.ref = {}, {}, {}
        self.sft = os.path.join(self.out, "runs", "sft", "final_model")

    def jobs(self, jobs: dict) -> None:
        """Child processes {name: argv}, logged under OUT/logs."""
        run_jobs(jobs, os.path.join(self.out, "logs"), self.workers)

    def timed(self, name, fn, *args):
        """``fn(*args)``, its wall time printed and kept as timings[name]."""
        t0 = time.perf_counter()
        result = fn(*args)
        self.timings[name] = time.perf_counter() - t0
        print(f"[study] {name}: {self.timings[name]:.1f}s", flush=True)
        return result

    def path(self, *parts) -> str:
        """A path under the study directory."""
        return os.path.join(self.out, *parts)

    def prepare(self) -> None:
        """Prompts, injected pairs, random init, SFT; SFT scores and export."""
        rng, held_out = np.random.default_rng(self.seed), set()
        s = self.scale
        self.prompts = {"dev": task_prompts(s.num_dev, rng, held_out, unique=True),
                        "test": task_prompts(s.num_test, rng, held_out, unique=True)}
        self.splits["injected"] = {name: injected_pairs(self.prompts[name], rng)
                                   for name in ("dev", "test")}
        self.splits["injected"]["train"] = injected_pairs(task_prompts(s.num_train, rng, held_out),
                                                          rng)
        num_train, num_dev, num_test = s.on_policy_prompts
        self.on_policy_prompts = {"dev": task_prompts(num_dev, rng, held_out, unique=True),
                                  "test": task_prompts(num_test, rng, held_out, unique=True)}
        self.on_policy_prompts["train"] = task_prompts(num_train, rng, held_out)
        write_splits(self.path("data", "injected"), self.splits["injected"])
        model = model_config()
        self.jobs({"init": [sys.executable, "-c",
                            "import sys; from megasimpo.config import ModelConfig; "
                            "from megasimpo.demo import write_random_model; "
                            f"write_random_model(sys.argv[1], ModelConfig(**{model.to_dict()!r}),"
                            f" {self.seed})", self.path("runs", "init")]})
        self.jobs({"sft": train_argv(self.path("runs", "init"), self.path("runs", "sft"),
                                     self.path("data", "injected"), "sft", s.sft_steps, s.sft_lr,
                                     s, self.seed)})
        self.jobs({"score_export_sft": score_export_job(
            self.sft, self.path("data", "injected"), self.path("scores", "injected_sft.jsonl"),
            self.path("hf", "sft"))})
        self.set_reference("injected")

    def set_reference(self, variant: str) -> None:
        """SFT scores of a variant's pairs: DPO's precomputed reference."""
        self.ref[variant] = read_scores(self.path("scores", f"{variant}_sft.jsonl"),
                                        self.splits[variant])
        for name in ("train", "dev"):
            write_reference(self.ref[variant][name], self.path("data", variant, name))

    def sample_on_policy(self) -> None:
        """Samples of the SFT model on fresh prompts, judged into pairs; SFT scores of them."""
        s, hf = self.scale, self.path("hf", "sft")
        splits = {}
        for k, name in enumerate(("train", "dev", "test")):
            prompts = self.on_policy_prompts[name]
            outs = sample(hf, prompts, s.samples, False, self.seed + 1 + k, s.max_new_tokens)
            splits[name] = judged_pairs(prompts, outs)
            print(f"  on-policy {name}: {len(prompts)} prompts x {s.samples} samples -> "
                  f"{len(splits[name])} pairs", flush=True)
        if len(splits["train"]) < s.batch or min(len(splits["dev"]), len(splits["test"])) < 1:
            raise RuntimeError(f"too few on-policy pairs: { {k: len(v) for k, v in splits.items()} }")
        self.splits["on_policy"] = splits
        write_splits(self.path("data", "on_policy"), splits)
        self.jobs({"score_on_policy_sft": score_job(self.sft, self.path("data", "on_policy"),
                                                    self.path("scores", "on_policy_sft.jsonl"))})
        self.set_reference("on_policy")

    def grid(self) -> dict:
        """SimPO and DPO runs over the beta grids of both variants; then score and export each."""
        s, grid, train, post = self.scale, {}, {}, {}
        for variant in VARIANTS:
            grid[variant] = {"simpo": [], "dpo": []}
            for loss, betas in (("simpo", s.simpo_betas), ("dpo", s.dpo_betas)):
                for lr, beta in ((lr, beta) for lr in s.pref_lrs for beta in betas):
                    name = f"{variant}_{loss}_beta{beta:g}_lr{lr:g}"
                    extra = ["--gamma-beta-ratio", s.gamma_beta_ratio] if loss == "simpo" \
                        else ["--ref", "precomputed"]
                    train[name] = train_argv(self.sft, self.path("runs", name),
                                             self.path("data", variant), loss, s.pref_steps, lr,
                                             s, self.seed, "--beta", beta, *extra)
                    ckpt = self.path("runs", name, "final_model")
                    post["score_export_" + name] = score_export_job(
                        ckpt, self.path("data", variant), self.path("scores", name + ".jsonl"),
                        self.path("hf", name))
                    grid[variant][loss].append({"name": name, "beta": beta, "lr": lr})
        self.timed("preference runs", self.jobs, train)
        self.timed("score+export", self.jobs, post)
        return grid

    def evaluate(self, grid: dict) -> dict:
        """Every model's pair metrics and generations; the beta selection."""
        from megasimpo.metrics import read_metrics

        def gen(hf):
            return {"gen": generation_metrics(hf, self.prompts["test"], self.scale, self.seed),
                    "dev_gen": generation_metrics(hf, self.prompts["dev"], self.scale, self.seed)}

        def metrics(variant, name, kind):
            s = read_scores(self.path("scores", name + ".jsonl"), self.splits[variant])
            return {f"{key}_{k}": v for split, key in (("train", "train"), ("dev", "dev"),
                                                        ("test", "eval"))
                    for k, v in pair_metrics(s[split], self.ref[variant][split], kind).items()}

        sft_gen, results = gen(self.path("hf", "sft")), {}
        for variant in VARIANTS:
            sft = metrics(variant, f"{variant}_sft", "sft")
            res = {"sft": {"beta": None, "lr": None, **sft, **sft_gen}}
            for loss, rows in grid[variant].items():
                for row in rows:
                    r = {**metrics(variant, row["name"], loss), **gen(self.path("hf", row["name"]))}
                    last = [m for m in read_metrics(self.path("runs", row["name"]))
                            if "eval_rank_accuracy" in m][-1]
                    row.update(result=r, dev_rank_acc=last["eval_rank_accuracy"],
                               dev_reward_acc=last["eval_rewards/accuracies"],
                               dev_answer_acc_greedy=r["dev_gen"]["greedy"]["answer_acc"],
                               dev_answer_acc_sampled=r["dev_gen"]["sampled"]["answer_acc"],
                               dev_length_sampled=r["dev_gen"]["sampled"]["length"],
                               train_rank_acc=r["train_rank_acc"], eval_rank_acc=r["eval_rank_acc"],
                               eval_reward_acc=r["eval_reward_acc"])
                # max() keeps the first of equal keys: full ties go to the smaller lr, then beta
                best = max(rows, key=lambda x: (x["dev_answer_acc_greedy"],
                                                x["dev_answer_acc_sampled"]))
                res[loss] = {"beta": best["beta"], "lr": best["lr"], "run": best["name"],
                             **best["result"]}
                for row in rows:
                    row["selected"] = row is best
                    del row["result"]
            res.update(grid=grid[variant], data=data_stats(self.splits[variant]))
            results[variant] = res
        return results

    def run(self) -> dict:
        """All phases; writes results.json, results.md and the plot; returns the results."""
        t0 = time.perf_counter()
        self.timed("data+init+sft", self.prepare)
        self.timed("on-policy pairs", self.sample_on_policy)
        grid = self.grid()
        per_variant = self.timed("evaluation+generation", self.evaluate, grid)
        results = {**per_variant["injected"], "on_policy": per_variant["on_policy"],
                   "seed": self.seed,
                   "config": {"scale": dataclasses.asdict(self.scale),
                              "model": model_config().to_dict(),
                              "task": {"ops": OPS, "commentary_words": WORDS[1] - WORDS[0],
                                       "max_commentary": MAX_COMMENTARY,
                                       "verbose_bias": VERBOSE_BIAS}}}
        return publish(self, results, markdown(results), t0, plot(results, self.out))


def data_line(s: dict, kind: str = "") -> str:
    """The sentence on a study's data (``s``: the splits' sizes and response lengths)."""
    return (f"{s['num_train']} train / {s['num_dev']} dev / {s['num_test']} held-out {kind}pairs; "
            f"mean train response length chosen {s['chosen_length']:.2f}, rejected "
            f"{s['rejected_length']:.2f} tokens; chosen longer in {fmt(s['chosen_longer'])}, "
            f"shorter in {fmt(s['chosen_shorter'])} of pairs.")


def publish(study, results: dict, table: str, t0: float, *also: str) -> dict:
    """A study's end: results.md and results.json (with its timings) written by rename, the
    table printed; returns ``results``. ``also``: other files it wrote, for the last line."""
    from megasimpo import atomic

    atomic.write_text(study.path("results.md"), table)
    study.timings["total"] = time.perf_counter() - t0
    results["timings_s"] = study.timings
    atomic.write_json(study.path("results.json"), results)
    print("\n" + table)
    wrote = [study.path("results.json"), study.path("results.md"), *also]
    print(f"[study] total {study.timings['total']:.1f}s; wrote {', '.join(wrote)}", flush=True)
    return results


def study_args(doc: str, argv: list):
    """The flags of this study and of its siblings (``--out --seed --jobs --quick``), parsed;
    also quiets the known third-party warnings the children would print."""
    from megasimpo.known_warnings import quiet_known_warnings

    quiet_known_warnings()
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="child processes at a time")
    p.add_argument("--quick", action="store_true",
                   help="a few steps and one beta each: checks the pipeline, not the outcome")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_score_export"]:
        return _score_export(*argv[1:])
    args = study_args(__doc__, argv)
    Study(args.out, QUICK if args.quick else Scale(), args.seed, args.jobs).run()


if __name__ == "__main__":
    main()
