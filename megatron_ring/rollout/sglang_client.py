"""HTTP client for SGLang's native API (/generate with token ids, weight updates, health).

Stdlib only (urllib), so the trainer needs no HTTP dependency. Every answer is checked field by
field: a rollout whose logprobs do not line up with its tokens would silently corrupt the
policy-gradient ratios, so a malformed answer is an error that names the URL and the field.
Connection errors and 5xx answers are retried with exponential backoff; 4xx answers (the server
refused the request) and timeouts are not, because repeating them would not help.

Sampling n > 1: every (prompt, sample) pair is sent as its own row of the input_ids batch, with
its own sampling_params. SGLang's own `n` expands a batch in an order that has changed between
versions, and with one sampling_seed for the request all n samples would be identical; one row
per sample keeps the answer order ours (prompt-major) and every sample reproducible from
(seed, key, sample index).

Logprobs: SGLang reports log-softmax(logits / temperature) of each sampled token (of the raw
logits when greedy, temperature 0), the same quantity the embedded sampler returns.

Routed experts (a RoutingSpec given): requests carry return_routed_experts and every Completion
gets .routing from meta_info.routed_experts (rollout/routed_experts.py); an answer without it
is an error, since SGLang silently drops the field on a server started without
--enable-return-routed-experts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from numbers import Real

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rollout import routed_experts
from megatron_ring.rollout.base import Completion, RolloutError
from megatron_ring.rollout.routed_experts import RoutingSpec

FINISH_TYPES = ("stop", "length", "abort")


def sampling_seed(seed: int, key: int, sample: int) -> int:
    """A distinct, reproducible 31-bit seed per (run seed, prompt key, sample index)."""
    return ((seed * 1_000_003 + key) * 1_000_033 + sample) % (2**31 - 1)


class SGLangClient:
    """One SGLang server at `url` (e.g. http://127.0.0.1:30000)."""

    def __init__(self, url: str, timeout_s: float = 3600.0, attempts: int = 4,
                 backoff_s: float = 0.5, backoff_max_s: float = 8.0):
        self.url = url.rstrip("/")
        self.timeout_s, self.attempts = timeout_s, max(1, attempts)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s

    # -- transport ---------------------------------------------------------------------------

    def _once(self, method: str, endpoint: str, body, timeout_s: float):
        """One request -> (status, parsed JSON or raw text). Raises OSError on no connection."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + endpoint, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return status, text

    def request(self, method: str, endpoint: str, body=None, retry: bool = True,
                timeout_s: float | None = None):
        """The parsed JSON answer of a 2xx; RolloutError naming URL and endpoint otherwise."""
        where = f"{self.url}{endpoint}"
        attempts = self.attempts if retry else 1
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                status, answer = self._once(method, endpoint, body, timeout_s)
            except (TimeoutError, socket.timeout):
                raise RolloutError(f"{method} {where}: no answer within {timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                problem = f"cannot connect ({getattr(e, 'reason', e)!r})"
                continue
            if 200 <= status < 300:
                return answer
            detail = answer.get("message", answer.get("error", answer)) if isinstance(answer, dict) else answer
            problem = f"HTTP {status}: {str(detail)[:500]}"
            if status < 500:
                raise RolloutError(f"{method} {where} refused: {problem}")
        raise RolloutError(f"{method} {where} failed after {attempts} attempt(s): {problem}")

    def post(self, endpoint: str, body=None, retry: bool = True, timeout_s: float | None = None):
        return self.request("POST", endpoint, {} if body is None else body, retry, timeout_s)

    # -- serving -----------------------------------------------------------------------------

    def health(self, timeout_s: float = 5.0) -> bool:
        """True when GET /health answers 200 (503 while the server starts)."""
        try:
            status, _ = self._once("GET", "/health", None, timeout_s)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def wait_healthy(self, timeout_s: float, poll_s: float = 2.0) -> None:
        """Until /health answers 200: a server started beside the trainer (a dedicated SLURM
        node) may still be loading its model when the trainer starts."""
        deadline = time.monotonic() + timeout_s
        while not self.health(timeout_s=min(5.0, timeout_s)):
            if time.monotonic() > deadline:
                raise RolloutError(f"{self.url}: not healthy after {timeout_s:g} s (rollout.ready_timeout_s)")
            time.sleep(poll_s)

    def model_info(self) -> dict:
        return self.request("GET", "/model_info")

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None, stop_token_ids: list[int] | None = None,
                 routing: RoutingSpec | None = None) -> list[list[Completion]]:
        """n completions per prompt. With keys, sample j of prompt i is seeded by
        sampling_seed(params.seed, keys[i], j); without, the server picks its randomness.
        routing: also each sample's routed experts (Completion.routing)."""
        if keys is not None and len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        if not prompts or n < 1:
            return [[] for _ in prompts]
        body = generate_body(prompts, n, params, keys, stop_token_ids, routing is not None)
        answer = self.post("/generate", body)
        flat = parse_generate(answer, len(prompts) * n, f"{self.url}/generate", routing,
                              [len(p) for p in prompts for _ in range(n)])
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    # -- weights -----------------------------------------------------------------------------

    def update_weights_from_disk(self, path: str, version: int | str) -> dict:
        """Reload the served weights from an HF directory readable by the server."""
        answer = self.post("/update_weights_from_disk",
                           {"model_path": str(path), "weight_version": str(version), "flush_cache": True})
        return _check_success(answer, f"{self.url}/update_weights_from_disk")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> dict:
        """Blocks until every rank (the trainer as rank 0 too) has joined; not retried."""
        answer = self.post("/init_weights_update_group",
                           {"master_address": master_address, "master_port": int(master_port),
                            "rank_offset": int(rank_offset), "world_size": int(world_size),
                            "group_name": group_name, "backend": backend}, retry=False)
        return _check_success(answer, f"{self.url}/init_weights_update_group")

    def begin_weight_update(self) -> None:
        self.post("/begin_weight_update", retry=False)

    def end_weight_update(self) -> None:
        self.post("/end_weight_update", retry=False)

    @contextlib.contextmanager
    def weight_update(self):
        """begin/end around /update_weights_from_distributed and _from_tensor (required since 0.5.23)."""
        self.begin_weight_update()
        try:
            yield
        finally:
            self.end_weight_update()

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str = "weight_update_group",
                                        version: int | str | None = None, flush_cache: bool = True,
                                        load_format: str | None = None) -> dict:
        """Blocks until the trainer has broadcast these tensors, in this order (load_format
        "flattened_bucket": as one flat uint8 tensor); not retried (a repeated call would wait
        for broadcasts that never come)."""
        body = {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
                "group_name": group_name, "flush_cache": flush_cache}
        if version is not None:
            body["weight_version"] = str(version)
        if load_format is not None:
            body["load_format"] = load_format
        answer = self.post("/update_weights_from_distributed", body, retry=False)
        return _check_success(answer, f"{self.url}/update_weights_from_distributed")

    def update_weights_from_tensor(self, serialized: list[str], version: int | str,
                                   load_format: str | None = "flattened_bucket", flush_cache: bool = True) -> dict:
        """One payload per TP rank of the engine (each rank opens its own: CUDA IPC handles, or
        shared-memory file names on the CPU); not retried."""
        body = {"serialized_named_tensors": list(serialized), "load_format": load_format,
                "flush_cache": flush_cache, "weight_version": str(version)}
        answer = self.post("/update_weights_from_tensor", body, retry=False)
        return _check_success(answer, f"{self.url}/update_weights_from_tensor")

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self.post("/destroy_weights_update_group", {"group_name": group_name}, retry=False, timeout_s=30.0)

    def get_weights_by_name(self, name: str, truncate_size: int) -> list:
        """The served tensor's first truncate_size rows as floats (RolloutError where the model
        class has no get_weights_by_name: SGLang's BailingMoe answers 400)."""
        return self.post("/get_weights_by_name", {"name": name, "truncate_size": int(truncate_size)}, retry=False)

    def release_memory(self, tags: list[str]) -> None:
        """Free the engine's GPU memory of these kinds (kv_cache, weights); needs --enable-memory-saver."""
        self.post("/release_memory_occupation", {"tags": list(tags)}, retry=False)

    def resume_memory(self, tags: list[str]) -> None:
        self.post("/resume_memory_occupation", {"tags": list(tags)}, retry=False)


