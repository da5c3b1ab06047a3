"""`megatron-ring select RUN_DIR`: evaluate every checkpoint of a distillation run, apply the
entropy rule, print the table and write RUN_DIR/selection.json for the RL stage. Results per
checkpoint are kept in RUN_DIR/selection/ (keyed by the sampling settings), so changing only
the entropy range re-uses them.

select.engine sglang: each checkpoint is pushed to an SGLang server (select.url, or one started
here on the first checkpoint) which samples it, and the model measures the entropy of those
samples with one teacher-forced pass (inference/held_out.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
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
    """What the results depend on: the sampling settings and who samples, not the entropy range
    or where the server runs (the embedded engine keeps the keys it had before engines existed)."""
    d = dataclasses.asdict(dataclasses.replace(s, entropy_low=0.0, entropy_high=1.0))
    where = ("url", "ready_timeout_s", "control_timeout_s")
    for k in where + (("engine", "server_args") if s.engine == "embedded" else ()):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _open_engine(s, model, tokenizer, run_dir: Path, dtype, step: int):
    """An SGLang engine serving the model's current weights (collective): select.url, given them
    by a push, or a server started on their export. Weights travel in the model's own dtype, so
    the server samples exactly the checkpoint whose entropy the model then measures."""
    from megatron_ring.models.weights import export_hf
    from megatron_ring.rollout.base import RolloutError
    from megatron_ring.rollout.fleet import Fleet
    from megatron_ring.rollout.sglang_engine import SGLangEngine  # deferred: the SGLang client and server

    weights = run_dir / "selection" / "rollout_weights"
    kwargs = {"weights_dir": weights, "stop_token_ids": [tokenizer.eos_id], "export_dtype": dtype,
              "requests": {"context_length": model.arch.max_position_embeddings or 0}}  # max_new_tokens clamped
    if s.url:
        # a router: the workers behind it are the ones pushed to
        engines = distributed.rank0_then_broadcast(lambda: Fleet.connect(s.url, s.ready_timeout_s).engines,
                                                   RolloutError)
        engine = SGLangEngine.connect(s.url, fleet=Fleet(s.url, engines), **kwargs)
        engine.push_weights(model, version=step)
        return engine
    if distributed.is_rank0() and weights.exists():
        shutil.rmtree(weights)
    # The server reads its tokenizer from the model directory: the run's goes with it.
    export_hf(model, weights, dtype, source=tokenizer.path)
    return SGLangEngine.launch(weights, run_dir / "selection", extra_args=s.server_args,
                               ready_timeout_s=s.ready_timeout_s, **kwargs)


def _serving(engine, s, model, tokenizer, run_dir: Path, dtype, step: int):
    """The engine that samples the checkpoint just loaded into model (None: the model itself)."""
    if s.engine == "embedded":
        return None
    if engine is None:
        return _open_engine(s, model, tokenizer, run_dir, dtype, step)
    engine.push_weights(model, version=step)
    return engine


def run(recipe, run_dir: str | Path, as_json: bool = False) -> int:
    run_dir = Path(run_dir)
    s = recipe.select
    if not s.prompts:
        raise ValueError("select.prompts: required (held-out RL prompts jsonl)")
    layout = check_layout(recipe, world_size=distributed.launched_world_size())
    distributed.init(layout.tp, layout.ep, seed=recipe.train.seed, control_timeout_s=s.control_timeout_s)
    arch = recipe.model.arch()
    tokenizer = stage_setup.load_tokenizer(recipe, run_dir, arch)
    prompts = read_prompts([expand(s.prompts, run_dir)])
    if s.max_prompts:
        prompts = prompts[:s.max_prompts]
    params = SamplingParams.of(s)
    code = CodeRewardSettings(hide=(str(run_dir.resolve()),))  # the run's files hidden from sampled code
    dtype = stage_setup.params_dtype(recipe)
    model = build_model(arch, layout, params_dtype=dtype)
    cache = run_dir / "selection" / _settings_key(s)
    rank0 = distributed.is_rank0()
    rows = []
    paths = checkpoints(run_dir)
    engine = None
    try:
        for n, path in enumerate(paths, 1):
            done = cache / f"{path.name}.json"
            if done.is_file():
                result = json.loads(done.read_text())
            else:
                state = checkpoint.load(path, model)
                engine = _serving(engine, s, model, tokenizer, run_dir, dtype, state["step"])
                result = {"path": str(path), "step": state["step"], "epoch": state.get("epoch", 0.0),
                          **evaluate(model, tokenizer, prompts, s.samples_per_prompt, params, s.batch_size, code,
                                     engine=engine)}
                if rank0:
                    cache.mkdir(parents=True, exist_ok=True)
                    done.write_text(json.dumps(result))
            rows.append(result)
            if rank0 and not as_json:
                print(f"[{n}/{len(paths)}] {path.name}: entropy {result['entropy']:.3f}, "
                      f"accuracy {result['accuracy']:.3f}", flush=True)
    finally:
        if engine is not None:
            engine.close()
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
