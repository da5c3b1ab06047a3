"""Megatron distributed checkpoints: layout-independent, atomic, verified, resumable.

A checkpoint is RUN/checkpoints/iter_NNNNNNN/ holding Megatron's torch_dist shards (model, and
optimizer when given), ling_arch.json, trainer_state.json and a manifest. It is written under a
.tmp name, fsynced and renamed only when every rank has finished, then `latest` is replaced
(checkpoint_dir.py: what complete means, and which checkpoint a run resumes from). A run killed
mid-save resumes from the previous complete checkpoint; a save that fails (a full disk) removes
its .tmp and says why, and the previous checkpoint stays the latest. Because Megatron saves
global ShardedTensors, a checkpoint saved at one TP/EP layout loads at any other.

Megatron's writer starts a multiprocessing Manager (spawn context) and forks writer processes:
every entry point that saves must be guarded by `if __name__ == "__main__"` (a spawned helper
re-imports __main__), and both die with the worker that started them (platform/parent_death.py).
Megatron and torch are imported only by save and load (and platform.distributed, which imports
torch, only by save), so the launcher can check a run's checkpoints cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from megatron_ring.models.hf_config import CheckpointError
from megatron_ring.models.presets import LingArch
from megatron_ring.train import checkpoint_dir
from megatron_ring.train.checkpoint_dir import incomplete, latest  # noqa: F401 (latest: callers ask here)

LATEST = checkpoint_dir.LATEST
# Optimizer state in canonical per-parameter form, so it too follows a TP/EP/DP layout change
# (Megatron's default "fully_sharded_model_space" relies on flattened_range, which 0.16.1's
# torch_dist strategy rejects).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def save(root: str | os.PathLike, step: int, model, optimizer=None, trainer_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. On failure every rank
    raises CheckpointError naming the directory and the cause (errno in words, free space)."""
    import torch.distributed as dist  # deferred, as Megatron: see the module docstring
    from megatron.core import dist_checkpointing  # deferred: see the module docstring

    from megatron_ring.platform.distributed import rank0_then_barrier  # imports torch: see the module docstring

    root = Path(root)
    final = checkpoint_dir.iter_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")

    def prepare():
        checkpoint_dir.remove_partial(root)
        tmp.mkdir(parents=True)

    def finish():  # once every rank has written its shards
        (tmp / "ling_arch.json").write_text(json.dumps(dataclasses.asdict(model.arch), indent=2))
        (tmp / "trainer_state.json").write_text(json.dumps(dict(trainer_state or {}, step=step), indent=2))
        checkpoint_dir.seal(tmp, step)
        checkpoint_dir.publish(tmp, final)

    try:
        rank0_then_barrier(prepare)
        sharded = {"model": model.sharded_state_dict()}
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=_OPTIM_METADATA)
        dist_checkpointing.save(sharded, str(tmp))
        dist.barrier()
        rank0_then_barrier(finish)
    except (KeyboardInterrupt, SystemExit):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        cause = checkpoint_dir.describe_write_error(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        (root / (LATEST + ".tmp")).unlink(missing_ok=True)
        try:
            kept = latest(root)
        except CheckpointError:
            kept = None
        raise CheckpointError(f"{final}: saving the checkpoint failed: {cause}; removed {tmp}; "
                              f"the latest checkpoint is still {kept or 'none'}") from e
    return final


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid {what} ({type(e).__name__}: {e})"
                              f"{checkpoint_dir.previous_good(path.parent)}") from None


def saved_step(path: str | os.PathLike) -> int:
    return int(_read_json(Path(path) / "trainer_state.json", "trainer state")["step"])


def saved_arch(path: str | os.PathLike) -> LingArch:
    """The architecture a checkpoint was saved from."""
    meta = Path(path) / "ling_arch.json"
    if not meta.is_file():
        raise CheckpointError(f"{path}: no ling_arch.json (not a megatron-ring checkpoint, or an incomplete one)")
    try:
        return LingArch(**_read_json(meta, "architecture record"))
    except TypeError as e:
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
    import torch  # deferred: see the module docstring

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
    facts that carry no weights (RoPE base, context length). An incomplete checkpoint, or one
    Megatron cannot read, is a CheckpointError naming the file or directory, the underlying
    error and the previous complete checkpoint."""
    path = Path(path)
    why = incomplete(path)
    if why is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint: {why}{checkpoint_dir.previous_good(path)}")
    if arch_check:
        check_arch(path, model.arch)
    trainer_state = _read_json(path / "trainer_state.json", "trainer state")
    from megatron.core import dist_checkpointing  # deferred: see the module docstring
    from megatron.core.dist_checkpointing.validation import StrictHandling  # deferred: as above

    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        _prime_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True,
                                                          metadata=_OPTIM_METADATA)
    # Megatron's "unexpected" = requested but absent; "missing" = present but not requested.
    strict = StrictHandling.RAISE_ALL if optimizer is not None else StrictHandling.RAISE_UNEXPECTED
    try:
        state = dist_checkpointing.load(sharded, str(path), strict=strict)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: Megatron could not load it ({checkpoint_dir.describe_read_error(e)})"
                              f"{checkpoint_dir.previous_good(path)}") from e
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
    return trainer_state
