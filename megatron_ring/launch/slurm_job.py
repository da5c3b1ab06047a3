"""A recipe as a SLURM batch script: srun starts torchrun on every node with the rendezvous
taken from SLURM's environment, optionally in a container (pyxis) and next to dedicated SGLang
server nodes; a preemption warning becomes a checkpoint and a requeue (train/preemption.py).

The script is rendered from the resolved recipe, so a recipe error is reported when it is
rendered, not hours later when the job starts on the cluster.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_ring.recipe import RecipeError
from megatron_ring.rollout.fleet_plan import ROUTER_POLICY, ROUTER_PORT, FleetPlan


@dataclass
class JobSpec:
    """One batch job: a stage command (`megatron-ring ARGV`) on the recipe's cluster."""

    name: str
    recipe: object  # the resolved recipe: cluster, rollout and data sections
    run_dir: str
    argv: list[str]
    workdir: str  # where the job runs (relative paths in argv and run_dir start here)


def _q(items) -> str:
    return " ".join(shlex.quote(str(i)) for i in items)


def _header(job: JobSpec) -> list[str]:
    c = job.recipe.cluster
    lines = [f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={c.nodes + c.sglang_nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --chdir={job.workdir}",
             f"#SBATCH --output={job.run_dir}/logs/%x-%j.out", "#SBATCH --open-mode=append"]
    if c.accelerator == "gpu":
        lines.append(f"#SBATCH --gpus-per-node={c.gpus_per_node}")
    for flag, value in (("partition", c.partition), ("account", c.account), ("time", c.time_limit)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if c.requeue:
        lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{c.signal_before_s}"]
    return lines + [f"#SBATCH {a}" for a in c.sbatch_args]


def _srun(job: JobSpec, nodes: str, log: str) -> str:
    """srun of one task per node (torchrun or the SGLang launcher), in the image when named."""
    c = job.recipe.cluster
    args = [f"--nodes={nodes}", "--ntasks-per-node=1", f"--output={log}", "--open-mode=append", "--kill-on-bad-exit=1"]
    if c.container_image:
        mounts = [*c.container_mounts, f"{job.workdir}:{job.workdir}"]
        args += [f"--container-image={c.container_image}", f"--container-mounts={','.join(mounts)}",
                 f"--container-workdir={job.workdir}"]
    return "srun " + " ".join(f'"{a}"' for a in args)  # double quotes: $RUN_DIR expands here


def _python(job: JobSpec) -> str:
    """The image's python in a container; else this environment's (a shared file system)."""
    return "python" if job.recipe.cluster.container_image else sys.executable


def _sglang_lines(job: JobSpec) -> tuple[list[str], list[str]]:
    """Dedicated SGLang nodes: the recipe's engine fleet (rollout/fleet_plan.py) on the last
    cluster.sglang_nodes nodes of the job, engines_per_node single-node engines on each
    (`--tp engine_tp --base-gpu-id G --port 30000+j`, on data.tokenizer's HF directory), and
    sglang-router in front of them on the first SGLang node; the trainer gets the router's URL
    as rollout.url, waits for it to be healthy and pushes its weights before the first rollout."""
    c = job.recipe.cluster
    if c.sglang != "dedicated":
        return [], []
    ro = job.recipe.rollout
    if ro.url:
        raise RecipeError(f"rollout.url: {ro.url} with cluster.sglang=dedicated; the job starts the "
                          "dedicated fleet and gives the trainer its router's URL itself")
    plan = FleetPlan.of(job.recipe)
    py = _python(job)
    logs = f"{shlex.quote(job.run_dir)}/logs/{shlex.quote(job.name)}-$SLURM_JOB_ID-sglang-$SLURMD_NODENAME"
    # Engine slot j runs on the hosting nodes that have one: all, or all but the last when it is partial.
    task = ["# The engines of fleet node $SLURM_PROCID; the router on the first node."]
    for j in range(plan.engines_per_node):
        launch = [py, "-m", "sglang.launch_server", "--model-path", job.recipe.data.tokenizer, *plan.engine_args(j)]
        line = f"{_q(launch)} >> {logs}-{plan.ports[j]}.out 2>&1 &"
        on = sum(1 for n in range(plan.hosts) if plan.node_engines(n) > j)
        task.append(line if on == plan.hosts else f'if [ "$SLURM_PROCID" -lt {on} ]; then {line} fi')
    from megatron_ring.rollout.router import router_argv  # deferred: it imports torch; dedicated fleets only

    # The trainer's own router flags (retries, health checks, payload size), the recipe's request
    # timeout, and as long for the engines to load and register as the trainer waits for them.
    router = _q(router_argv(["@WORKERS@"], "0.0.0.0", ROUTER_PORT, policy=ROUTER_POLICY,
                            request_timeout_s=plan.request_timeout_s, command=(py, "-m", "sglang_router.launch_router"),
                            metrics_port=ROUTER_PORT + 1,
                            extra_args=["--worker-startup-timeout-secs", int(plan.ready_timeout_s)])
                ).replace("@WORKERS@", "$SGLANG_WORKER_URLS")
    task += [f'if [ "$SLURM_PROCID" = 0 ]; then {router} >> {logs}-router.out 2>&1 & fi',
             "wait  # the engines (and the router) until the job stops them"]
    urls = [f"http://${{nodes[{c.nodes + n}]}}:{plan.ports[j]}"
            for n in range(plan.hosts) for j in range(plan.node_engines(n))]
    hosting = f'$(IFS=,; echo "${{nodes[*]:{c.nodes}:{plan.hosts}}}")'
    start = [
        f"# Dedicated SGLang fleet: {plan.engines} engine(s) of --tp {plan.engine_tp}, {plan.engines_per_node} per node, "
        f"on nodes {c.nodes}-{c.nodes + plan.hosts - 1} of the job,",
        f"# behind sglang-router ({ROUTER_POLICY}) on the first of them; the trainer sends every request to the router.",
        f"export SGLANG_ROUTER=${{nodes[{c.nodes}]}}",
        f'export SGLANG_WORKER_URLS="{" ".join(urls)}"',
        f"{_srun(job, plan.hosts, '$RUN_DIR/logs/%x-%j-sglang-node%n.out')} --nodelist=\"{hosting}\" \\",
        f"    bash -c {shlex.quote(chr(10).join(task))} &",
        "sglang_pid=$!",
    ]
    stop = ["kill \"$sglang_pid\" 2>/dev/null; wait \"$sglang_pid\" 2>/dev/null"]
    return start, stop


_TRAP = [
    "# SLURM's warning (--signal) or `scancel --signal=USR1 --batch`: the stage checkpoints",
    "# after its current step and exits; then the job is requeued and resumes from there.",
    "preempted=0",
    "trap 'preempted=1; echo \"== preemption signal: checkpoint, then requeue\"; touch \"$RUN_DIR/preempt.request\"' USR1",
]


def render(job: JobSpec) -> str:
    c = job.recipe.cluster
    FleetPlan.of(job.recipe)  # a fleet that cannot be placed is said here, not when the job starts
    sglang_start, sglang_stop = _sglang_lines(job)
    # Each node's task expands its own $SLURM_PROCID (its node rank), so the command runs in `bash -c`.
    task = (f"exec {shlex.quote(_python(job))} -m torch.distributed.run --nnodes={c.nodes} "
            f"--nproc-per-node={c.gpus_per_node} --node-rank=$SLURM_PROCID --master-addr=$MASTER_ADDR "
            f"--master-port=$MASTER_PORT -m megatron_ring.cli {_q(job.argv)}")
    if sglang_start:
        task += f' "rollout.url=http://$SGLANG_ROUTER:{ROUTER_PORT}"'
    train_nodes = f'$(IFS=,; echo "${{nodes[*]:0:{c.nodes}}}")'
    lines = [
        "#!/bin/bash",
        f"# {job.name}: rendered by `megatron-ring slurm` from the resolved recipe; edit the recipe",
        "# and render again. Submit with `make submit RECIPE=...` (it creates the log directory).",
        *_header(job),
        "set -uo pipefail",
        f"RUN_DIR={shlex.quote(job.run_dir)}",
        'mkdir -p "$RUN_DIR/logs"',
        'echo "== $(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        "rm -f \"$RUN_DIR/preempt.request\"  # a request belongs to the job run that received it",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "# torchrun's rendezvous: the job's first node, a port derived from the job id.",
        'export MASTER_ADDR=${nodes[0]} MASTER_PORT=$((29500 + SLURM_JOB_ID % 2000))',
        *sglang_start,
        *(_TRAP if c.requeue else []),
        f"{_srun(job, c.nodes, '$RUN_DIR/logs/%x-%j-node%n.out')} --nodelist=\"{train_nodes}\" \\",
        f"    bash -c {shlex.quote(task)} &",
        "pid=$!",
        "while :; do",
        '    wait "$pid"; rc=$?',
        '    kill -0 "$pid" 2>/dev/null || break  # still running: a signal interrupted wait',
        "done",
        *sglang_stop,
    ]
    if c.requeue:  # preempted is set only by the trap
        lines += ['if [ "$preempted" = 1 ]; then',
                  '    echo "== $(date -u +%FT%TZ) stage stopped with code $rc; requeueing job $SLURM_JOB_ID"',
                  '    scontrol requeue "$SLURM_JOB_ID"',
                  "    exit 0",
                  "fi"]
    lines += ['echo "== $(date -u +%FT%TZ) stage exited with code $rc"', 'exit "$rc"']
    return "\n".join(lines) + "\n"


def submit_chain(scripts: list[Path], workdir: str) -> str:
    """A pipeline's jobs, each starting once the one before it has succeeded (afterok; a
    requeued job counts when it finally completes)."""
    lines = ["#!/bin/bash", "# Submits the pipeline's stages as a chain of SLURM jobs.", "set -euo pipefail",
             f"cd {shlex.quote(workdir)}"]
    for i, s in enumerate(scripts, 1):
        after = f" --dependency=afterok:$job{i - 1}" if i > 1 else ""
        lines += [f"job{i}=$(sbatch --parsable{after} {shlex.quote(str(s))})", f'echo "submitted {s.name} as job $job{i}"']
    return "\n".join(lines) + "\n"
