"""Length-normalisation ablation (issue #17 item 3): SimPO vs DPO vs DPO-norm on the same pairs.

    python examples/length_norm_ablation.py --out DIR [--seed 0] [--jobs 2] [--quick]

The SimPO paper (arXiv 2405.14734) credits the length normalisation of its reward (the average
log-prob instead of the sum) with keeping the learned reward margin from following the length
difference of a pair, and responses from growing. This script separates the two ingredients
that differ between SimPO and DPO: DPO-norm (``--loss dpo_norm``, TRL's ``sigmoid_norm``) keeps
DPO's reference but normalises each log-ratio by its response length, as SimPO normalises its
reward; SimPO also drops the reference and adds the target margin.

The machinery is examples/ranking_accuracy.py's, imported, not copied: the same task (digit
rules), the same injected-error pairs with their verbosity bias (the chosen response has the
longer commentary in 70% of pairs: a length trap), the same SFT model trained through the CLI,
the same scoring, export and generation, and the same selection rule (dev greedy answer accuracy,
ties by sampled). Only the injected pairs are used (no on-policy set). Each loss gets a beta x lr
grid of its own; DPO and DPO-norm use the SFT model's scores as ``--ref precomputed``.

Per model, on held-out pairs: likelihood-ranking accuracy (average log-prob), the loss's OWN
implicit reward accuracy (SimPO beta x avg; DPO summed log-ratio; DPO-norm per-token log-ratio),
that reward accuracy split by whether chosen is the longer or the shorter response (a reward that
follows length wins the first and loses the second), the Spearman correlation of the reward
margin with the length difference (n_w - n_l), and generated length and answer accuracy.

Writes DIR/results.json and DIR/results.md (printed at the end), with data, runs, scores,
exports and logs under DIR. Deterministic given --seed.
"""

import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranking_accuracy as ra  # noqa: E402  (the sibling study: task, jobs, scoring, generation)

LOSSES = ("simpo", "dpo", "dpo_norm")
LABELS = {"sft": "SFT", "simpo": "SimPO", "dpo": "DPO", "dpo_norm": "DPO-norm"}


@dataclasses.dataclass(frozen=True)
class Scale(ra.Scale):
    """ranking_accuracy's sizes and SFT; this study's grids. DPO-norm's betas are DPO's times
    roughly the mean response length (~12 tokens), the scale of its per-token log-ratios."""

    pref_lrs: tuple = (1e-4, 3e-4)  # 3e-4, the grid edge there, won every selection there
    simpo_betas: tuple = (2.0, 10.0)
    dpo_betas: tuple = (0.1, 0.5)
    dpo_norm_betas: tuple = (1.0, 5.0)


QUICK = Scale(num_train=64, num_dev=16, num_test=16, on_policy_prompts=(1, 1, 1), samples=2,
              sft_steps=20, pref_steps=3, pref_lrs=(1e-3,), eval_interval=0, simpo_betas=(2.0,),
              dpo_betas=(0.1,), dpo_norm_betas=(1.0,), max_new_tokens=12)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation, ties given their average rank (None if either is constant)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: the mean of their ranks
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def reward_margin(s: np.ndarray, ref: np.ndarray, loss: str) -> np.ndarray:
    """The implicit reward margin per pair, beta left out (beta > 0 changes no sign or rank);
    ``s``/``ref`` [n, 4] score rows (ref = SFT). SFT: the average log-prob margin."""
    if loss in ("sft", "simpo"):
        return s[:, 0] / s[:, 2] - s[:, 1] / s[:, 3]
    h_w, h_l = s[:, 0] - ref[:, 0], s[:, 1] - ref[:, 1]
    if loss == "dpo":
        return h_w - h_l
    return h_w / s[:, 2] - h_l / s[:, 3]  # dpo_norm: per-token log-ratios


def pair_metrics(s: np.ndarray, ref: np.ndarray, loss: str) -> dict:
    """ranking_accuracy's ranking metrics plus the length diagnostics of one model on one split."""
    m = ra.pair_metrics(s, ref, "sft")  # rank_acc, sum_rank_acc, avg logps (no reward there)
    margin, dlen = reward_margin(s, ref, loss), s[:, 2] - s[:, 3]
    ok = margin > 0
    m.update(reward_acc=None if loss == "sft" else float(ok.mean()),
             reward_acc_chosen_longer=float(ok[dlen > 0].mean()) if (dlen > 0).any() else None,
             reward_acc_chosen_shorter=float(ok[dlen < 0].mean()) if (dlen < 0).any() else None,
             margin_length_spearman=spearman(margin, dlen))
    return m


