"""Where a stage's metrics go: RUN_DIR/metrics.jsonl (one JSON object per optimizer step),
wandb (offline by default: RUN_DIR/wandb), a progress bar, and a PNG plot when the stage ends.
Only the logging rank writes; after a resume, records past the checkpoint are dropped first so
no step appears twice."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from megatron_ring.train.plots import plot_series, read_metrics


class RunLog:
    def __init__(self, run_dir: str | Path, stage: str, *, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "megatron-ring", config: dict | None = None,
                 progress: bool = True, active: bool = True):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.active = active
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("stage") != stage or r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        if wandb_mode != "disabled":
            self.wandb = _start_wandb(self.run_dir, stage, wandb_mode, wandb_project, config)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step",
                            file=sys.stderr, dynamic_ncols=True)

    def log(self, record: dict, show: tuple[str, ...] = ("loss", "entropy")) -> None:
        if not self.active:
            return
        record = {"stage": self.stage, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{record[k]:.4g}" for k in show if isinstance(record.get(k), float)})

    def message(self, text: str) -> None:
        if not self.active:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self, plot_keys: list[str]) -> Path | None:
        if not self.active:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        records = [r for r in read_metrics(self.path) if r.get("stage") == self.stage]
        return plot_series(records, plot_keys, self.run_dir / "plots" / f"{self.stage}.png",
                           f"{self.stage}: {self.run_dir}")


def _start_wandb(run_dir: Path, stage: str, mode: str, project: str, config: dict | None):
    """One wandb run per stage and run directory; a resumed stage continues the same run."""
    import wandb  # deferred: slow to import, and only needed when wandb logging is on

    id_file = run_dir / f".wandb_{stage}_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=project, name=f"{run_dir.name}-{stage}", id=run_id, resume="allow",
                      dir=str(run_dir), mode=mode, config=config or {}, settings=wandb.Settings(silent=True))
