"""TRL's SimPO on the benchmark's shape and pairs: the ``trl_simpo`` row beside bench_step.py's.

    python bench/bench_trl.py                                   # 8b-width, seq 4096, 8 pairs/step
    python bench/bench_trl.py --gradient-checkpointing --tag gc # the retry when the above is OOM
    python bench/bench_trl.py --param-dtype bf16 --tag bf16     # pure bf16 (see the caveat below)
    python bench/bench_trl.py --shape 1b --tag 1b
    python bench/bench_trl.py --shape tiny --steps 1 --warmup 1 # CPU smoke run (the test)

What it measures. ``trl.experimental.cpo.CPOTrainer`` (trl 1.16.0) with ``loss_type="simpo"``,
``cpo_alpha=0`` (pure SimPO, no NLL term), ``beta=2.0``, ``simpo_gamma=1.0`` (TRL's gamma is the
absolute margin: gamma / beta = our gamma_beta_ratio 0.5), AdamW (the Trainer's default, fused),
lr 6e-7 cosine, max_grad_norm 1.0, on a ``transformers.LlamaForCausalLM`` with random weights built
from bench/synthetic.py's shape through ``megasimpo.hf.mapping.hf_config`` (attention:
flash_attention_2 when flash-attn imports on CUDA, else sdpa). Precision on CUDA: ``bf16=True``
(bf16 autocast) over fp32 weights, so AdamW updates fp32 weights and states, numerically what our
fp32 master weights do. ``--param-dtype bf16`` stores the weights (and so AdamW's states) in bf16,
what a bf16 checkpoint loads as in transformers >= 5: the least memory TRL can need on one GPU, but
at lr 6e-7 nearly every bf16 weight update rounds away (on the tiny CPU shape 0.7% of the weights
change in 2 steps, against 75% in fp32), so that row times a configuration that does not train.
On CPU: fp32, no autocast.

Data. Exactly ``synthetic.random_pairs`` (seed 0): every prompt + response is seq_length + 1 ids.
CPOTrainer only takes text (``tokenize_row`` rejects anything but str), so a word-level tokenizer is
built on the fly: id i <-> word "t<i>" (ids 0-3, which random_pairs never draws, are <pad> <bos>
<eos> <unk>), whitespace split, responses written with a leading space, so each id round-trips to
itself; the script checks that every tokenized row is exactly prompt + response + [eos] and raises
otherwise. What TRL adds: no BOS (the tokenizer has none, so ``add_bos_token_if_needed`` adds
nothing) and one EOS after each response (``add_eos_token_if_needed`` always appends one), so TRL
forwards seq_length + 2 tokens per sequence where we forward seq_length (nothing is truncated:
max_length = seq_length + 2). Chosen and rejected go through the model as one batch of 2 x micro
rows, as in our engine; all rows have the same length, so there is no padding.

Figures, over the ``--steps`` timed optimizer steps after ``--warmup``: step_time_s (mean, from
TrainerCallback.on_step_begin to on_step_end, torch.cuda.synchronize at both; the micro-batches'
collation, done by the Trainer before on_step_begin, is outside; step_interval_s, from one
on_step_end to the next, includes it), tokens_per_sec with OUR accounting (2 x pairs x seq_length
per step, what bench_step.py counts), tflops_per_gpu and mfu with OUR formula
(``megasimpo.metrics.step_flops(shape, seq_length, 2 x pairs)``, ``peak_tflops``; mfu null on CPU),
so TRL's two extra positions per sequence are not credited. input_tokens_per_step is what the model
really received per step (counted by a forward pre-hook). mem_peak_gb: ``megasimpo.metrics.
peak_memory_gb`` (torch.cuda.max_memory_allocated of the whole process, or peak RSS on CPU), plus
mem_reserved_peak_gb on CUDA. Any failure (CUDA OOM above all) is recorded as the row's ``error``
with the figures null.

Where results go: merged into ``--out`` (default bench/results/<device>.json, bench/report.py) as
``runs["<shape>[-<tag>]"] = {"trl_simpo": row, "trl_config": config}``; the top-level ``trl_simpo``
row mirrors the *primary* run only, the same rule as bench_step.py: no ``--tag`` and the device's
default shape (8b-width on CUDA, tiny on CPU). Every row carries the same key set, so a new run
replaces an old row whole (its ``error`` included); other keys of the file are never touched.

Environment on the GPU machine: the project's install plus the ``bench`` extra
(``pip install -e ".[bench]"``): trl==1.16.0, which pulls accelerate>=1.10.1 (beside datasets,
transformers, pandas, pyarrow, huggingface_hub, jinja2, psutil, numpy, pyyaml that the project
already needs); flash-attn optional (without it: sdpa, recorded in trl_config).
"""

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import report  # noqa: E402
import synthetic  # noqa: E402