class Ablation(ra.Study):
    """ranking_accuracy's Study on the injected pairs only, with the three losses."""

    def grid(self) -> dict:
        """The runs of every loss's beta x lr grid; then score and export each."""
        s, grid, train, post = self.scale, {}, {}, {}
        data = self.path("data", "injected")
        betas = {"simpo": s.simpo_betas, "dpo": s.dpo_betas, "dpo_norm": s.dpo_norm_betas}
        for loss in LOSSES:
            grid[loss] = []
            for lr, beta in ((lr, beta) for lr in s.pref_lrs for beta in betas[loss]):
                name = f"{loss}_beta{beta:g}_lr{lr:g}"
                extra = ["--gamma-beta-ratio", s.gamma_beta_ratio] if loss == "simpo" \
                    else ["--ref", "precomputed"]
                train[name] = ra.train_argv(self.sft, self.path("runs", name), data, loss,
                                            s.pref_steps, lr, s, self.seed, "--beta", beta, *extra)
                post["score_export_" + name] = ra.score_export_job(
                    self.path("runs", name, "final_model"), data,
                    self.path("scores", name + ".jsonl"), self.path("hf", name))
                grid[loss].append({"name": name, "beta": beta, "lr": lr})
        self.timed("preference runs", self.jobs, train)
        self.timed("score+export", self.jobs, post)
        return grid

    def evaluate(self, grid: dict) -> dict:
        """Every model's pair metrics and generations; the selection per loss."""
        splits, ref = self.splits["injected"], self.ref["injected"]

        def model(name, loss, hf):
            sc = ra.read_scores(self.path("scores", name + ".jsonl"), splits)
            r = {f"{key}_{k}": v for split, key in (("train", "train"), ("dev", "dev"),
                                                     ("test", "eval"))
                 for k, v in pair_metrics(sc[split], ref[split], loss).items()}
            r["gen"] = ra.generation_metrics(hf, self.prompts["test"], self.scale, self.seed)
            r["dev_gen"] = ra.generation_metrics(hf, self.prompts["dev"], self.scale, self.seed)
            return r

        res = {"sft": {"beta": None, "lr": None,
                       **model("injected_sft", "sft", self.path("hf", "sft"))}}
        for loss, rows in grid.items():
            for row in rows:
                row["result"] = model(row["name"], loss, self.path("hf", row["name"]))
            # the first of equal keys wins: full ties go to the smaller lr, then beta
            best = max(rows, key=lambda x: (x["result"]["dev_gen"]["greedy"]["answer_acc"],
                                            x["result"]["dev_gen"]["sampled"]["answer_acc"]))
            res[loss] = {"beta": best["beta"], "lr": best["lr"], "run": best["name"],
                         **best["result"]}
            for row in rows:
                row["selected"] = row is best
        res["grid"] = grid
        res["data"] = ra.data_stats(splits)
        return res

    def run(self) -> dict:
        """All phases; writes results.json and results.md; returns the results."""
        t0 = time.perf_counter()
        self.timed("data+init+sft", self.prepare)
        grid = self.grid()
        results = self.timed("evaluation+generation", self.evaluate, grid)
        results.update(seed=self.seed, config={
            "scale": dataclasses.asdict(self.scale), "model": ra.model_config().to_dict(),
            "task": {"ops": ra.OPS, "commentary_words": ra.WORDS[1] - ra.WORDS[0],
                     "max_commentary": ra.MAX_COMMENTARY, "verbose_bias": ra.VERBOSE_BIAS}})
        return ra.publish(self, results, markdown(results), t0)


def _row(label, r, sft_len) -> str:
    """One model's row of the main table."""
    fmt, g = ra.fmt, r["gen"]
    lr = "—" if r["lr"] is None else f"{r['lr']:g}"
    return (f"| {label} | {fmt(r['beta'], 2)} | {lr} | {fmt(r['train_rank_acc'])} "
            f"| {fmt(r['eval_rank_acc'])} | {fmt(r['eval_reward_acc'])} "
            f"| {fmt(r['eval_reward_acc_chosen_longer'])} / "
            f"{fmt(r['eval_reward_acc_chosen_shorter'])} "
            f"| {fmt(r['eval_margin_length_spearman'], 2)} "
            f"| {fmt(g['greedy']['answer_acc'])} / {fmt(g['sampled']['answer_acc'])} "
            f"| {g['sampled']['length']:.2f} ({(g['sampled']['length'] / sft_len - 1) * 100:+.1f}%) "
            f"| {g['greedy']['length']:.2f} |")


def markdown(res: dict) -> str:
    """The result tables (printed, saved as results.md, pasted into the doc)."""
    fmt = ra.fmt
    lines = [ra.data_line(res["data"], "injected "), "",
             "| model | beta | lr | rank acc train | rank acc held-out | reward acc held-out | "
             "reward acc held-out, chosen longer / shorter | reward margin vs length diff "
             "(Spearman, held-out) | answer acc greedy / sampled | mean sampled length (vs SFT) "
             "| mean greedy length |", "|" + "---|" * 11]
    sft_len = res["sft"]["gen"]["sampled"]["length"]
    for name in ("sft",) + LOSSES:
        lines.append(_row(LABELS[name], res[name], sft_len))
    lines += ["", "SFT has no reward: its chosen longer / shorter and Spearman columns use the "
              "average log-prob margin (the likelihood ranking) instead.", "",
              "| loss | beta | lr | dev answer acc greedy / sampled | dev mean sampled length "
              "| rank acc held-out | reward acc held-out | chosen longer / shorter | "
              "margin-length Spearman | selected |", "|" + "---|" * 10]
    for loss in LOSSES:
        for row in res["grid"][loss]:
            r, d = row["result"], row["result"]["dev_gen"]
            lines.append(f"| {LABELS[loss]} | {row['beta']:g} | {row['lr']:g} "
                         f"| {fmt(d['greedy']['answer_acc'])} / {fmt(d['sampled']['answer_acc'])} "
                         f"| {d['sampled']['length']:.2f} | {fmt(r['eval_rank_acc'])} "
                         f"| {fmt(r['eval_reward_acc'])} "
                         f"| {fmt(r['eval_reward_acc_chosen_longer'])} / "
                         f"{fmt(r['eval_reward_acc_chosen_shorter'])} "
                         f"| {fmt(r['eval_margin_length_spearman'], 2)} "
                         f"| {'yes' if row['selected'] else ''} |")
    lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Entry point."""
    args = ra.study_args(__doc__, sys.argv[1:] if argv is None else argv)
    Ablation(args.out, QUICK if args.quick else Scale(), args.seed, args.jobs).run()


if __name__ == "__main__":
    main()
