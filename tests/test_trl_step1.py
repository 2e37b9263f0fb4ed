"""megasimpo's first steps equal TRL's (trl 1.16.0) on the same tiny HF Llama and pairs.

For SimPO and AlphaPO against ``trl.experimental.cpo.CPOTrainer`` (``loss_type="simpo"`` with
``cpo_alpha=0``, ``loss_type="alphapo"``), for DPO and DPO-norm against ``trl.DPOTrainer``
(``loss_type="sigmoid"``, ``"sigmoid_norm"``), both in fp32 on the CPU:

- the model: a random ``LlamaForCausalLM`` (tests/hf/hf_models.py ``llama3``: GQA, Llama-3 RoPE
  scaling, untied), imported with ``megasimpo.hf.import_hf``; DPO's reference is another random
  Llama of the same shape, given to TRL as ``ref_model`` and to megasimpo as ``--ref precomputed``
  (its summed log-probs from a transformers forward), so that rewards and margins are not 0;
- the pairs: random token ids of varied lengths, handed to TRL as text through a word-level
  tokenizer (id i <-> word "t<i>") that gives back exactly these ids (checked on TRL's tokenized
  datasets); TRL appends EOS to each response, so megasimpo's responses end with EOS;
- one batch of all pairs per step, constant lr, Adam(W) without weight decay, clip 1.0; two steps.

Step 1's row is computed on the initial weights in both (TRL logs the loss its ``compute_loss``
returned in that step, megasimpo the loss of that step's forward): loss, rewards, log-probs and
grad_norm (the gradient before clipping) agree within 1e-4. Step 2's loss and rewards check the
update (gradients through Adam's first step) as well.
"""

import json
import os
import sys

import pytest

from multirank import run_main

pytest.importorskip("trl")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
import hf_models  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from bench_trl import SPECIALS, build_tokenizer as word_tokenizer  # noqa: E402

# SPECIALS are ids 0-3; pair ids are drawn from 4 up. word_tokenizer(vocab): id i <-> "t<i>".
EOS = 2
NUM_PAIRS, LR, STEPS, TOL = 6, 1e-3, 2, 1e-4
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")
# name: (megasimpo flags, TRL trainer, TRL config). TRL's simpo_gamma is beta x gamma_beta_ratio.
CASES = {
    "simpo": (["--beta", "2.0", "--gamma-beta-ratio", "0.5"], "cpo",
              dict(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0)),
    "alphapo": (["--beta", "2.5", "--gamma-beta-ratio", "0.4", "--alphapo-alpha", "0.25"], "cpo",
                dict(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=1.0)),
    "dpo": (["--beta", "0.1"], "dpo", dict(loss_type="sigmoid", beta=0.1)),
    "dpo_norm": (["--beta", "2.0"], "dpo", dict(loss_type="sigmoid_norm", beta=2.0)),
}