def sampling_dict(params: SamplingParams, max_new_tokens: int, stop_token_ids: list[int] | None,
                  seed: int | None) -> dict:
    """One row's sampling_params."""
    sp = {"max_new_tokens": max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
    if stop_token_ids:
        sp["stop_token_ids"] = list(stop_token_ids)
    if seed is not None:
        sp["sampling_seed"] = seed
    return sp


def generate_body(prompts: list[list[int]], n: int, params: SamplingParams, keys: list[int] | None,
                  stop_token_ids: list[int] | None, routed_experts: bool = False) -> dict:
    """A batched /generate request: one input_ids row per (prompt, sample), prompt-major, each
    with its own sampling_params (and seed, with keys)."""
    rows, sampling = [], []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            seed = None if keys is None else sampling_seed(params.seed, keys[i], j)
            rows.append([int(t) for t in prompt])
            sampling.append(sampling_dict(params, params.max_new_tokens, stop_token_ids, seed))
    return request_fields({"input_ids": rows, "sampling_params": sampling}, routed_experts)


def request_fields(body: dict, routed_experts: bool) -> dict:
    """The answer fields every /generate request asks for (batch or single)."""
    body.update(return_logprob=True, logprob_start_len=-1)
    if routed_experts:
        body["return_routed_experts"] = True
    return body


def _check_success(answer, where: str) -> dict:
    if not isinstance(answer, dict) or "success" not in answer:
        raise RolloutError(f"{where}: answer has no 'success' field: {str(answer)[:300]}")
    if not answer["success"]:
        raise RolloutError(f"{where}: success=false: {answer.get('message', '')}")
    return answer


def parse_generate(answer, expected: int, where: str, routing: RoutingSpec | None = None,
                   prompt_lens: list[int] | None = None) -> list[Completion]:
    """Check a /generate batch answer field by field and turn it into Completions. routing:
    the requests asked for routed experts; prompt_lens (one per result) place them."""
    if not isinstance(answer, list):
        raise RolloutError(f"{where}: expected a list of {expected} results, got {type(answer).__name__}")
    if len(answer) != expected:
        raise RolloutError(f"{where}: {len(answer)} results for {expected} requests")
    if routing is not None and (prompt_lens is None or len(prompt_lens) != expected):
        raise ValueError(f"routed experts need the prompt length of each of the {expected} results")
    return [_parse_one(item, f"{where}: result[{k}]", routing, prompt_lens[k] if routing else 0)
            for k, item in enumerate(answer)]


def _parse_one(item, where: str, routing: RoutingSpec | None = None, prompt_len: int = 0) -> Completion:
    def need(obj, key, kind, path):
        if not isinstance(obj, dict) or key not in obj:
            raise RolloutError(f"{where}: missing field {path}")
        if not isinstance(obj[key], kind):
            raise RolloutError(f"{where}: field {path} is {type(obj[key]).__name__}, expected {kind.__name__}")
        return obj[key]

    ids = need(item, "output_ids", list, "output_ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RolloutError(f"{where}: field output_ids holds something other than token ids")
    meta = need(item, "meta_info", dict, "meta_info")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in FINISH_TYPES:
        raise RolloutError(f"{where}: field meta_info.finish_reason is {finish!r}, "
                           f"expected a dict with type in {FINISH_TYPES}")
    if kind == "abort":
        msg = finish.get("message", "") if isinstance(finish, dict) else ""
        raise RolloutError(f"{where}: the server aborted the request "
                           f"(meta_info.finish_reason.message: {msg!r})")
    entries = need(meta, "output_token_logprobs", list, "meta_info.output_token_logprobs")
    if len(entries) != len(ids):
        raise RolloutError(f"{where}: field meta_info.output_token_logprobs has {len(entries)} entries "
                           f"for {len(ids)} output_ids")
    logprobs = []
    for k, (entry, tok) in enumerate(zip(entries, ids)):
        path = f"meta_info.output_token_logprobs[{k}]"
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise RolloutError(f"{where}: field {path} is {entry!r}, expected [logprob, token_id, text]")
        lp, t = entry[0], entry[1]
        if not isinstance(lp, Real) or isinstance(lp, bool):
            raise RolloutError(f"{where}: field {path}[0] (logprob) is {lp!r}")
        if t != tok:
            raise RolloutError(f"{where}: field {path}[1] is token {t!r} but output_ids[{k}] is {tok}")
        logprobs.append(float(lp))
    version = meta.get("weight_version")
    experts = None
    if routing is not None:
        if "routed_experts" not in meta:
            raise RolloutError(f"{where}: missing field {routed_experts.FIELD} (SGLang leaves it out without "
                               "--enable-return-routed-experts at the server's launch)")
        experts = routed_experts.decode(meta["routed_experts"], prompt_len, len(ids), routing.layers,
                                        routing.top_k, where)
    return Completion(tokens=list(ids), logprobs=logprobs, finish_reason=kind,
                      weight_version=None if version is None else str(version), routing=experts)
