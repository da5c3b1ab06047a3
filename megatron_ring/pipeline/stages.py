"""`megatron-ring run PIPELINE`: the stages of a pipeline recipe in order, each in its own
subdirectory and its own processes (the same commands a user would type), each starting from
the previous one's output: select reads the last distillation run, the first RL stage starts
from the chosen checkpoint, every later RL stage from the previous stage's last checkpoint.
Re-running resumes: finished stages are found complete (their checkpoints, selection.json)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_ring.recipe import RecipeError, load_recipe
from megatron_ring.pipeline import report as pipeline_report
from megatron_ring.platform import parent_death, run_lock
from megatron_ring.train import preemption


def _split_overrides(overrides: list[str], names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in names}
    for o in overrides:
        stage, _, rest = o.partition(".")
        if stage not in out or "=" not in rest:
            raise RecipeError(f"command line: {o}: pipeline overrides are STAGE.key=value with STAGE one of {names}")
        out[stage].append(rest)
    return out


@dataclass
class StageRun:
    """One stage of a pipeline as the command that runs it (`megatron-ring ARGV`): the same
    list runs here one after the other and renders into one SLURM job per stage."""

    name: str
    kind: str
    recipe: str | None  # the stage's own recipe (distill, rl); select runs on the distill recipe
    sets: list[str]  # key=value overrides of that recipe
    run_dir: Path
    argv: list[str]


def stage_runs(path: str, run_dir: str | None, overrides: list[str] = ()) -> tuple[object, Path, list[StageRun]]:
    """The pipeline recipe, its directory and its stages. Every argument is known before any
    stage runs: the first RL stage starts from the distillation run's selection.json (the
    checkpoint `select` chose), every later one from the previous stage's checkpoints."""
    pipe = load_recipe(path)
    if pipe.stage != "pipeline":
        raise RecipeError(f"{path}: stage: {pipe.stage!r}; `megatron-ring run` takes a pipeline recipe")
    root = Path(run_dir or Path("runs") / pipe.name)
    extra = _split_overrides(list(overrides), [s.name for s in pipe.stages])
    here = Path(path).resolve().parent
    distill_recipe, distill_sets, distilled, init, runs = None, [], None, None, []
    for st in pipe.stages:
        d = root / st.name
        sets = [o.replace("{pipeline_dir}", str(root)) for o in st.overrides] + extra[st.name]
        if st.kind == "distill":
            distill_recipe, distill_sets, distilled = str(here / st.recipe), sets, d
            runs.append(StageRun(st.name, st.kind, distill_recipe, sets, d, ["distill", distill_recipe, *sets, "--run-dir", str(d)]))
        elif st.kind == "select":
            if distilled is None:
                raise RecipeError(f"{path}: stages.{st.name}: select needs a distill stage before it")
            runs.append(StageRun(st.name, st.kind, distill_recipe, distill_sets, distilled, ["select", str(distilled), *sets]))
            init = str(distilled / "selection.json")
        else:
            if init is None:
                raise RecipeError(f"{path}: stages.{st.name}: an RL stage needs a select or RL stage before it")
            recipe, sets = str(here / st.recipe), [f"model.init={init}", *sets]
            runs.append(StageRun(st.name, st.kind, recipe, sets, d, ["rl", recipe, *sets, "--run-dir", str(d)]))
            init = str(d / "checkpoints")
    return pipe, root, runs


def run_pipeline(path: str, run_dir: str | None, overrides: list[str]) -> int:
    """Each stage in its own processes, in order; a stage stopped for requeue stops the pipeline.
    One pipeline per directory (a lock on it), and each stage dies with the pipeline."""
    pipe, root, runs = stage_runs(path, run_dir, overrides)
    report = []
    with run_lock.held(root):
        for st in runs:
            print(f"== pipeline {pipe.name}: stage {st.name} ({st.kind}) in {st.run_dir}", flush=True)
            code = subprocess.run([sys.executable, "-m", "megatron_ring.cli", *st.argv],
                                  preexec_fn=parent_death.preexec()).returncode
            if code:
                return code
            if preemption.stopped_early(st.run_dir):
                print(f"== pipeline {pipe.name}: stopped for requeue in stage {st.name}; run again to resume", flush=True)
                return 0
            report.append(pipeline_report.summary(st.name, st.kind, st.run_dir))
    pipeline_report.write(root, pipe.name, report)
    return 0