TRL_VERSION = "1.16.0"  # the version this script was written against (setup.py extras pin it)
BETA, GAMMA, LR = 2.0, 1.0, 6e-7  # SimPO defaults: gamma = beta x gamma_beta_ratio 0.5
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0-3; random_pairs draws ids >= 4 only
ROW_KEYS = ("step_time_s", "tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb",
            "mem_reserved_peak_gb", "step_times_s", "step_interval_s", "input_tokens_per_step",
            "train_loss", "loss_finite", "micro_batch_size", "num_microbatches",
            "gradient_checkpointing", "error")
# trl_config entries resolved while measuring (None when the run failed before them).
INFO_KEYS = ("attn_implementation", "optim", "bf16_autocast", "gradient_checkpointing_kwargs",
             "max_length", "tokens_per_sequence", "prompt_length", "response_length",
             "tokens_added")
TABLE = ["step_time_s", "tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb",
         "input_tokens_per_step", "gradient_checkpointing"]


def parse_args(argv=None):
    """Command-line options; defaults depend on whether CUDA is present."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    synthetic.add_workload_args(p)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="HF activation checkpointing (every decoder layer)")
    p.add_argument("--param-dtype", choices=["bf16", "fp32"], default="fp32",
                   help="dtype of the weights and AdamW states (default fp32; bf16 autocast runs "
                        "on CUDA either way)")
    p.add_argument("--seed", type=int, default=0, help="data and weight seed")
    args = p.parse_args(argv)
    synthetic.check_workload_args(p, args)
    if args.global_batch_size % args.micro_batch_size:
        p.error(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                f"--micro-batch-size {args.micro_batch_size}")
    return args


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer: id i <-> "t<i>" (0-3: SPECIALS), whitespace split, no BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    vocab.update((f"t{i}", i) for i in range(len(SPECIALS), vocab_size))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # bos_token unset on purpose: TRL then adds none (it always appends the EOS).
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def pair_texts(pairs) -> dict:
    """(prompt, chosen, rejected) id lists -> TRL's {"prompt", "chosen", "rejected"} text columns.

    Responses start with a space: TRL tokenizes ``prompt + response`` as one string.
    """
    def words(ids):
        return " ".join(f"t{i}" for i in ids)

    cols = {"prompt": [], "chosen": [], "rejected": []}
    for prompt, chosen, rejected in pairs:
        cols["prompt"].append(words(prompt))
        cols["chosen"].append(" " + words(chosen))
        cols["rejected"].append(" " + words(rejected))
    return cols


def check_tokenized(dataset, pairs, eos_id: int) -> int:
    """Raises unless every row is prompt + response + [eos] with the prompt masked; returns its
    length (tokens per sequence, the same for every row)."""
    cols = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    rows = dataset.select_columns(cols).to_dict()
    lengths = set()
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = rows[f"{side}_input_ids"][i], rows[f"{side}_labels"][i]
            want_labels = [-100] * len(prompt) + response + [eos_id]
            if ids != prompt + response + [eos_id] or labels != want_labels:
                raise RuntimeError(f"pair {i} {side}: TRL's tokens differ from the synthetic ids "
                                   f"+ [eos] (got {len(ids)} ids)")
            lengths.add(len(ids))
    assert len(lengths) == 1, lengths
    return lengths.pop()


def attn_implementation() -> str:
    """flash_attention_2 when flash-attn is importable on CUDA, else sdpa."""
    from transformers.utils import is_flash_attn_2_available

    flash = torch.cuda.is_available() and is_flash_attn_2_available()
    return "flash_attention_2" if flash else "sdpa"


def build_model(model_cfg, dtype: torch.dtype, attn: str, device: str):
    """Random-weight ``LlamaForCausalLM`` of ``model_cfg`` (via hf_config), made on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megasimpo.hf.mapping import hf_config

    config = LlamaConfig.from_dict(hf_config(model_cfg))
    with torch.device(device):  # created in place and in ``dtype``: no fp32 or host copy first
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)


