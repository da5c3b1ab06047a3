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
    "jinja2",  # chat templates of Hugging Face tokenizer directories
    "math-verify[antlr4_13_2]",  # math rewards
    "matplotlib",  # PNG plots in run directories
    "tqdm",
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
        # triton on CPU runs the fused loss kernels in its interpreter (TRITON_INTERPRET=1) in tests.
        "cpu": ["torch==2.13.0", "triton==3.6.0"],
        "gpu": ["transformer-engine[pytorch]", "sglang"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["megatron-ring=megatron_ring.cli:main"]},
)
