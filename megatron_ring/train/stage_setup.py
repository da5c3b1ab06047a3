"""What every training stage does before its first step: the recipe saved in the run directory,
the tokenizer checked against the model, the model built and initialised, and the demo data
generated when the recipe asks for it."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ring.data import demo_data
from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.models.builder import build_model
from megatron_ring.models.weights import load_hf
from megatron_ring.platform.distributed import rank0_then_barrier
from megatron_ring.recipe import RecipeError, dump
from megatron_ring.recipe.schema import expand
from megatron_ring.train import checkpoint
from megatron_ring.train.init_source import init_source


def save_recipe(recipe, run_dir: Path) -> None:
    def write():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump(recipe))
    rank0_then_barrier(write)


def ensure_demo_data(recipe, run_dir: Path) -> None:
    if not recipe.data.demo:
        return
    rank0_then_barrier(lambda: demo_data.ensure_demo_data(expand(recipe.data.demo, run_dir),
                                                          n_sft=recipe.data.demo_sft_rows))


def load_tokenizer(recipe, run_dir: Path, arch) -> ChatTokenizer:
    if not recipe.data.tokenizer:
        raise RecipeError("data.tokenizer: required (a Hugging Face tokenizer directory)")
    tok = ChatTokenizer(expand(recipe.data.tokenizer, run_dir), recipe.data.chat_template)
    if tok.vocab_size > arch.vocab_size:
        raise RecipeError(f"data.tokenizer: {tok.path} has {tok.vocab_size} tokens, more than the "
                          f"model's vocabulary ({arch.vocab_size})")
    if tok.eos_id != arch.eos_token_id:
        raise RecipeError(f"data.tokenizer: {tok.path} ends turns with id {tok.eos_id}, the model "
                          f"({recipe.model.preset}) with {arch.eos_token_id}")
    return tok


def params_dtype(recipe) -> torch.dtype:
    want = recipe.train.dtype
    if want == "auto":
        want = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if want == "bf16" else torch.float32


def build_initial_model(recipe, layout, run_dir: Path, load_init: bool = True):
    """The model of the recipe, with the weights of model.init (HF directory or checkpoint).
    The source is checked either way (init_source, as the launcher did); its weights are read
    only when load_init (a resumed run reads its own checkpoint instead). model.hf_source is the
    HF directory the weights descend from (None: unknown), which the stage's checkpoints record."""
    init = init_source(recipe, run_dir)
    arch = recipe.model.arch()
    model = build_model(arch, layout, params_dtype=params_dtype(recipe),
                        aux_loss_coeff=recipe.model.aux_loss_coeff, z_loss_coeff=recipe.model.z_loss_coeff,
                        recompute=recipe.train.recompute)  # the reference's passes are no-grad: no effect there
    model.hf_source = init.hf_source if init else None
    if init is not None and load_init:
        if init.reader is not None:
            load_hf(model, init.reader)
        else:
            checkpoint.load(init.path, model, arch_check=False)
    return model
