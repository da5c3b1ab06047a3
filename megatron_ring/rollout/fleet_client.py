"""The client that keeps an engine fleet busy: one /generate request per sample (its own seed),
up to `concurrency` of them in flight on one asyncio loop, every answer checked field by field
(sglang_client.parse_generate), and each prompt's group handed to `on_group` the moment its K
samples are back, so rewards are scored while the rest is generated.

Each row asks for min(max_new_tokens, context - prompt - 1) tokens: SGLang refuses a request
whose prompt + max_new_tokens exceeds its context, and one refused row would fail the round. A
prompt that leaves no room gets K empty completions (the RL step skips them) and is counted.

A request that fails (connection refused or cut, 5xx, timeout, malformed answer) is sent again
after a backoff; through sglang-router the retry reaches another engine, and before each retry
the fleet is asked to drop engines that stopped answering (`on_failure`), so an engine killed
mid-round loses no sample. The round fails, with one error naming every engine, only when the
fleet has none left or a request has used all its attempts. A 4xx is the request's own fault and
is not retried.

routing (a RoutingSpec): every request asks for its routed experts and every Completion carries
them, parsed by the same code as a batch answer; a skipped prompt's samples get all-UNKNOWN
routing of its positions."""

from __future__ import annotations

import asyncio
import json
import resource

import aiohttp

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rollout.base import Completion, RolloutError
from megatron_ring.rollout.fleet_plan import clamp_max_new_tokens
from megatron_ring.rollout.routed_experts import RoutingSpec, unknown
from megatron_ring.rollout.sglang_client import parse_generate, request_fields, sampling_dict, sampling_seed


def open_files_for(connections: int, spare: int = 512) -> int:
    """Every request in flight holds a socket: raise this process's open-file limit (often 1024)
    towards connections + spare, as far as the hard limit allows; returns how many connections
    fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < connections + spare:
        soft = connections + spare if hard == resource.RLIM_INFINITY else min(hard, connections + spare)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return connections if soft == resource.RLIM_INFINITY else max(1, min(connections, soft - spare))


class FleetClient:
    """Requests to `url` (sglang-router, or one server). on_failure() is called before a retry;
    it raises RolloutError when no engine is left (Fleet.prune)."""

    def __init__(self, url: str, *, concurrency: int = 256, timeout_s: float = 3600.0, attempts: int = 4,
                 context_length: int = 0, stop_token_ids: list[int] | None = None, on_failure=None,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0, routing: RoutingSpec | None = None):
        self.url = url.rstrip("/")
        self.routing = routing
        self.concurrency, self.timeout_s, self.attempts = concurrency, timeout_s, max(1, attempts)
        self.context_length, self.stop_token_ids = context_length, stop_token_ids
        self.on_failure = on_failure
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.stats = {"requests": 0, "retries": 0, "clamped_rows": 0, "skipped_prompts": 0}

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None, on_group=None) -> list[list[Completion]]:
        """n completions per prompt, in prompt order (keys: the prompts' global ids, for seeds)."""
        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        return asyncio.run(self._generate(prompts, n, params, keys, on_group))

    async def _generate(self, prompts, n, params, keys, on_group):
        out: list[list[Completion] | None] = [None] * len(prompts)
        width = open_files_for(self.concurrency)
        gate = asyncio.Semaphore(width)
        # aiohttp, not httpx: httpx's pool costs O(connections) per request, and at a few hundred
        # in flight the client, not the fleet, set the pace (tools/bench_rollout.py measured it).
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, connect=30.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=width), timeout=timeout) as http:
            tasks = [asyncio.create_task(self._group(http, gate, i, prompts[i], n, params,
                                                     None if keys is None else keys[i]))
                     for i in range(len(prompts))]
            try:
                for done in asyncio.as_completed(tasks):
                    i, completions = await done
                    out[i] = completions
                    if on_group is not None:
                        on_group(i, completions)
            finally:  # a failed round leaves nothing running behind it
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return out

    async def _group(self, http, gate, i: int, prompt: list[int], n: int, params: SamplingParams, key):
        """Prompt i's n samples, each its own request (sglang-router takes one sampling_params
        per request, so per-sample seeds need one request each); the group is done when all are."""
        max_new = clamp_max_new_tokens(params.max_new_tokens, len(prompt), self.context_length)
        if max_new <= 0:
            self.stats["skipped_prompts"] += 1
            return i, [Completion([], [], "length", routing=None if self.routing is None else
                                  unknown(len(prompt), 0, self.routing)) for _ in range(n)]
        if max_new < params.max_new_tokens:
            self.stats["clamped_rows"] += n
        ids = [int(t) for t in prompt]

        async def sample(j: int) -> Completion:
            seed = None if key is None else sampling_seed(params.seed, key, j)
            body = request_fields({"input_ids": ids, "sampling_params": sampling_dict(
                params, max_new, self.stop_token_ids, seed)}, self.routing is not None)
            async with gate:
                return await self._post(http, body)

        return i, list(await asyncio.gather(*(sample(j) for j in range(n))))

    async def _post(self, http, body: dict) -> Completion:
        where = f"{self.url}/generate"
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                self.stats["retries"] += 1
                if self.on_failure is not None:
                    await asyncio.to_thread(self.on_failure)  # raises when no engine is left
                await asyncio.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))
            self.stats["requests"] += 1
            try:
                async with http.post(where, json=body) as resp:
                    status, raw = resp.status, await resp.read()
            except asyncio.TimeoutError:
                problem = f"no answer within {self.timeout_s:g} s"
                continue
            except aiohttp.ClientError as e:  # refused, reset, cut short (an engine died)
                problem = f"connection failed ({type(e).__name__}: {e})"
                continue
            if status >= 400:
                text = raw[:500].decode("utf-8", "replace")
                if status < 500:
                    raise RolloutError(f"POST {where} refused: HTTP {status}: {text}")
                problem = f"HTTP {status}: {text[:300]}"
                continue
            try:
                return parse_generate([json.loads(raw)], 1, where, self.routing, [len(body["input_ids"])])[0]
            except (json.JSONDecodeError, UnicodeDecodeError, RolloutError) as e:  # a half-written answer: ask again
                problem = str(e)
        raise RolloutError(f"POST {where} failed after {self.attempts} attempt(s): {problem}")

