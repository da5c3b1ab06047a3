"""`megatron-ring run PIPELINE`: the stages of a pipeline recipe in order, each in its own
subdirectory and its own processes (the same commands a user would type), each starting from
the previous one's output: select reads the last distillation run, the first RL stage starts
from the chosen checkpoint, every later RL stage from the previous stage's last checkpoint.
Re-running resumes: finished stages are found complete (their checkpoints, selection.json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_ring.recipe import RecipeError, load_recipe
from megatron_ring.train import checkpoint
from megatron_ring.train.plots import read_metrics


def _split_overrides(overrides: list[str], names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n: [] for n in names}
    for o in overrides:
        stage, _, rest = o.partition(".")
        if stage not in out or "=" not in rest:
            raise RecipeError(f"command line: {o}: pipeline overrides are STAGE.key=value with STAGE one of {names}")
        out[stage].append(rest)
    return out


def _cli(*argv: str) -> None:
    code = subprocess.run([sys.executable, "-m", "megatron_ring.cli", *argv]).returncode
    if code:
        raise SystemExit(code)


def run_pipeline(path: str, run_dir: str | None, overrides: list[str]) -> int:
    pipe = load_recipe(path)
    if pipe.stage != "pipeline":
        raise RecipeError(f"{path}: stage: {pipe.stage!r}; `megatron-ring run` takes a pipeline recipe")
    root = Path(run_dir or Path("runs") / pipe.name)
    extra = _split_overrides(overrides, [s.name for s in pipe.stages])
    here = Path(path).resolve().parent
    distilled, init, report = None, None, []
    for st in pipe.stages:
        d = root / st.name
        sets = [o.replace("{pipeline_dir}", str(root)) for o in st.overrides] + extra[st.name]
        print(f"== pipeline {pipe.name}: stage {st.name} ({st.kind}) in {d}", flush=True)
        if st.kind == "distill":
            _cli("distill", str(here / st.recipe), *sets, "--run-dir", str(d))
            distilled = d
            report.append(_summary(st, d))
        elif st.kind == "select":
            if distilled is None:
                raise RecipeError(f"{path}: stages.{st.name}: select needs a distill stage before it")
            _cli("select", str(distilled), *sets)
            init = json.loads((distilled / "selection.json").read_text())["chosen"]
            report.append({"stage": st.name, "chosen": init})
        else:
            if init is None:
                raise RecipeError(f"{path}: stages.{st.name}: an RL stage needs a select or RL stage before it")
            _cli("rl", str(here / st.recipe), f"model.init={init}", *sets, "--run-dir", str(d))
            init = str(checkpoint.latest(d / "checkpoints"))
            report.append(_summary(st, d))
    (root / "pipeline.json").write_text(json.dumps(report, indent=2))
    print(format_report(pipe.name, report))
    return 0


def _summary(st, d: Path) -> dict:
    records = read_metrics(d / "metrics.jsonl")
    evals = [r for r in records if "eval_accuracy" in r]
    out = {"stage": st.name, "steps": max((r["step"] for r in records), default=0), "last": records[-1] if records else {}}
    if evals:
        out["eval_before"] = {k: v for k, v in evals[0].items() if k.startswith("eval_")}
        out["eval_after"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    return out


def format_report(name: str, report: list[dict]) -> str:
    lines = [f"pipeline {name}:"]
    for r in report:
        if "chosen" in r:
            lines.append(f"  {r['stage']:<24} chosen {r['chosen']}")
            continue
        last = r["last"]
        text = f"  {r['stage']:<24} {r['steps']} steps, loss {last.get('loss', float('nan')):.4g}"
        if "reward_mean" in last:
            text += f", reward {last['reward_mean']:.3f}, tokens in loss {last.get('tokens_in_loss')}"
        if "eval_before" in r:
            b, a = r["eval_before"], r["eval_after"]
            keys = [k for k in a if k.startswith("eval_accuracy")]
            text += "; held-out " + ", ".join(f"{k[5:]} {b.get(k, float('nan')):.3f} -> {a[k]:.3f}" for k in keys)
        lines.append(text)
    return "\n".join(lines)