class StepTimer:
    """TrainerCallback pieces: times the optimizer steps after ``warmup`` and counts the tokens
    the model received in each (``hook`` is a forward pre-hook for the model)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.cuda = torch.cuda.is_available()
        self.times, self.intervals, self.inputs = [], [], []
        self._t0 = self._last_end = None
        self._num_inputs = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        # Padding would show as mask zeros; there is none (every row has the same length). Kept a
        # tensor until on_step_end: no device sync inside the step.
        self._num_inputs = self._num_inputs + (ids.numel() if mask is None else mask.sum())

    def callback(self):
        """The transformers.TrainerCallback that drives this timer."""
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._num_inputs = 0
                timer._t0 = timer._now()

            def on_step_end(self, args, state, control, **kwargs):
                t = timer._now()
                if state.global_step > timer.warmup:  # global_step counts this step already
                    timer.times.append(t - timer._t0)
                    timer.inputs.append(int(timer._num_inputs))
                    if timer._last_end is not None:
                        timer.intervals.append(t - timer._last_end)
                timer._last_end = t

        return _Callback()


def build_trainer(args, model_cfg, pairs: list, workdir: str, info: dict, callbacks=()):
    """CPOTrainer (pure SimPO) over ``pairs`` on a random-weight model of ``model_cfg``.

    ``info`` gets the resolved TRL settings (INFO_KEYS) as they become known, so that a run that
    fails (CUDA OOM) still reports them. Raises unless TRL's tokenized rows are exactly the pairs'
    ids + [eos].
    """
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer(model_cfg.vocab_size)
    attn = info["attn_implementation"] = attn_implementation()
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.param_dtype == "bf16" else torch.float32
    model = build_model(model_cfg, dtype, attn, "cuda" if cuda else "cpu")
    # transformers >= 5.23 renamed gradient_checkpointing (TRL's configs default it to True).
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in
            {f.name for f in dataclasses.fields(CPOConfig)} else "gradient_checkpointing")
    cfg = CPOConfig(
        output_dir=workdir, loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=GAMMA,
        max_length=args.seq_length + 2,  # prompt + response (seq_length + 1) + TRL's EOS
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="cosine",
        bf16=args.param_dtype == "bf16" or cuda, **{ckpt: args.gradient_checkpointing},
        remove_unused_columns=False, report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=cuda, use_cpu=not cuda, seed=args.seed, data_seed=args.seed)
    trainer = CPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict(pair_texts(pairs)),
                         processing_class=tokenizer, callbacks=list(callbacks))
    seq_tokens = check_tokenized(trainer.train_dataset, pairs, tokenizer.eos_token_id)
    info.update(optim=getattr(cfg.optim, "value", str(cfg.optim)), bf16_autocast=cfg.bf16,
                gradient_checkpointing_kwargs=getattr(cfg, f"{ckpt}_kwargs", None),
                max_length=cfg.max_length, tokens_per_sequence=seq_tokens,
                prompt_length=len(pairs[0][0]), response_length=len(pairs[0][1]),
                tokens_added="no BOS; one EOS appended to each chosen and rejected response")
    return trainer


def measure(args, model_cfg, workdir: str, info: dict) -> dict:
    """Warm-up + timed steps of TRL's SimPO on the synthetic pairs; the row (ROW_KEYS)."""
    from megasimpo.metrics import peak_memory_gb, peak_tflops, step_flops

    cuda = torch.cuda.is_available()
    num_microbatches = args.global_batch_size // args.micro_batch_size
    pairs = list(synthetic.random_pairs(args.global_batch_size * (args.warmup + args.steps),
                                        args.seq_length, model_cfg.vocab_size, seed=args.seed))
    timer = StepTimer(args.warmup)
    trainer = build_trainer(args, model_cfg, pairs, workdir, info, [timer.callback()])
    trainer.model.register_forward_pre_hook(timer.hook, with_kwargs=True)
    out = trainer.train()

    step_time = report.mean(timer.times)
    precision = "bf16" if trainer.args.bf16 else "fp32"
    tflops = step_flops(model_cfg, args.seq_length, 2 * args.global_batch_size) / step_time / 1e12
    peak = peak_tflops(precision)
    row = {
        "step_time_s": step_time,
        "tokens_per_sec": 2 * args.global_batch_size * args.seq_length / step_time,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
        "mem_peak_gb": peak_memory_gb(),
        "mem_reserved_peak_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
        "step_times_s": timer.times, "step_interval_s": report.mean(timer.intervals),
        "input_tokens_per_step": report.mean(timer.inputs), "train_loss": out.training_loss,
        "loss_finite": math.isfinite(out.training_loss),
        "micro_batch_size": args.micro_batch_size, "num_microbatches": num_microbatches,
        # as the model ran, not as asked (the option was renamed in transformers 5.23)
        "gradient_checkpointing": any(getattr(m, "gradient_checkpointing", False) is True
                                      for m in trainer.model.modules()),
        "error": None,
    }
    return row


