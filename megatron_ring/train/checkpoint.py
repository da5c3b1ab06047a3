"""Megatron distributed checkpoints: layout-independent, atomic, resumable.

A checkpoint is RUN/checkpoints/iter_NNNNNNN/ holding Megatron's torch_dist shards (model, and
optimizer when given), ling_arch.json and trainer_state.json. It is written under a .tmp name and
renamed only when every rank has finished, then `latest` is replaced atomically, so a run
killed mid-save resumes from the previous complete checkpoint. Because Megatron saves global
ShardedTensors, a checkpoint saved at one TP/EP layout loads at any other.

Megatron's writer starts a multiprocessing Manager (spawn context) and uses psutil: every entry
point that saves must be guarded by `if __name__ == "__main__"` (a spawned helper re-imports
__main__), which is what made the save hang when first tried under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_ring.models.hf_checkpoint import CheckpointError
from megatron_ring.models.presets import LingArch

LATEST = "latest"
# Optimizer state in canonical per-parameter form, so it too follows a TP/EP/DP layout change
# (Megatron's default "fully_sharded_model_space" relies on flattened_range, which 0.16.1's
# torch_dist strategy rejects).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _iter_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def save(root: str | os.PathLike, step: int, model, optimizer=None, trainer_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = Path(root)
    final = _iter_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=_OPTIM_METADATA)
    dist_checkpointing.save(sharded, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "ling_arch.json").write_text(json.dumps(dataclasses.asdict(model.arch), indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(dict(trainer_state or {}, step=step), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
    dist.barrier()
    return final


def latest(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def saved_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])


def saved_arch(path: str | os.PathLike) -> LingArch:
    """The architecture a checkpoint was saved from."""
    meta = Path(path) / "ling_arch.json"
    if not meta.is_file():
        raise CheckpointError(f"{path}: no ling_arch.json (not a megatron-ring checkpoint, or an incomplete one)")
    try:
        return LingArch(**json.loads(meta.read_text()))
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta}: not a valid architecture record ({e})") from None


def check_arch(path: Path, arch: LingArch) -> None:
    saved = dataclasses.asdict(saved_arch(path))
    mine = dataclasses.asdict(arch)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, model {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path} was saved from a different model: " + "; ".join(diff))


def _prime_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a checkpoint fills in. Megatron's torch-Adam path
    (no apex/TE) reads one shared 'step' from the per-parameter state when building the state
    dict to load into, and its init_state_fn creates only the moments."""
    import torch

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        if not isinstance(inner, torch.optim.Adam):  # TE/apex FusedAdam keep no per-param step
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def _unshare_adam_steps(optimizer) -> None:
    """Megatron restores torch Adam's per-parameter 'step' as one tensor object shared by every
    parameter; Adam increments it in place once per parameter, so the bias correction would
    run ahead after a resume. Give each parameter its own copy."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in chained.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def load(path: str | os.PathLike, model, optimizer=None, arch_check: bool = True) -> dict:
    """Collective. Loads into the (already built, any layout) model; returns trainer_state.
    Without an optimizer only the model is read: the checkpoint's optimizer state is ignored,
    but every model tensor must be there. arch_check=False lets a recipe change architecture
    facts that carry no weights (RoPE base, context length)."""
    path = Path(path)
    if arch_check:
        check_arch(path, model.arch)
    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        _prime_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True,
                                                          metadata=_OPTIM_METADATA)
    # Megatron's "unexpected" = requested but absent; "missing" = present but not requested.
    strict = StrictHandling.RAISE_ALL if optimizer is not None else StrictHandling.RAISE_UNEXPECTED
    state = dist_checkpointing.load(sharded, str(path), strict=strict)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    return json.loads((path / "trainer_state.json").read_text())