def random_pairs(vocab: int, seed: int = 0) -> list:
    """(prompt, chosen, rejected) ids, lengths varied so rows are padded; responses end in EOS."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(len(SPECIALS), vocab, (n,), generator=g).tolist()

    return [(ids(3, 9), ids(2, 10) + [EOS], ids(2, 10) + [EOS]) for _ in range(NUM_PAIRS)]


def texts(pairs, with_eos: bool) -> dict:
    """TRL's text columns. Responses start with a space (TRL tokenizes prompt + response as one
    string); CPOTrainer appends the EOS id itself, DPOTrainer only when the text lacks "<eos>"."""
    def words(ids):
        return " ".join(SPECIALS[i] if i < len(SPECIALS) else f"t{i}" for i in ids)

    cut = slice(None) if with_eos else slice(None, -1)
    return {"prompt": [words(p) for p, _, _ in pairs],
            "chosen": [" " + words(c[cut]) for _, c, _ in pairs],
            "rejected": [" " + words(r[cut]) for _, _, r in pairs]}


def check_tokens(trainer, kind: str, pairs) -> None:
    """TRL's tokenized rows are exactly the pairs' ids (prompt masked out of the loss)."""
    ds = trainer.train_dataset
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        row = ds[i]
        if kind == "dpo":
            got = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
            assert got == (prompt, chosen, rejected), (i, got)
        else:
            for side, resp in (("chosen", chosen), ("rejected", rejected)):
                assert row[f"{side}_input_ids"] == prompt + resp, (i, side)
                assert row[f"{side}_labels"] == [-100] * len(prompt) + resp, (i, side)


def ref_sums(hf_dir: str, pairs) -> list:
    """[chosen_logps, rejected_logps, chosen_tokens, rejected_tokens] per pair, summed response
    log-probs of the HF model at ``hf_dir`` (a plain transformers forward)."""
    model = hf_models.load(hf_dir)
    rows = []
    for prompt, chosen, rejected in pairs:
        row = []
        for resp in (chosen, rejected):
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            row.append(lp[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum().item())
        rows.append(row + [len(chosen), len(rejected)])
    return rows


def trl_rows(name: str, policy: str, ref: str, pairs, workdir: str) -> list:
    """TRL's logged rows of steps 1..STEPS."""
    import dataclasses

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    _, kind, loss_kw = CASES[name]
    if kind == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    vocab = hf_models.MODELS["llama3"][1]["vocab_size"]
    # transformers >= 5.23 renamed gradient_checkpointing (TRL's configs default it to True).
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in
            {f.name for f in dataclasses.fields(Config)} else "gradient_checkpointing")
    cfg = Config(output_dir=workdir, max_length=64, per_device_train_batch_size=NUM_PAIRS,
                 max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                 weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, use_cpu=True, bf16=False,
                 report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                 dataloader_num_workers=0, remove_unused_columns=False, **{ckpt: False},
                 **loss_kw)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    extra = {"ref_model": AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32)} \
        if kind == "dpo" else {}
    trainer = Trainer(model=model, args=cfg, processing_class=word_tokenizer(vocab),
                      train_dataset=Dataset.from_dict(texts(pairs, with_eos=kind == "dpo")),
                      **extra)
    check_tokens(trainer, kind, pairs)
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), trainer.state.log_history
    return rows


def megasimpo_rows(name: str, ckpt: str, data: str, out: str) -> list:
    """megasimpo's metrics.jsonl rows of steps 1..STEPS (one CLI run)."""
    flags, kind, _ = CASES[name]
    ref = ["--ref", "precomputed"] if kind == "dpo" else []
    p = run_main(
        "megasimpo",
        ["train", "--load", ckpt, "--data", data, "--out", out,
         "--loss", name, *flags, *ref, "--steps", str(STEPS), "--lr", str(LR), "--min-lr", str(LR),
         "--warmup-ratio", "0", "--global-batch-size", str(NUM_PAIRS),
         "--micro-batch-size", str(NUM_PAIRS), "--precision", "fp32", "--seed", "0"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), rows
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Policy and reference HF models, the policy imported, the pairs written with the
    reference's scores as the precomputed reference file."""
    from megasimpo.data.indexed import write_pairs
    from megasimpo.hf import import_hf
    from megasimpo.score import default_scores_path, write_scores

    root = tmp_path_factory.mktemp("trl_step1")
    policy = hf_models.build("llama3", str(root / "policy"), seed=0, tokenizer=False)
    ref = hf_models.build("llama3", str(root / "ref"), seed=1, tokenizer=False)
    ckpt = str(root / "ckpt")
    import_hf(policy, ckpt, progress=False)
    vocab = hf_models.MODELS["llama3"][1]["vocab_size"]
    pairs = random_pairs(vocab)
    data = str(root / "data")
    write_pairs(data, pairs, vocab)
    import numpy as np

    write_scores(default_scores_path(data), np.array(ref_sums(ref, pairs)))
    return dict(root=root, policy=policy, ref=ref, ckpt=ckpt, data=data, pairs=pairs)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(CASES))
def test_steps_equal_trl(name, setup):
    s = setup
    ours = megasimpo_rows(name, s["ckpt"], s["data"], str(s["root"] / f"run_{name}"))
    theirs = trl_rows(name, s["policy"], s["ref"], s["pairs"], str(s["root"] / f"trl_{name}"))
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        for key in METRICS + (("grad_norm",) if step == 1 else ()):
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), (name, step, key, a, b)
    if CASES[name][1] == "dpo":  # the reference is another model: rewards are not trivially 0
        assert abs(theirs[0]["rewards/margins"]) > 10 * TOL
    assert ours[1]["loss"] != pytest.approx(ours[0]["loss"], abs=10 * TOL)  # step 2 moved
