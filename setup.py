import os
import runpy

from setuptools import find_packages, setup

# Every pin lives in megatron_ring/versions.py, which docker/Dockerfile reads too. It is run by
# path: importing the package would import dependencies that are not installed yet.
PINS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_ring", "versions.py"))

CORE = [
    PINS["MEGATRON_CORE"],
    PINS["SGLANG_ROUTER"],  # the engine fleet's router (rollout/router.py)
    "aiohttp",  # the fleet client's concurrent requests (rollout/fleet_client.py)
    "pyyaml",
    "wandb",
    "safetensors",
    "tokenizers",
    "numpy",
    "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
    "jinja2",  # chat templates of Hugging Face tokenizer directories
    "math-verify[antlr4_13_2]",  # math rewards
    "matplotlib",  # PNG plots in run directories
    "tqdm",
    "pyarrow",  # parquet data files (data/jsonl_rows.py)
]

setup(
    name="megatron-ring",
    version="0.1.0",
    description="Ring-lite's training recipe (long-CoT distillation, entropy-based checkpoint "
    "selection, C3PO RL) for Ling MoE models on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ring", "megatron_ring.*"]),
    install_requires=CORE,
    extras_require={
        # the CPU torch (and triton) of development machines and CI; GPU images bring their own
        "cpu": PINS["CPU_EXTRA"],
        "gpu": PINS["GPU_EXTRA"],
        "test": PINS["TEST_EXTRA"],
    },
    entry_points={"console_scripts": ["megatron-ring=megatron_ring.cli:main"]},
)