def run_config(args, model_cfg, device: str) -> dict:
    """Everything that defines the run: options, resolved shape, TRL settings, software versions."""
    from importlib.metadata import version

    import transformers

    return {**vars(args), "layers": model_cfg.num_layers, "device": device,
            "model": model_cfg.to_dict(), "num_parameters": model_cfg.num_parameters,
            "num_pairs": args.global_batch_size * (args.warmup + args.steps),
            "trainer": "trl.experimental.cpo.CPOTrainer", "loss_type": "simpo", "cpo_alpha": 0.0,
            "beta": BETA, "simpo_gamma": GAMMA, "lr": LR, "lr_scheduler": "cosine",
            "trl": version("trl"), "transformers": transformers.__version__,
            "accelerate": version("accelerate"), "torch": torch.__version__}


def main(argv=None):
    """Runs TRL's SimPO steps, merges the row into the results JSON and prints it."""
    args = parse_args(argv)
    model_cfg = synthetic.shape(args.shape, args.layers)
    workdir = tempfile.mkdtemp(prefix="bench_trl_")
    failed, info = None, {}
    try:
        row = measure(args, model_cfg, workdir, info)
    except Exception as e:  # CUDA OOM above all: recorded as the row's error, figures null
        traceback.print_exc()
        failed = e
        row = {"error": f"{type(e).__name__}: {e}"[:2000]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    row = {k: row.get(k) for k in ROW_KEYS}
    if failed is not None:
        row.update(micro_batch_size=args.micro_batch_size,
                   num_microbatches=args.global_batch_size // args.micro_batch_size,
                   gradient_checkpointing=args.gradient_checkpointing)

    device = report.device_name()
    key = args.shape + (f"-{args.tag}" if args.tag else "")
    primary = not args.tag and args.shape == synthetic.default_shape()
    path = report.results_path(args.out)
    config = {**run_config(args, model_cfg, device), **{k: info.get(k) for k in INFO_KEYS}}
    update = {"device": device, "runs": {key: {"trl_simpo": row, "trl_config": config}}}
    if primary:
        update["trl_simpo"] = row
    report.merge_results(path, update)

    columns = TABLE + (["mem_reserved_peak_gb"] if torch.cuda.is_available() else [])
    columns += ["error"] if row["error"] else []
    print(f"\n{key}: TRL {info.get('attn_implementation')}, {model_cfg.num_layers} layers, "
          f"seq {args.seq_length}, {args.global_batch_size} pairs/step, {args.param_dtype} "
          f"weights{', bf16 autocast' if info.get('bf16_autocast') else ''}, {args.steps} timed "
          f"steps, {device}\n")
    print(report.markdown_table({"trl_simpo": row}, columns))
    print(f"\nwrote {path} (runs[{key!r}]{', top-level trl_simpo' if primary else ''})")
    # An OOM is a result (what this shape costs in TRL); any other failure is a defect.
    if failed is not None and not isinstance(failed, torch.OutOfMemoryError):
        sys.exit(1)


if __name__ == "__main__":
    main()
