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
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megasimpo=megasimpo.cli:main"]},
)
