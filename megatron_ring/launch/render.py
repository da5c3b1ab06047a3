"""`megatron-ring slurm`: recipe files -> batch scripts under build/slurm/ (`make recipes`),
and `--submit` (`make submit RECIPE=...`): sbatch the script, or a pipeline's chain of jobs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_ring.launch.slurm_job import JobSpec, render, submit_chain
from megatron_ring.recipe import RecipeError, load_recipe
from megatron_ring.recipe.schema import check_layout
from megatron_ring.train.input_check import check_inputs


def _job(name: str, recipe, run_dir, argv: list[str]) -> JobSpec:
    check_layout(recipe)  # the layout at the recipe's own cluster size
    return JobSpec(name, recipe, str(run_dir), argv, os.getcwd())


def jobs(recipe_path: str, overrides: list[str], run_dir: str | None) -> tuple[bool, list[tuple[str, JobSpec]]]:
    """Whether it is a pipeline, and (file stem, job) of each job: one for a stage recipe, one
    per stage for a pipeline."""
    if load_recipe(recipe_path).stage != "pipeline":
        recipe = load_recipe(recipe_path, overrides)
        run_dir = run_dir or str(Path("runs") / recipe.name)
        argv = [recipe.stage, recipe_path, *overrides, "--run-dir", run_dir]
        return False, [(Path(recipe_path).stem, _job(recipe.name, recipe, run_dir, argv))]
    from megatron_ring.pipeline.stages import stage_runs  # deferred: imports torch; pipelines only

    pipe, _, runs = stage_runs(recipe_path, run_dir, overrides)
    return True, [(f"{i:02d}-{st.name}", _job(f"{pipe.name}-{st.name}", load_recipe(st.recipe, st.sets), st.run_dir,
                                              st.argv)) for i, st in enumerate(runs, 1)]


def write(recipe_path: str, overrides: list[str], run_dir: str | None, out_root: str
          ) -> tuple[Path, list[JobSpec]]:
    """Render into out_root/<recipe folder>/ (a pipeline: a folder of its own with submit.sh);
    returns what submits it, and the jobs."""
    pipeline, specs = jobs(recipe_path, overrides, run_dir)
    folder = Path(out_root) / Path(recipe_path).resolve().parent.name
    if pipeline:
        folder = folder / Path(recipe_path).stem
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.sbatch" for stem, _ in specs]
    for path, (_, spec) in zip(paths, specs):
        path.write_text(render(spec))
        path.chmod(0o755)
    script = paths[0]
    if pipeline:
        script = folder / "submit.sh"
        script.write_text(submit_chain([p.resolve() for p in paths], os.getcwd()))
        script.chmod(0o755)
    return script, [spec for _, spec in specs]


def submit(recipe_path: str, overrides: list[str], run_dir: str | None, out_root: str) -> int:
    """Render, check each training stage's inputs (the batch script starts torchrun on the nodes
    directly: this is the last place bad input is said before a job waits in the queue), create
    the log directories SLURM writes into, and submit."""
    script, specs = write(recipe_path, overrides, run_dir, out_root)
    for spec in specs:
        if spec.argv[0] in ("distill", "rl"):
            # Inputs an earlier stage of a pipeline writes (a selection.json) do not exist yet.
            for note in check_inputs(spec.recipe, spec.run_dir, missing_ok=True):
                print(f"megatron-ring slurm: {spec.name}: not found here, so not checked: {note}")
    for spec in specs:
        Path(spec.run_dir, "logs").mkdir(parents=True, exist_ok=True)
    argv = ["bash", str(script)] if script.name == "submit.sh" else ["sbatch", str(script)]
    try:
        return subprocess.run(argv).returncode
    except FileNotFoundError:
        raise RecipeError(f"{argv[0]}: not found; submit from a SLURM login node ({script} is rendered)") from None
