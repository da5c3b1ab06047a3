"""Megatron distributed checkpoints: atomic, verified, resumable, written in parallel.

A checkpoint is RUN/checkpoints/iter_NNNNNNN/ holding Megatron's torch_dist shards (model, and
optimizer when given), ling_arch.json, trainer_state.json, layout.json, the stage's own files
(RL: carried_segments.npz) and a manifest. It is written under a .tmp name, fsynced and renamed
only when every rank has finished, then `latest` is replaced (checkpoint_dir.py: what complete
means, which checkpoint a run resumes from, `keep_last` retention). A run killed mid-save, even
mid-way through an asynchronous one, resumes from the previous complete checkpoint; a save that
fails (a full disk) removes its .tmp and says why, and the previous checkpoint stays the latest.

Sharding. Periodic saves keep the distributed optimizer's state as `dp_reshardable`: each rank
writes its own contiguous shard as it holds it, nothing is gathered, and the save and the load
go through Megatron's FullyParallelSave/LoadStrategyWrapper over the data-parallel group, so the
DP replicas of a weight share its writing (and its reading, exchanged by broadcast). That state
reflects the DDP bucket layout, so it loads only at the TP/EP/DP layout that saved it (layout.json
records it); resuming elsewhere is refused naming both layouts and the conversion:
`reshard_in_place` (`torchrun --nproc-per-node WORLD -m megatron_ring.train.reshard CKPT_DIR` at
the saved layout) re-saves it `fully_reshardable` (per-parameter state gathered to DP rank 0: the export
form, and what checkpoints before layout.json hold), which loads at any layout. Model weights are
global ShardedTensors in both: a model-only load (`select`, `model.init`, convert) works at any
layout either way.

Asynchronous saves (train.async_save). dist_checkpointing.save(async_sharded_save=True) plans
the save and returns an AsyncRequest; the process queue (Megatron's AsyncCallsQueue, a
TemporalAsyncCaller) forks a writer, which holds a copy-on-write snapshot of the tensors, so the
next step runs while it writes. The finalize step (Megatron's metadata, then ours: trainer
state, the stage's files, manifest, rename, `latest`, retention) runs once every rank's writer
has finished: `finalize_saves()` polls after each step (preemption.save_or_stop), and blocks
before the next save, at a requeue stop and at the session's close. Measured with megatron-core
0.16.1 and torch 2.13 on CPU over gloo: the fork, the fully parallel wrappers (the load's
broadcast exchange included) and dp_reshardable all work; the queue's collectives are on
torch.cuda.current_device(), which platform/cpu_compat.py answers with the CPU.

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
LAYOUT = "layout.json"
PERIODIC = "dp_reshardable"  # each rank its own optimizer shard, nothing gathered: one layout
EXPORT = "fully_reshardable"  # canonical per-parameter optimizer state: any layout
# (Megatron's default "fully_sharded_model_space" relies on flattened_range, which 0.16.1's
# torch_dist strategy rejects.)

_queue = None  # this process's AsyncCallsQueue, made by the first asynchronous save


def _dp_group():
    from megatron.core import parallel_state as ps  # deferred: see the module docstring

    return ps.get_data_parallel_group(with_context_parallel=True)


def current_layout() -> dict:
    from megatron.core import parallel_state as ps  # deferred: see the module docstring

    return {"tp": ps.get_tensor_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": _world()}


def _world() -> int:
    import torch.distributed as dist  # deferred: see the module docstring

    return dist.get_world_size()


def describe(layout: dict) -> str:
    return f"TP{layout.get('tp')}/EP{layout.get('ep')}/DP{layout.get('dp')} on {layout.get('world')} processes"


def finalize_saves(blocking: bool = False) -> None:
    """Collective: publish the asynchronous saves whose writers have finished on every rank
    (blocking: wait for all of them). Nothing to do, and no collective, when none is pending."""
    if _queue is not None and _queue.get_num_unfinalized_calls():
        _queue.maybe_finalize_async_calls(blocking=blocking)


def save(root: str | os.PathLike, step: int, model, optimizer=None, trainer_state: dict | None = None, *,
         sharding: str = PERIODIC, files: dict[str, bytes] | None = None, asynchronous: bool = False,
         keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory (asynchronous: where it
    will be once finalize_saves has published it). `sharding`: the optimizer state's (PERIODIC,
    or EXPORT for a checkpoint to resume at another layout). `files`: name -> bytes that rank 0
    writes into the checkpoint. keep_last > 0: retention once it is published (checkpoint_dir.retain).
    On failure every rank raises CheckpointError naming the directory and the cause (errno in
    words, free space): at once, or from finalize_saves for an asynchronous save."""
    import torch.distributed as dist  # deferred, as Megatron: see the module docstring
    from megatron.core import dist_checkpointing  # deferred: see the module docstring
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    from megatron_ring.platform.distributed import rank0_then_barrier  # imports torch: see the module docstring

    finalize_saves(blocking=True)  # the previous one first: its .tmp must not be taken for a leftover
    root = Path(root)
    final = checkpoint_dir.iter_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    # Snapshots: an asynchronous save finishes steps later, with the state of this one.
    state_text = json.dumps(dict(trainer_state or {}, step=step), indent=2)
    record = dict(current_layout(), optimizer_sharding=sharding if optimizer is not None else None,
                  files=sorted(files or {}))
    files = dict(files or {})

    def prepare():
        checkpoint_dir.remove_partial(root)
        tmp.mkdir(parents=True)

    def finish():  # once every rank has written its shards
        (tmp / "ling_arch.json").write_text(json.dumps(dataclasses.asdict(model.arch), indent=2))
        (tmp / "trainer_state.json").write_text(state_text)
        (tmp / LAYOUT).write_text(json.dumps(record, indent=1))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        checkpoint_dir.seal(tmp, step)
        checkpoint_dir.publish(tmp, final)
        checkpoint_dir.retain(root, keep_last)

    def failed(e: BaseException) -> CheckpointError:
        cause = checkpoint_dir.describe_write_error(e, root)
        shutil.rmtree(tmp, ignore_errors=True)
        (root / (LATEST + ".tmp")).unlink(missing_ok=True)
        try:
            kept = latest(root)
        except CheckpointError:
            kept = None
        return CheckpointError(f"{final}: saving the checkpoint failed: {cause}; removed {tmp}; "
                               f"the latest checkpoint is still {kept or 'none'}")

    def guarded(fn):
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            raise failed(e) from e

    def start():
        rank0_then_barrier(prepare)
        sharded = {"model": model.sharded_state_dict()}
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], metadata={"distrib_optim_sharding_type": sharding})
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _dp_group())
        return dist_checkpointing.save(sharded, str(tmp), sharded_strategy=strategy, async_sharded_save=asynchronous)

    request = guarded(start)
    if not asynchronous:
        guarded(lambda: (dist.barrier(), rank0_then_barrier(finish)))
        return final

    def finalize():  # every rank, once every rank's writer is done
        for fn in megatron_finalize:
            fn()
        dist.barrier()
        rank0_then_barrier(finish)

    megatron_finalize = list(request.finalize_fns)
    global _queue
    if _queue is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _queue = AsyncCallsQueue()
    guarded(lambda: _queue.schedule_async_request(request._replace(finalize_fns=[lambda: guarded(finalize)])))
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


