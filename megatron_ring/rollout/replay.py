"""Recorded rollouts: the RL stage can write every rollout round to RUN_DIR/rollouts/ (one JSONL
file per round, named by its first prompt's global index), and the `replay` engine serves them
again, so runs that differ only in their loss (c3po, grpo, token_mean) train on the very same
rollouts. Replay checks that it is asked for the same prompts it recorded."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rollout.streamed_rewards import handed_over
from megatron_ring.rollout.base import Completion, RolloutEngine, RolloutError


def round_path(root: str | os.PathLike, first_key: int) -> Path:
    return Path(root) / f"round_{first_key:09d}.jsonl"


def record_round(root, keys: list[int], prompts: list[list[int]], completions: list[list[Completion]],
                 rewards: dict[tuple[int, int], float], decode) -> Path:
    """One line per (prompt, sample), written atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, prompt, group in zip(keys, prompts, completions):
        for s, c in enumerate(group):
            lines.append(json.dumps({"key": key, "sample": s, "prompt_ids": prompt, "tokens": c.tokens,
                                     "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                                     "reward": rewards.get((key, s)), "text": decode(c.tokens),
                                     **routing_fields(c.routing)}))
    path = round_path(root, keys[0])
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def routing_fields(routing) -> dict:
    """A record's routed experts: base64 of the uint8 array and its shape (none without)."""
    if routing is None:
        return {}
    return {"routed_experts": base64.b64encode(routing.tobytes()).decode(), "routed_experts_shape": list(routing.shape)}


def routing_of_record(d: dict):
    if "routed_experts" not in d:
        return None
    return np.frombuffer(base64.b64decode(d["routed_experts"]), np.uint8).reshape(d["routed_experts_shape"]).copy()


class ReplayEngine(RolloutEngine):
    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RolloutError(f"rollout.replay_dir: {self.root} is not a directory of recorded rollouts")

    def generate(self, prompts, n, params: SamplingParams, keys=None, on_group=None):
        if keys is None:
            raise RolloutError("replay needs the prompts' global keys to find their round")
        path = round_path(self.root, keys[0])
        if not path.is_file():
            raise RolloutError(f"{path}: no recorded round starts at prompt {keys[0]} (record more steps)")
        out: dict[int, dict[int, Completion]] = {}
        for ln, line in enumerate(path.read_text().splitlines(), 1):
            d = json.loads(line)
            i = keys.index(d["key"]) if d["key"] in keys else -1
            if i < 0 or d["prompt_ids"] != prompts[i]:
                raise RolloutError(f"{path}:{ln}: recorded for other prompts (key {d['key']}); replay needs the "
                                   "same data, rollout.seed and rollout.prompts_per_step")
            try:
                routing = routing_of_record(d)
            except (ValueError, TypeError, KeyError) as e:
                raise RolloutError(f"{path}:{ln}: field routed_experts does not hold its shape ({e})") from None
            out.setdefault(d["key"], {})[d["sample"]] = Completion(d["tokens"], d["logprobs"], d["finish_reason"],
                                                                   routing=routing)
        if any(len(out.get(k, {})) != n for k in keys):
            raise RolloutError(f"{path}: recorded with another samples_per_prompt than {n}")
        groups = [[out[k][s] for s in range(n)] for k in keys]
        return handed_over(groups, on_group) if on_group else groups

    def push_weights(self, model, version: int) -> None:
        pass  # the recorded samples stay what they were

    def health(self) -> bool:
        return self.root.is_dir()
