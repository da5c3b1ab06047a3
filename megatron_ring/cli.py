"""`megatron-ring`: the command line. Multi-process commands re-launch themselves under torchrun.

Each command imports what it needs inside itself (torch and Megatron take seconds to import), so
`megatron-ring --help`, `slurm` and errors in a recipe or its inputs answer without waiting for them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ in ("__main__", "__mp_main__"):  # a torchrun worker, or a child a worker spawned
    from megatron_ring.platform.parent_death import tie_to_job

    tie_to_job()  # dies with its parent: no trainer outlives its launcher


def _relaunch(args, nproc: int | None = None, log_root: str | None = None) -> int:
    """Run this same command as torchrun processes (one node) and return its exit code (2, with
    the first error line, when a worker fails). Every rank's output goes to
    LOG_ROOT/<command>-<time>-<pid>/ (without log_root: a temporary directory, kept only when
    the command fails)."""
    from megatron_ring.platform.distributed import torchrun

    if log_root:
        log_dir = os.path.join(log_root, f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    else:
        log_dir = tempfile.mkdtemp(prefix=f"megatron-ring-{args.command}-")
    code = torchrun(nproc or _world(args), ["-m", "megatron_ring.cli", *args.argv], log_dir=log_dir,
                    prog=f"megatron-ring {args.command}").returncode
    if code == 0 and not log_root:
        shutil.rmtree(log_dir, ignore_errors=True)
    return code


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


def _export_source(args) -> tuple[str | None, str]:
    """megatron-to-hf: the directory whose tokenizer, generation config and modeling code the
    export carries (--source, else the HF directory the checkpoint records) and the dtype
    (--dtype, else that directory's torch_dtype, else bfloat16). Checked before torchrun."""
    from megatron_ring.models.hf_config import source_dtype
    from megatron_ring.train import checkpoint
    from megatron_ring.train.init_source import recorded_hf_source

    path = checkpoint.latest(args.src) or args.src
    checkpoint.saved_arch(path)  # not a checkpoint: said here, with the path
    if args.source and not Path(args.source).is_dir():
        raise ValueError(f"--source: {args.source} is not a directory")
    source = args.source or recorded_hf_source(path)
    if source and not Path(source).is_dir():
        if "LOCAL_RANK" not in os.environ:
            print(f"megatron-ring convert: {path} came from {source}, which is gone: exporting config and "
                  "weights only (--source DIR adds a tokenizer and modeling code)", file=sys.stderr)
        source = None
    return source, args.dtype or source_dtype(source) or "bfloat16"


def cmd_convert(args) -> int:
    from megatron_ring.models.hf_checkpoint import HFReader

    if args.direction == "hf-to-megatron":
        reader = HFReader(args.src)  # config errors surface here, before any process starts
        _validate_early(reader.arch, args)
        reader.validate()
    else:
        source, dtype = _export_source(args)
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
        # The HF directory is recorded so that an export of this checkpoint (or of a run that
        # starts from it) carries its tokenizer and modeling code.
        path = checkpoint.save(args.dst, 0, model, trainer_state={"hf_source": os.path.abspath(args.src)})
        carried = ""
    else:
        path = checkpoint.latest(args.src) or args.src
        arch = checkpoint.saved_arch(path)
        model = build_model(arch, layout)
        checkpoint.load(path, model)
        export_hf(model, args.dst, dtype=getattr(torch, dtype), source=source)
        carried = f", {dtype}" + (f", tokenizer and code of {source}" if source else ", no tokenizer (no source known)")
    if int(os.environ["RANK"]) == 0:
        print(f"wrote {args.dst} ({path}{carried})")
    distributed.shutdown()
    return 0


def _recipe_world(recipe) -> int:
    """Processes of a recipe on this machine; multi-node recipes start through SLURM."""
    if recipe.cluster.nodes > 1:
        raise ValueError(f"cluster.nodes: {recipe.cluster.nodes} nodes cannot start from one shell; "
                         "launch under SLURM/torchrun, or override cluster.nodes=1")
    return recipe.cluster.gpus_per_node


def _stage_command(args, stage: str, module: str) -> int:
    """distill and rl: check the recipe and its inputs (data rows, model.init), print it
    (--dry-run) or start the processes, and run. Every check runs here, before torchrun, so bad
    input ends the command at once with one message."""
    from megatron_ring.recipe import RecipeError, dump, load_recipe
    from megatron_ring.recipe.schema import check_layout, describe_layout
    from megatron_ring.rollout.fleet_plan import FleetPlan
    from megatron_ring.train.input_check import check_inputs

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage != stage:
        raise RecipeError(f"{args.recipe}: stage: {recipe.stage!r} recipe given to `megatron-ring {stage}`")
    run_dir = args.run_dir or os.path.join("runs", recipe.name)
    if args.dry_run:
        layout = check_layout(recipe)
        fleet = FleetPlan.of(recipe)  # RL with SGLang: the engines, where, the router, the clamp
        missing = check_inputs(recipe, run_dir, missing_ok=True)
        print(dump(recipe) + "# layout: " + describe_layout(recipe, layout)
              + "".join(f"\n# {line}" for line in (fleet.describe() if fleet else []))
              + "".join(f"\n# not found here, so not checked: {m}" for m in missing))
        from megatron_ring.launch.memory_plan import plan

        memory = plan(recipe, layout)
        print(memory.table())
        memory.check()  # a peak over cluster.gpu_memory_gb: an error, exit 2
        return 0
    if "LOCAL_RANK" not in os.environ:
        from megatron_ring.platform import run_lock

        if os.path.isdir(run_dir):  # a run in progress there: said before any check (held below)
            run_lock.acquire(run_dir)
        nproc = _recipe_world(recipe)
        check_layout(recipe, nproc)
        FleetPlan.of(recipe)  # an engine fleet that cannot be placed: said before any process starts
        check_inputs(recipe, run_dir)
        from megatron_ring.train import checkpoint_dir, preemption  # torch: after the input checks

        with run_lock.held(run_dir):  # a second trainer on this run directory stops here
            checkpoint_dir.latest(os.path.join(run_dir, "checkpoints"))  # a damaged `latest`: said now
            if "SLURM_JOB_ID" not in os.environ:  # under SLURM the batch script owns the request
                preemption.request_path(run_dir).unlink(missing_ok=True)
            return _relaunch(args, nproc, log_root=os.path.join(run_dir, "logs"))
    from megatron_ring.platform import run_lock

    run_lock.claim_in_worker(run_dir)  # torchrun started directly (SLURM): rank 0 holds the lock
    importlib.import_module(module).run(recipe, run_dir)
    return 0


def cmd_distill(args) -> int:
    return _stage_command(args, "distill", "megatron_ring.train.sft")


def cmd_rl(args) -> int:
    return _stage_command(args, "rl", "megatron_ring.rl.loop")


def cmd_run(args) -> int:
    from megatron_ring.pipeline.stages import run_pipeline

    return run_pipeline(args.recipe, args.run_dir, args.overrides)


def cmd_select(args) -> int:
    from megatron_ring.recipe import load_recipe

    overrides = list(args.overrides)
    if args.low is not None:
        overrides.append(f"select.entropy_low={args.low}")
    if args.high is not None:
        overrides.append(f"select.entropy_high={args.high}")
    recipe_path = os.path.join(args.run_dir, "recipe.yaml")
    if not os.path.isfile(recipe_path):
        raise ValueError(f"{recipe_path}: not found ({args.run_dir} is not a distillation run directory)")
    recipe = load_recipe(recipe_path, overrides)
    from megatron_ring.selection.select_run import run, verdict

    if "LOCAL_RANK" in os.environ:
        return run(recipe, args.run_dir, as_json=args.json)
    code = _relaunch(args, _recipe_world(recipe), log_root=os.path.join(args.run_dir, "logs"))
    if code:
        return code
    code, reason = verdict(args.run_dir)
    if reason:
        print(f"megatron-ring select: {reason}", file=sys.stderr)
    return code


def cmd_data(args) -> int:
    """data prepare: a distill recipe's data.train -> an indexed directory (data.prepared)."""
    from megatron_ring.recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage != "distill":
        raise RecipeError(f"{args.recipe}: stage: {recipe.stage!r}; `data prepare` prepares a distill recipe's data.train")
    out = args.out or recipe.data.prepared
    if not out:
        raise RecipeError("data.prepared: not set; give the output directory with --out DIR")
    from megatron_ring.recipe.schema import expand
    from megatron_ring.train import stage_setup
    from megatron_ring.train.sft_data import prepare_recipe_data

    run_dir = Path(args.run_dir or os.path.join("runs", recipe.name))  # expands {run_dir} in paths
    out = expand(out, run_dir)
    stage_setup.ensure_demo_data(recipe, run_dir)
    tokenizer = stage_setup.load_tokenizer(recipe, run_dir, recipe.model.arch())
    t0 = time.perf_counter()
    meta = prepare_recipe_data(recipe, run_dir, tokenizer, out, args.workers)
    r = meta["report"]
    print(f"{out}: {meta['documents']} documents, {meta['tokens']} tokens ({meta['loss_tokens']} with loss) "
          f"from {r['total']} rows ({r['bad']} bad) in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_slurm(args) -> int:
    from megatron_ring.launch import render

    paths = [a for a in args.recipes if "=" not in a]
    sets = [a for a in args.recipes if "=" in a]
    if args.submit:
        if len(paths) != 1:
            raise ValueError(f"--submit takes one recipe, got {paths}")
        return render.submit(paths[0], sets, args.run_dir, args.out)
    for path in paths:
        print(render.write(path, sets, args.run_dir, args.out)[0])
    return 0


def cmd_plan(args) -> int:
    from megatron_ring.launch.memory_plan import plan
    from megatron_ring.recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage not in ("distill", "rl"):
        raise RecipeError(f"{args.recipe}: stage: {recipe.stage!r}; `megatron-ring plan` takes a distill or rl recipe")
    memory = plan(recipe, prompt_tokens=args.prompt_tokens)
    print(json.dumps(memory.as_json()) if args.json else memory.table())
    return 0


def cmd_score(args) -> int:
    from megatron_ring.rewards.score_file import score_files

    try:
        score_files(args.prompts, args.responses, args.workers, args.timeout_s, args.float_tolerance, args.json)
    except RuntimeError as e:  # no sandbox, or a reward worker that cannot start: a setup problem
        print(f"megatron-ring score: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from megatron_ring.platform.known_warnings import quiet_known_warnings

    quiet_known_warnings()
    p = argparse.ArgumentParser(prog="megatron-ring", description=__doc__.partition("\n\n")[0])
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
    cv.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                    help="dtype of exported HF weights (default: the source's torch_dtype, else bfloat16)")
    cv.add_argument("--source", default=None,
                    help="megatron-to-hf: HF (or tokenizer) directory whose tokenizer, generation config and "
                         "modeling code the export carries (default: the one the checkpoint came from)")
    _layout_args(cv)
    cv.set_defaults(func=cmd_convert)

    for name, func, text, example in (
            ("distill", cmd_distill, "stage one: long-CoT distillation from a recipe", "recipes/tiny/distill.yaml"),
            ("rl", cmd_rl, "an RL stage (C3PO) from a recipe", "recipes/tiny/rl_stage1_math.yaml")):
        ds = sub.add_parser(name, help=text)
        ds.add_argument("recipe", help=f"YAML recipe (e.g. {example})")
        ds.add_argument("overrides", nargs="*", help="key.path=value overrides")
        ds.add_argument("--run-dir", default=None, help="run directory (default runs/<recipe name>)")
        ds.add_argument("--dry-run", action="store_true", help="print the resolved recipe and layout, then exit")
        ds.set_defaults(func=func)

    rn = sub.add_parser("run", help="a pipeline recipe: distill -> select -> RL stages, each from the last")
    rn.add_argument("recipe", help="YAML pipeline recipe (e.g. recipes/tiny/pipeline.yaml)")
    rn.add_argument("overrides", nargs="*", help="STAGE.key.path=value overrides of one stage's recipe")
    rn.add_argument("--run-dir", default=None, help="pipeline directory (default runs/<pipeline name>)")
    rn.set_defaults(func=cmd_run)

    da = sub.add_parser("data", help="data preparation: `data prepare RECIPE` tokenises data.train into indexed files")
    da_sub = da.add_subparsers(dest="action", required=True)
    dp = da_sub.add_parser("prepare", help="a distill recipe's data.train -> Megatron indexed .bin/.idx (data.prepared)")
    dp.add_argument("recipe", help="YAML distill recipe")
    dp.add_argument("overrides", nargs="*", help="key.path=value overrides")
    dp.add_argument("--out", default=None, help="output directory (default: the recipe's data.prepared)")
    dp.add_argument("--workers", type=int, default=None, help="tokenising processes (default data.prepare_workers; 0: all CPUs)")
    dp.add_argument("--run-dir", default=None, help="expands {run_dir} in the recipe's paths (default runs/<recipe name>)")
    dp.set_defaults(func=cmd_data)

    sl = sub.add_parser("slurm", help="render recipes into SLURM batch scripts (build/slurm/), or --submit one")
    sl.add_argument("recipes", nargs="+", help="recipe files, then key.path=value overrides")
    sl.add_argument("--out", default="build/slurm", help="where the scripts go")
    sl.add_argument("--run-dir", default=None, help="the run (pipeline) directory (default runs/<recipe name>)")
    sl.add_argument("--submit", action="store_true", help="sbatch it (a pipeline: its chain of jobs)")
    sl.set_defaults(func=cmd_slurm)

    se = sub.add_parser("select", help="choose the distillation checkpoint that starts RL, by entropy")
    se.add_argument("run_dir", help="a distillation run directory")
    se.add_argument("overrides", nargs="*", help="key.path=value overrides of the run's recipe (select.*)")
    se.add_argument("--low", type=float, default=None, help="lowest admissible entropy (default 0.3)")
    se.add_argument("--high", type=float, default=None, help="highest admissible entropy (default 0.5)")
    se.add_argument("--json", action="store_true", help="print {chosen, checkpoints} as JSON")
    se.set_defaults(func=cmd_select)

    sc = sub.add_parser("score", help="score a file of responses with the RL rewards (check a data set and its verifiers)")
    sc.add_argument("prompts", help="RL prompt rows (jsonl, any domain)")
    sc.add_argument("responses", help='{"response": "..."} rows (jsonl): row i answers prompt row i')
    sc.add_argument("--json", action="store_true", help="one JSON object per response, then {\"summary\": ...}")
    sc.add_argument("--workers", type=int, default=2, help="verifier processes (reward.workers)")
    sc.add_argument("--timeout-s", type=float, default=10.0, help="per math/science response (reward.timeout_s)")
    sc.add_argument("--float-tolerance", type=float, default=0.0,
                    help="for floats in function results of rows without their own (reward.float_tolerance)")
    sc.set_defaults(func=cmd_score)

    pl = sub.add_parser("plan", help="per-GPU memory of a distill or RL recipe, by phase, before it runs")
    pl.add_argument("recipe", help="YAML recipe (e.g. recipes/ling_lite/rl_stage2_code_science.yaml)")
    pl.add_argument("overrides", nargs="*", help="key.path=value overrides")
    pl.add_argument("--json", action="store_true", help="one JSON object: the components, total_gb (the peak), phases")
    pl.add_argument("--prompt-tokens", type=int, default=1024,
                    help="RL: prompt tokens of the longest segment (with rollout.max_new_tokens, at most the context)")
    pl.set_defaults(func=cmd_plan)

    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = p.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list there).
    listed = "overrides" if hasattr(args, "overrides") else "recipes" if hasattr(args, "recipes") else None
    if extra and listed and all("=" in e and not e.startswith("-") for e in extra):
        setattr(args, listed, [*getattr(args, listed), *extra])
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    from megatron_ring.models.hf_config import CheckpointError  # no torch: input errors end fast
    from megatron_ring.platform.layout import LayoutError
    from megatron_ring.rollout.base import RolloutError

    try:
        return args.func(args)
    except (CheckpointError, LayoutError, RolloutError, ValueError) as e:
        print(f"megatron-ring {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
