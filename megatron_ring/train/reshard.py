"""Convert a run's latest checkpoint for a resume at another TP/EP/DP layout:

    torchrun --nproc-per-node WORLD -m megatron_ring.train.reshard RUN_DIR/checkpoints/iter_N

run at the layout that saved it (layout.json; the error that refused the resume prints this
line). Its dp_reshardable optimizer state is loaded there and the checkpoint saved again in
place, fully_reshardable (checkpoint.reshard_in_place), which any layout loads. The optimizer is
rebuilt from the run's recipe.yaml (its parameter groups must match the saved state)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_ring.train.reshard", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/iter_N (the one `latest` names)")
    a = p.parse_args(argv)
    from megatron_ring.models.builder import build_model
    from megatron_ring.platform import distributed
    from megatron_ring.recipe import load_recipe
    from megatron_ring.train import checkpoint, stage_setup
    from megatron_ring.train.engine import build_optimizer, wrap_ddp

    path = Path(a.checkpoint)
    saved = checkpoint.saved_layout(path)
    if saved.get("optimizer_sharding") != checkpoint.PERIODIC:
        print(f"{path}: optimizer state is {saved.get('optimizer_sharding')}, nothing to convert")
        return 0
    if distributed.launched_world_size() != saved["world"]:
        sys.exit(f"{path} was saved by {saved['world']} processes: run this under torchrun --nproc-per-node "
                 f"{saved['world']} (it has {distributed.launched_world_size()})")
    recipe = load_recipe(str(path.parent.parent / "recipe.yaml"), [])
    layout = distributed.init(saved["tp"], saved["ep"])
    model = build_model(checkpoint.saved_arch(path), layout, params_dtype=stage_setup.params_dtype(recipe))
    o = recipe.optimizer
    optimizer = build_optimizer(wrap_ddp(model), lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                clip_grad=o.clip_grad, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2)
    out = checkpoint.reshard_in_place(path, model, optimizer)
    if distributed.is_rank0():
        print(f"{out}: optimizer state now {checkpoint.EXPORT} (loads at any layout)")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
