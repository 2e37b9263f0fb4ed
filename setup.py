from setuptools import find_packages, setup

setup(
    name="megasimpo",
    version="0.1.0",
    description="SimPO (and DPO, IPO, CPO, ORPO, R-DPO) preference training on Megatron-Core",
    packages=find_packages(include=["megasimpo", "megasimpo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "datasets",
        "transformers>=4.45",
        "safetensors",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",  # dist_checkpointing's file writer reports memory with it
        "xxhash",  # checkpoint checksums (megasimpo/checksums.py); datasets needs it too
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # tests/bench/test_bench_trl.py runs bench/bench_trl.py (pure-Python wheels, CPU is fine)
        "test": ["pytest", "pytest-timeout", "pytest-random-order", "trl==1.16.0", "ruff>=0.6",
                 "peft==0.21.2"],
        # bench/bench_trl.py, the TRL row of the GPU benchmark (trl pulls accelerate>=1.10.1);
        # flash-attn is optional there (sdpa without it)
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["megasimpo=megasimpo.cli:main"]},
)
