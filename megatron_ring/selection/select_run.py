"""`megatron-ring select RUN_DIR`: evaluate every checkpoint of a distillation run, apply the
entropy rule, print the table and write RUN_DIR/selection.json for the RL stage. Results per
checkpoint are kept in RUN_DIR/selection/ (keyed by the sampling settings), so changing only
the entropy range re-uses them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.inference.held_out import evaluate
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.builder import build_model
from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import check_layout, expand
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.selection.entropy_rule import Candidate, NoCheckpointInRange, choose
from megatron_ring.train import checkpoint, stage_setup
from megatron_ring.train.plots import plot_series


def checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    found = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if not found:
        raise ValueError(f"{root}: no checkpoints (run the distillation stage first)")
    return found


def _settings_key(s) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True).encode()).hexdigest()[:12]


def run(recipe, run_dir: str | Path, as_json: bool = False) -> int:
    run_dir = Path(run_dir)
    s = recipe.select
    if not s.prompts:
        raise ValueError("select.prompts: required (held-out RL prompts jsonl)")
    layout = check_layout(recipe, world_size=distributed.launched_world_size())
    distributed.init(layout.tp, layout.ep, seed=recipe.train.seed)
    arch = recipe.model.arch()
    tokenizer = stage_setup.load_tokenizer(recipe, run_dir, arch)
    prompts = read_prompts([expand(s.prompts, run_dir)])
    if s.max_prompts:
        prompts = prompts[:s.max_prompts]
    params = SamplingParams.of(s)
    code = CodeRewardSettings(hide=(str(run_dir.resolve()),))  # the run's files hidden from sampled code
    model = build_model(arch, layout, params_dtype=stage_setup.params_dtype(recipe))
    cache = run_dir / "selection" / _settings_key(dataclasses.replace(s, entropy_low=0.0, entropy_high=1.0))
    rank0 = distributed.is_rank0()
    rows = []
    paths = checkpoints(run_dir)
    for n, path in enumerate(paths, 1):
        done = cache / f"{path.name}.json"
        if done.is_file():
            result = json.loads(done.read_text())
        else:
            state = checkpoint.load(path, model)
            result = {"path": str(path), "step": state["step"], "epoch": state.get("epoch", 0.0),
                      **evaluate(model, tokenizer, prompts, s.samples_per_prompt, params, s.batch_size, code)}
            if rank0:
                cache.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(result))
        rows.append(result)
        if rank0 and not as_json:
            print(f"[{n}/{len(paths)}] {path.name}: entropy {result['entropy']:.3f}, "
                  f"accuracy {result['accuracy']:.3f}", flush=True)
    distributed.shutdown()
    if not rank0:
        return 0
    candidates = [Candidate(r["path"], r["epoch"], r["step"], r["entropy"], r["accuracy"]) for r in rows]
    chosen, error = None, None
    try:
        chosen = choose(candidates, s.entropy_low, s.entropy_high)
    except NoCheckpointInRange as e:
        error = str(e)
    report = {"chosen": chosen.path if chosen else None, "error": error,
              "rule": {"entropy_low": s.entropy_low, "entropy_high": s.entropy_high,
                       "tie": "highest accuracy, then the later step"},
              "checkpoints": rows}
    tmp = run_dir / "selection.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, run_dir / "selection.json")
    plot_series(rows, ["entropy", "accuracy", "accuracy_math", "accuracy_code", "accuracy_science",
                       "response_len_mean"],
                run_dir / "plots" / "select.png", f"select: {run_dir}", x="epoch")
    if as_json:
        print(json.dumps({"chosen": report["chosen"], "checkpoints": [
            {k: r.get(k) for k in ("path", "epoch", "step", "entropy", "accuracy")} for r in rows]}))
    else:
        print(table(rows, chosen, s))
    return 0


def verdict(run_dir: str | Path) -> tuple[int, str | None]:
    """For the launching process: exit 3 and the reason when no checkpoint was in range."""
    report = json.loads((Path(run_dir) / "selection.json").read_text())
    return (3, report["error"]) if report["chosen"] is None else (0, None)


def table(rows: list[dict], chosen: Candidate | None, s) -> str:
    head = f"{'checkpoint':<16}{'epoch':>7}{'step':>7}{'entropy':>9}{'accuracy':>10}{'math':>7}{'code':>7}{'science':>9}{'len':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "  <- chosen" if chosen and r["path"] == chosen.path else ""
        fmt = lambda k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
        lines.append(f"{Path(r['path']).name:<16}{r['epoch']:>7.2f}{r['step']:>7d}{r['entropy']:>9.3f}"
                     f"{r['accuracy']:>10.3f}{fmt('accuracy_math'):>7}{fmt('accuracy_code'):>7}{fmt('accuracy_science'):>9}"
                     f"{r['response_len_mean']:>7.1f}{mark}")
    rule = f"rule: entropy in [{s.entropy_low}, {s.entropy_high}]; ties -> highest accuracy, then later step"
    lines.append(rule)
    lines.append(f"chosen: {chosen.path}" if chosen else "chosen: none")
    return "\n".join(lines)
