"""`megatron-ring score PROMPTS.jsonl RESPONSES.jsonl`: the RL rewards of a file of responses,
scored offline by the same reward pool (Math-Verify, the code sandbox, deadlines) RL uses, so a
data set and its verifiers are checked before training on them: the reference solutions should
score 1 and wrong ones 0.

Row i of RESPONSES ({"response": "..."}) answers row i of PROMPTS (RL prompt rows, any domain;
blank lines are skipped in both, as every jsonl reader here does). Bad rows and unequal row
counts are errors naming file:line before anything is scored."""

from __future__ import annotations

import json
import time

from megatron_ring.data.jsonl_rows import DataError, read_rows
from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import REWARD_FNS, RewardPool

CHUNK = 256  # results are printed chunk by chunk, so a long file shows progress


def _parse_response(row, where: str) -> tuple[str, str]:
    if not isinstance(row, dict) or not isinstance(row.get("response"), str):
        raise ValueError('expected {"response": "..."}')
    return where, row["response"]


def read_pairs(prompts_path: str, responses_path: str) -> list[tuple]:
    """[(PromptRow, (where, response))], row i with row i."""
    prompts = read_prompts([prompts_path])
    responses, _ = read_rows([responses_path], _parse_response, "response")
    if len(prompts) != len(responses):
        n = min(len(prompts), len(responses))
        first = (f"{prompts[n].source} has no response" if len(prompts) > n
                 else f"{responses[n][0]} answers no prompt")
        raise DataError(f"{prompts_path} has {len(prompts)} rows and {responses_path} {len(responses)}: {first}")
    return list(zip(prompts, responses))


def score_files(prompts_path: str, responses_path: str, workers: int = 2, timeout_s: float = 10.0,
                float_tolerance: float = 0.0, as_json: bool = False, out=print) -> dict:
    """Print one line per response and the summary; return the summary."""
    pairs = read_pairs(prompts_path, responses_path)
    fns = {domain: REWARD_FNS[domain] for domain in {p.domain for p, _ in pairs}}  # no sandbox check without code
    start = time.monotonic()
    passed = timeouts = 0
    with RewardPool(workers, timeout_s, CodeRewardSettings(float_tolerance=float_tolerance), fns) as pool:
        for offset in range(0, len(pairs), CHUNK):
            chunk = pairs[offset:offset + CHUNK]
            results = pool.score([(p.domain, response, p.row) for p, (_, response) in chunk])
            for (prompt, (where, _)), result in zip(chunk, results):
                passed += result.reward == 1.0
                timeouts += result.timed_out
                line = {"prompt": prompt.source, "response": where, "domain": prompt.domain,
                        "reward": result.reward, "timed_out": result.timed_out, "error": result.error}
                out(json.dumps(line) if as_json else _text(line))
    summary = {"n": len(pairs), "passed": passed, "timeouts": timeouts,
               "seconds": round(time.monotonic() - start, 2)}
    out(json.dumps({"summary": summary}) if as_json else
        f"{summary['n']} responses: {passed} passed, {timeouts} timed out, {summary['seconds']} s")
    return summary


def _text(line: dict) -> str:
    why = f"  {line['error']}" if line["error"] else ""  # a timeout's says so
    return f"{line['prompt']}  {line['domain']}  reward {line['reward']:g}{why}"
