"""`megatron-ring`: the command line. Multi-process commands re-launch themselves under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _relaunch(args) -> int:
    """Run this same command as torchrun processes (one node) and return its exit code."""
    from megatron_ring.platform.distributed import torchrun

    return torchrun(_world(args), ["-m", "megatron_ring.cli", *args.argv]).returncode


def _world(args) -> int:
    return args.nproc or math.lcm(args.tp, args.ep)


def _layout_args(p):
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--nproc", type=int, default=0, help="processes (default: lcm(tp, ep))")


def _validate_early(arch, args):
    """Refuse an impossible layout before any process or process group starts."""
    from megatron_ring.platform.layout import Layout

    Layout(tp=args.tp, ep=args.ep, world_size=_world(args)).validate(arch)


def cmd_model_info(args) -> int:
    from megatron_ring.models.builder import build_model
    from megatron_ring.models.param_count import count_params
    from megatron_ring.models.presets import get_preset
    from megatron_ring.platform import distributed

    arch = get_preset(args.preset).replace(norm_head=args.norm_head)
    layout = distributed.init(1, 1)
    info = {"preset": args.preset, **count_params(build_model(arch, layout, meta_device=True))}
    distributed.shutdown()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.preset}: {info['total_params'] / 1e9:.3f}B total, {info['active_params'] / 1e9:.3f}B active")
    return 0


def cmd_convert(args) -> int:
    from megatron_ring.models.hf_checkpoint import HFReader

    if args.direction == "hf-to-megatron":
        reader = HFReader(args.src)  # config errors surface here, before any process starts
        _validate_early(reader.arch, args)
        reader.validate()
    if "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    import torch
    from megatron_ring.models.builder import build_model
    from megatron_ring.models.weights import export_hf, load_hf
    from megatron_ring.platform import distributed
    from megatron_ring.train import checkpoint

    layout = distributed.init(args.tp, args.ep)
    if args.direction == "hf-to-megatron":
        model = build_model(reader.arch, layout)
        load_hf(model, reader)
        path = checkpoint.save(args.dst, 0, model, trainer_state={"source": str(args.src)})
    else:
        path = checkpoint.latest(args.src) or args.src
        arch = checkpoint.saved_arch(path)
        model = build_model(arch, layout)
        checkpoint.load(path, model)
        export_hf(model, args.dst, dtype=getattr(torch, args.dtype))
    if int(os.environ["RANK"]) == 0:
        print(f"wrote {args.dst} ({path})")
    distributed.shutdown()
    return 0


def cmd_demo(args) -> int:
    from megatron_ring.models.presets import get_preset

    _validate_early(get_preset("ling-tiny"), args)
    if "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    from megatron_ring.train.demo import run

    run(args.run_dir, steps=args.steps, tp=args.tp, ep=args.ep, save_every=args.save_every)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-ring", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    mi = sub.add_parser("model-info", help="parameter counts of a preset, from the Megatron model on meta")
    mi.add_argument("--preset", default="ling-lite")
    mi.add_argument("--norm-head", action="store_true")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=cmd_model_info)

    cv = sub.add_parser("convert", help="HF BailingMoe <-> Megatron distributed checkpoint")
    cv.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="dtype of exported HF weights")
    _layout_args(cv)
    cv.set_defaults(func=cmd_convert)

    dm = sub.add_parser("demo", help="train ling-tiny a few steps on CPU (TP1/EP2 by default)")
    dm.add_argument("--run-dir", default="runs/demo")
    dm.add_argument("--steps", type=int, default=30)
    dm.add_argument("--save-every", type=int, default=10)
    _layout_args(dm)
    dm.set_defaults(func=cmd_demo, ep=2)

    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    from megatron_ring.models.hf_checkpoint import CheckpointError
    from megatron_ring.platform.layout import LayoutError

    try:
        return args.func(args)
    except (CheckpointError, LayoutError, ValueError) as e:
        print(f"megatron-ring {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
