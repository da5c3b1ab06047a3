from setuptools import find_packages, setup

# torch is pinned to the version whose CPU build the development machines carry locally; any
# other torch spec pulls a multi-GB CUDA build. GPU images bring their own torch (docker/).
CORE = [
    "megatron-core==0.16.1",
    "pyyaml",
    "wandb",
    "safetensors",
    "tokenizers",
    "numpy",
    "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
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
        "cpu": ["torch==2.13.0"],
        "gpu": ["transformer-engine[pytorch]", "sglang"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["megatron-ring=megatron_ring.cli:main"]},
)
