"""What a finished pipeline prints and leaves in its directory: per stage the steps, the last
metrics, the checkpoint `select` chose and held-out accuracy before -> after RL
(pipeline.json, the text report), and one PNG of the whole recipe (plots/pipeline.png)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_ring.train.plots import read_metrics


def summary(name: str, kind: str, run_dir: Path) -> dict:
    if kind == "select":
        sel = json.loads((run_dir / "selection.json").read_text())
        chosen = next((c for c in sel["checkpoints"] if c["path"] == sel["chosen"]), {})
        return {"stage": name, "kind": kind, "chosen": sel["chosen"], "entropy": chosen.get("entropy"),
                "accuracy": chosen.get("accuracy"), "epoch": chosen.get("epoch"), "checkpoints": sel["checkpoints"]}
    records = read_metrics(run_dir / "metrics.jsonl")
    out = {"stage": name, "kind": kind, "run_dir": str(run_dir), "steps": max((r["step"] for r in records), default=0),
           "last": next((r for r in reversed(records) if "loss" in r), {})}
    evals = [r for r in records if "eval_accuracy" in r]
    if evals:
        out["eval_before"] = {k: v for k, v in evals[0].items() if k.startswith("eval_accuracy")}
        out["eval_after"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_accuracy")}
    return out


def format_report(name: str, report: list[dict]) -> str:
    lines = [f"pipeline {name}:"]
    for r in report:
        if r["kind"] == "select":
            lines.append(f"  {r['stage']:<24} chose {r['chosen']} (epoch {r['epoch']}, entropy {r['entropy']:.3f}, "
                         f"held-out accuracy {r['accuracy']:.3f})")
            continue
        last = r["last"]
        text = f"  {r['stage']:<24} {r['steps']} steps, loss {last.get('loss', float('nan')):.4g}"
        if "reward_mean" in last:
            text += f", reward {last['reward_mean']:.3f}, tokens in loss {last.get('tokens_in_loss')}"
        if "eval_before" in r:
            b, a = r["eval_before"], r["eval_after"]
            text += "; held-out " + ", ".join(f"{k[5:]} {b.get(k, float('nan')):.3f} -> {v:.3f}" for k, v in a.items())
        lines.append(text)
    return "\n".join(lines)


def plot(root: Path, name: str, report: list[dict]) -> Path:
    """Distillation loss, selection (entropy and accuracy per checkpoint), RL reward and
    held-out accuracy of every RL stage, on one page."""
    import matplotlib  # deferred: slow to import, and only a written plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for r in report:
        if r["kind"] == "distill":
            recs = [x for x in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if "loss" in x]
            axes[0].plot([x["step"] for x in recs], [x["loss"] for x in recs], label=r["stage"])
        elif r["kind"] == "select":
            pts = r["checkpoints"]
            axes[1].plot([c["epoch"] for c in pts], [c["entropy"] for c in pts], marker="o", label="entropy")
            axes[1].plot([c["epoch"] for c in pts], [c["accuracy"] for c in pts], marker="s", label="accuracy")
            axes[1].axvline(r["epoch"], color="gray", linestyle="--", label="chosen")
        else:
            recs = read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
            steps = [x for x in recs if "reward_mean" in x]
            axes[2].plot([x["step"] for x in steps], [x["reward_mean"] for x in steps], label=r["stage"])
            evals = [x for x in recs if "eval_accuracy" in x]
            axes[3].plot([x["step"] for x in evals], [x["eval_accuracy"] for x in evals], marker="o", label=r["stage"])
    titles = [("distillation loss", "step"), ("selection", "epoch"), ("RL train reward", "step"),
              ("RL held-out accuracy", "step")]
    for ax, (title, x) in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.suptitle(f"pipeline {name}: {root}")
    fig.tight_layout()
    png = root / "plots" / "pipeline.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def write(root: Path, name: str, report: list[dict]) -> None:
    (root / "pipeline.json").write_text(json.dumps(report, indent=2))
    png = plot(root, name, report)
    print(format_report(name, report))
    print(f"report: {root / 'pipeline.json'}; plots: {png} and each stage's plots/")
