"""C3PO against its baselines in the same trainer, on the same rollouts: a c3po run of the tiny
RL stage records its rollout rounds (rollout.record), then c3po, grpo and token_mean each train
from the same checkpoint on those recorded rounds (rollout.engine=replay), and per mode the
tokens that carried loss per optimizer step and the update time (mean, std, min, max and
coefficient of variation) are printed side by side, plus a PNG of both series.

    python tools/bench_loss_modes.py INIT_CHECKPOINT [--steps 12] [--out runs/bench_loss_modes] [--json]
        [key=value ...]   extra overrides for every run (e.g. rollout.prompts_per_step=16)

INIT_CHECKPOINT: a distillation checkpoint whose run directory holds the demo data (e.g.
runs/demo/checkpoints/iter_0000308 after `make demo`). c3po's tokens per step are Phi x DP by
construction; grpo and token_mean take every token of one round per step, which varies with the
response lengths. Replayed runs sample nothing, so step time is update time. A benchmark, not a
test: nothing here asserts."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("c3po", "grpo", "token_mean")


def run(name: str, init: Path, out: Path, steps: int, extra: list[str]) -> list[dict]:
    data = init.parents[1] / "data"
    run_dir = out / name
    cmd = [sys.executable, "-m", "megatron_ring.cli", "rl", "recipes/tiny/rl_stage1_math.yaml",
           "--run-dir", str(run_dir), f"model.init={init}", f"data.demo={data}", f"data.tokenizer={data}/tokenizer",
           f"data.prompts=[{data}/rl_math.jsonl]", "eval.prompts=''", f"train.steps={steps}",
           "logging.wandb=disabled", "logging.progress=false", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] > 0]


def stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values)
    return {"mean": round(mean, 4), "std": round(std, 4), "min": min(values), "max": max(values),
            "cv": round(std / mean, 4) if mean else 0.0}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for mode, rows in results.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["tokens_in_loss"] for r in rows], marker=".", label=mode)
        axes[1].plot(steps, [r["train_time_s"] for r in rows], marker=".", label=mode)
    axes[0].set_title("tokens in loss per step")
    axes[1].set_title("update time (s)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("init", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", type=Path, default=Path("runs/bench_loss_modes"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    init, out = a.init.resolve(), a.out.resolve()
    run("record", init, out, a.steps, ["rl.loss_mode=c3po", "rollout.record=true", *a.overrides])
    rounds = len(list((out / "record" / "rollouts").glob("round_*.jsonl")))
    replay = ["rollout.engine=replay", f"rollout.replay_dir={out / 'record' / 'rollouts'}", *a.overrides]
    # c3po spends one to two rounds a step (the carry), grpo and token_mean one each.
    results = {m: run(m, init, out, a.steps if m == "c3po" else rounds, [f"rl.loss_mode={m}", *replay]) for m in MODES}
    table = {m: {"tokens_in_loss": stats([r["tokens_in_loss"] for r in rows]),
                 "step_time_s": stats([r["step_time_s"] for r in rows]),
                 "train_time_s": stats([r["train_time_s"] for r in rows])} for m, rows in results.items()}
    plot(results, a.out / "loss_modes.png")
    if a.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'mode':<11}{'tokens/step mean':>17}{'std':>8}{'min':>7}{'max':>7}{'cv':>7}"
          f"{'step s mean':>13}{'std':>7}{'cv':>7}{'train s cv':>12}")
    for m, t in table.items():
        k, s, tr = t["tokens_in_loss"], t["step_time_s"], t["train_time_s"]
        print(f"{m:<11}{k['mean']:>17.1f}{k['std']:>8.1f}{k['min']:>7}{k['max']:>7}{k['cv']:>7.3f}"
              f"{s['mean']:>13.3f}{s['std']:>7.3f}{s['cv']:>7.3f}{tr['cv']:>12.3f}")
    print(f"plot: {a.out / 'loss_modes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
