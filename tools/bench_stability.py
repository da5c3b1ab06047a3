"""MoE RL stability in miniature: from one distilled tiny checkpoint, with the same prompts and
seeds, N RL steps of the tiny math stage in three modes, all with bf16 rollouts (the embedded
engine samples under bf16 autocast while the trainer computes in fp32: the train-inference
mismatch of a GPU run, made visible on CPU):

    grpo      rl.loss_mode=grpo  rollout.routed_experts=true   (routing reported, not replayed)
    c3po      rl.loss_mode=c3po  rollout.routed_experts=true
    c3po+r3   rl.loss_mode=c3po  rl.router_replay=r3            (the rollout's routing replayed)

Per mode: tokens in the loss per step (mean, coefficient of variation), grad norm (median, max,
max/median), the reward and entropy curves, the mean over steps of the routing agreement (the
routing used in training against the rollout's) and of the natural one (the trainer's own
routers against the rollout's), of the multiplicative probability error and of the rollout KL,
and held-out math accuracy before and after. Plot: OUT/plots/stability.png.

    python tools/bench_stability.py [INIT_CHECKPOINT] [--steps 20] [--out runs/bench_stability] [--json]
        [--eval-prompts 256] [--distill-epochs 4] [--distill-arg key=value ...] [key=value ...]

INIT_CHECKPOINT: a distillation checkpoint whose run directory holds the demo data (e.g. the
one `select` chose in runs/demo/checkpoints after `make demo`). Without one the bench distills
its own into OUT/distill (recipes/tiny/distill.yaml, --distill-epochs epochs of 88 steps, ~1
minute each on 2 cores; 4 as in `make demo`: ~11% held-out math accuracy) and reuses it on the
next call. Defaults: ~15 minutes on 2 cores in all (distillation ~4.5, each mode ~3.5).
Trailing key=value: overrides for every RL run. A benchmark, not a test: nothing here asserts;
fields a run does not report are null."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "grpo": ["rl.loss_mode=grpo", "rollout.routed_experts=true"],
    "c3po": ["rl.loss_mode=c3po", "rollout.routed_experts=true"],
    "c3po+r3": ["rl.loss_mode=c3po", "rl.router_replay=r3"],
}
# Per-step metrics averaged over the steps that report them (null where none does).
MEANS = ("routing_agreement", "natural_routing_agreement", "prob_error", "rollout_kl")
FIELDS = ("mode", "tokens_per_step_mean", "tokens_per_step_cv", "grad_norm_median", "grad_norm_max",
          "grad_norm_max_over_median", "reward", "entropy", "entropy_mean", *MEANS, "prob_error_max",
          "rollout_kl_max", "heldout_accuracy_before", "heldout_accuracy_after", "steps", "seconds")
QUIET = ["logging.wandb=disabled", "logging.progress=false"]


def sh(cmd: list[str], log: Path) -> float:
    """Run a CLI command (output to log); its wall time. Fails with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.perf_counter() - t0


def distilled(out: Path, epochs: int, extra: list[str]) -> Path:
    """OUT/distill's latest checkpoint, distilling it first if there is none."""
    run_dir = out / "distill"
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, "-m", "megatron_ring.cli", "distill", "recipes/tiny/distill.yaml", "--run-dir",
               str(run_dir), f"train.epochs={epochs}", "train.save_every_steps=0", "train.save_initial=false",
               *QUIET, *extra]
        print(f"distilling the init checkpoint into {run_dir} ...", file=sys.stderr)
        print(f"distill: {sh(cmd, out / 'distill.log'):.0f} s", file=sys.stderr)
    return run_dir / "checkpoints" / latest.read_text().strip()


