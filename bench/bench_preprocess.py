"""Throughput of tools/preprocess_data.py's pipeline by worker count (figures printed, never asserted).

    python bench/bench_preprocess.py [--pairs 4000] [--workers 1 2 4] [--turns 2]

Generates synthetic conversational pairs (UltraFeedback layout, ``--turns`` user turns) into a
temporary JSONL, trains a small byte-level BPE tokenizer with a ChatML chat template on the same text
(built here: a bench must not depend on the tests), and times the whole pipeline (reading, chat
template, tokenization, writing, summary; pool start-up included) for each worker count.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasimpo.data.indexed import PairDataset  # noqa: E402
from megasimpo.data.preprocess import PreprocessConfig, run  # noqa: E402
from megasimpo.data.tokenize import load_encoder  # noqa: E402

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def synthetic_records(num_pairs: int, turns: int, seed: int = 0):
    """UltraFeedback-layout records of random words; chosen is longer on average."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" + "xyz"[i % 3] * (i % 4) for i in range(600)]

    def sentence(lo, hi):
        return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

    for _ in range(num_pairs):
        conv = []
        for t in range(turns):
            conv.append({"role": "user", "content": sentence(10, 60)})
            if t < turns - 1:
                conv.append({"role": "assistant", "content": sentence(20, 80)})
        yield {"prompt": conv[0]["content"],
               "chosen": conv + [{"role": "assistant", "content": sentence(40, 200)}],
               "rejected": conv + [{"role": "assistant", "content": sentence(30, 150)}]}


def build_tokenizer(out_dir: str, text_file: str, vocab_size: int = 2000) -> str:
    """Byte-level BPE trained on ``text_file``, wrapped as an HF tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train([text_file], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  additional_special_tokens=specials[:2])
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    """Generate data, build the tokenizer, time each worker count, print the table."""
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--turns", type=int, default=2, help="user turns per conversation")
    p.add_argument("--workers", type=int, nargs="+",
                   default=sorted({1, 2, min(4, cores), cores} - {0}))
    p.add_argument("--max-length", type=int, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as root:
        data = os.path.join(root, "pairs.jsonl")
        with open(data, "w") as f:
            for rec in synthetic_records(args.pairs, args.turns):
                f.write(json.dumps(rec) + "\n")
        tokenizer = build_tokenizer(os.path.join(root, "tok"), data)
        load_encoder(tokenizer)  # pay the one-off transformers imports before the first timing
        print(f"{args.pairs} pairs, {args.turns} user turns, {os.path.getsize(data) / 2**20:.1f} MiB "
              f"JSONL, {cores} CPU cores")
        print(f"{'workers':>7} {'seconds':>8} {'pairs/s':>9} {'tokens/s':>10}")
        reference = None
        for workers in args.workers:
            prefix = os.path.join(root, f"out_w{workers}", "ds")
            config = PreprocessConfig(inputs=(data,), tokenizer=tokenizer, out=prefix,
                                      workers=workers, max_length=args.max_length)
            start = time.perf_counter()
            (summary,) = run(config, progress=False)
            seconds = time.perf_counter() - start
            tokens = int(PairDataset(prefix).lengths().sum())
            print(f"{workers:>7} {seconds:>8.2f} {summary['pairs_out'] / seconds:>9.0f} "
                  f"{tokens / seconds:>10.0f}")
            with open(prefix + ".bin", "rb") as f:
                digest = hash(f.read())
            reference = digest if reference is None else reference
            if digest != reference:
                print(f"  note: output with {workers} workers differs from the first run")
        print(f"length bias: {summary['length_bias']['verdict']} "
              f"({summary['length_bias']['mean_chosen_minus_rejected']:+.1f} tokens)")


if __name__ == "__main__":
    main()