def saved_layout(path: str | os.PathLike) -> dict:
    """How a checkpoint was saved: tp, ep, dp, world, optimizer_sharding, files. Checkpoints
    from before layout.json hold fully_reshardable optimizer state and no files of their own."""
    meta = Path(path) / LAYOUT
    if not meta.is_file():
        return {"optimizer_sharding": EXPORT, "files": []}
    return _read_json(meta, "layout record")


def check_resumable_here(path: Path, saved: dict) -> None:
    """dp_reshardable optimizer state loads only at the layout that saved it: anywhere else,
    an error naming both layouts and the conversion."""
    here = current_layout()
    if saved.get("optimizer_sharding") != PERIODIC or all(saved.get(k) == here[k] for k in here):
        return
    raise CheckpointError(
        f"{path}: its optimizer state is {PERIODIC}, saved at {describe(saved)}; this run is {describe(here)}, "
        f"and {PERIODIC} state loads only at the layout that saved it. Resume at {describe(saved)}, or convert "
        f"the checkpoint at that layout first: torchrun --nproc-per-node {saved.get('world')} -m "
        f"megatron_ring.train.reshard {path} (it re-saves it {EXPORT}, which loads at any layout)")


def load(path: str | os.PathLike, model, optimizer=None, arch_check: bool = True) -> dict:
    """Collective. Loads into the (already built) model; returns trainer_state. Without an
    optimizer only the model is read, at any layout: the checkpoint's optimizer state is
    ignored, but every model tensor must be there. With one, the optimizer state too, in the
    sharding it was saved in (check_resumable_here). arch_check=False lets a recipe change
    architecture facts that carry no weights (RoPE base, context length). An incomplete
    checkpoint, or one Megatron cannot read, is a CheckpointError naming the file or directory,
    the underlying error and the previous complete checkpoint."""
    path = Path(path)
    why = incomplete(path)
    if why is not None:
        raise CheckpointError(f"{path}: not a complete checkpoint: {why}{checkpoint_dir.previous_good(path)}")
    if arch_check:
        check_arch(path, model.arch)
    trainer_state = _read_json(path / "trainer_state.json", "trainer state")
    saved = saved_layout(path)
    from megatron.core import dist_checkpointing  # deferred: see the module docstring
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.validation import StrictHandling  # deferred: as above

    sharded = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        check_resumable_here(path, saved)
        _prime_optimizer_state(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded["model"], is_loading=True,
            metadata={"distrib_optim_sharding_type": saved.get("optimizer_sharding") or PERIODIC})
    # Megatron's "unexpected" = requested but absent; "missing" = present but not requested.
    strict = StrictHandling.RAISE_ALL if optimizer is not None else StrictHandling.RAISE_UNEXPECTED
    try:
        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), _dp_group())
        state = dist_checkpointing.load(sharded, str(path), sharded_strategy=strategy, strict=strict)
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


def reshard_in_place(path: str | os.PathLike, model, optimizer) -> Path:
    """Collective, at the layout that saved `path` (the checkpoint `latest` names): load it and
    save it again as the same step with fully_reshardable optimizer state, its trainer state
    and files unchanged, replacing it (written and sealed beside it first, as every save)."""
    path = Path(path)
    if latest(path.parent) != path:
        raise CheckpointError(f"{path}: only the checkpoint `latest` names is converted in place "
                              f"(`latest` names {latest(path.parent)})")
    state = load(path, model, optimizer)
    files = {name: (path / name).read_bytes() for name in saved_layout(path).get("files", [])}
    return save(path.parent, int(state.pop("step")), model, optimizer, state, sharding=EXPORT, files=files)