def run(mode: str, init: Path, out: Path, steps: int, eval_prompts: int, extra: list[str]) -> tuple[list, float]:
    """One fresh RL run of the mode; its metrics.jsonl records (step 0: the eval before) and wall time."""
    data = init.parents[1] / "data"
    run_dir = out / mode.replace("+", "_")
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover run dir would resume, not restart
    cmd = [sys.executable, "-m", "megatron_ring.cli", "rl", "recipes/tiny/rl_stage1_math.yaml",
           "--run-dir", str(run_dir), f"model.init={init}", f"data.demo={data}", f"data.tokenizer={data}/tokenizer",
           f"data.prompts=[{data}/rl_math.jsonl]", f"eval.prompts={data}/rl_eval.jsonl" if eval_prompts else "eval.prompts=",
           f"eval.max_prompts={eval_prompts}", "eval.every_steps=0", f"train.steps={steps}", "train.save_every_steps=0",
           "rollout.record=false", "rollout.sampler_dtype=bf16", *MODES[mode], *QUIET, *extra]
    out.mkdir(parents=True, exist_ok=True)
    seconds = sh(cmd, out / f"{mode.replace('+', '_')}.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return rows, seconds


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _r(x, n=4):
    return None if x is None else round(x, n)


def series(rows: list[dict], key: str) -> list:
    return [_num(r.get(key)) for r in rows]


def mean_of(rows: list[dict], key: str):
    v = [x for x in series(rows, key) if x is not None]
    return _r(statistics.fmean(v), 6) if v else None


def max_of(rows: list[dict], key: str):
    v = [x for x in series(rows, key) if x is not None]
    return _r(max(v), 6) if v else None


def summarize(mode: str, rows: list[dict], seconds: float) -> dict:
    steps = [r for r in rows if r.get("step", 0) > 0]
    before = next((r for r in rows if r.get("step") == 0), {})
    after = steps[-1] if steps else {}
    tokens = [x for x in series(steps, "tokens_in_loss") if x is not None]
    grads = [x for x in series(steps, "grad_norm") if x is not None]
    t_mean = statistics.fmean(tokens) if tokens else None
    g_med = statistics.median(grads) if grads else None
    entropy = [_r(x) for x in series(steps, "entropy")]
    return {
        "mode": mode,
        "tokens_per_step_mean": _r(t_mean, 1),
        "tokens_per_step_cv": _r(statistics.pstdev(tokens) / t_mean) if t_mean else None,
        "grad_norm_median": _r(g_med),
        "grad_norm_max": _r(max(grads)) if grads else None,
        "grad_norm_max_over_median": _r(max(grads) / g_med) if g_med else None,
        "reward": [_r(x) for x in series(steps, "reward_mean")],  # null: a step of carried segments only
        "entropy": entropy,
        "entropy_mean": mean_of(steps, "entropy"),
        **{k: mean_of(steps, k) for k in MEANS},
        "prob_error_max": max_of(steps, "prob_error_max"),
        "rollout_kl_max": max_of(steps, "rollout_kl_max"),
        "heldout_accuracy_before": _num(before.get("eval_accuracy")),
        "heldout_accuracy_after": _num(after.get("eval_accuracy")),
        "steps": len(steps),
        "seconds": round(seconds, 1),
    }


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens_in_loss", "tokens in loss per step"), ("grad_norm", "grad norm"),
              ("reward_mean", "reward mean"), ("routing_agreement", "routing agreement (solid: used, dashed: natural)"),
              ("entropy", "entropy"), ("prob_error", "probability error (solid) / rollout KL (dotted), log")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for i, (mode, rows) in enumerate(results.items()):
        color = f"C{i}"
        steps = [r for r in rows if r.get("step", 0) > 0]
        x = [r["step"] for r in steps]
        for ax, (key, title) in zip(axes.flat, panels):
            ax.plot(x, series(steps, key), marker=".", color=color, label=mode)
            ax.set_title(title, fontsize=10)
        axes[1, 0].plot(x, series(steps, "natural_routing_agreement"), ls="--", marker=".", color=color)
        axes[1, 2].plot(x, series(steps, "rollout_kl"), ls=":", marker=".", color=color)
    if any(isinstance(r.get(k), (int, float)) and r[k] > 0 for rows in results.values() for r in rows
           for k in ("prob_error", "rollout_kl")):
        axes[1, 2].set_yscale("log", nonpositive="mask")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("bf16 rollouts, fp32 trainer: grpo vs c3po vs c3po + routing replay (r3)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def table(summaries: list[dict]) -> str:
    lines = [f"{'':<26}" + "".join(f"{s['mode']:>14}" for s in summaries)]
    for k in FIELDS[1:]:
        if k in ("reward", "entropy"):
            continue
        lines.append(f"{k:<26}" + "".join(f"{_fmt(s[k]):>14}" for s in summaries))
    for k in ("reward", "entropy"):
        for s in summaries:
            lines.append(f"{k + ' ' + s['mode']:<26}" + " ".join(_fmt(x) for x in s[k]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("init", type=Path, nargs="?", help="distillation checkpoint (default: distill one into OUT/distill)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every RL run")
    p.add_argument("--steps", type=int, default=20, help="RL steps per mode")
    p.add_argument("--out", type=Path, default=Path("runs/bench_stability"))
    p.add_argument("--eval-prompts", type=int, default=256, help="held-out math prompts (x2 samples) before and after; 0: none")
    p.add_argument("--distill-epochs", type=int, default=4, help="when the bench distills its own checkpoint")
    p.add_argument("--distill-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for that distillation (repeatable)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--json", action="store_true", help="a JSON list, one object per mode")
    a = p.parse_args(argv)
    if a.init is not None and "=" in str(a.init):  # only overrides given: no checkpoint
        a.overrides.insert(0, str(a.init))
        a.init = None
    modes = [m for m in a.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; known: {list(MODES)}")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    init = a.init.resolve() if a.init else distilled(out, a.distill_epochs, a.distill_arg)
    results, summaries = {}, []
    for mode in modes:
        print(f"{mode}: {a.steps} steps ...", file=sys.stderr)
        rows, seconds = run(mode, init, out, a.steps, a.eval_prompts, a.overrides)
        results[mode] = rows
        summaries.append(summarize(mode, rows, seconds))
        print(f"{mode}: {seconds:.0f} s", file=sys.stderr)
    png = out / "plots" / "stability.png"
    plot(results, png)
    print(f"bench: {time.perf_counter() - t0:.0f} s in all; init {init}; plot {png}", file=sys.stderr)
    if a.json:
        print(json.dumps(summaries, indent=1))
    else:
        print(table(summaries))
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
