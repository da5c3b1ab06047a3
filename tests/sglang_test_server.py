"""A small stand-in for an SGLang server, for testing the client where SGLang cannot run.

    python tests/sglang_test_server.py --model-path HF_DIR --host 127.0.0.1 --port P

It serves a Ling model from an HF safetensors directory with the plain-PyTorch forward of
tests/hf_reference.py (no Megatron, no megatron_ring) and implements the request and response
fields of SGLang's native API that the notes record (/generate with input_ids and logprobs, the
weight-update endpoints, health). Pushed weights really replace the served ones: from disk, or
received by broadcast in a process group joined the way SGLang joins it (tcp rendezvous on the
trainer's store, group-name prefix, torch's own group helper), so a protocol mistake in the
client shows up as wrong logprobs or a hang, not as a passing test.

Synthetic mode (`--synthetic-vocab V`), for fleet and scheduling tests where the numbers do not
matter but lengths and timing do: no model is loaded (--model-path is only reported); every row
draws its length from a lognormal (median --synthetic-median-len, sigma --synthetic-len-sigma)
and its token ids in [2, V) and logprobs in [-5, 0) from random.Random(sampling_seed), so a seed
gives the same answer bit for bit, on any server of a fleet. Of the sampling parameters only
max_new_tokens, ignore_eos and sampling_seed (and n) count. A push from disk reads nothing: it
records the version and the path, as a real one would; the distributed push is refused.

Engine-like timing, both modes: --decode-latency-s D makes a request take max(row lengths) x D
seconds (rows of a request decode together, as in continuous batching; requests overlap), and
--max-running-requests R holds a request until its rows fit among the R running sequences (a
request with more rows than R runs alone). /server_info reports context_length (SGLang's
--context-length, default the config's max_position_embeddings) and /generate refuses rows that
do not fit in it with SGLang's 400 and wording. Each /generate result also carries
meta_info.model_path (not an SGLang field) so tests can tell which server of a fleet answered.
The real sglang-router registers it (/health, /server_info, /model_info; its HTTP/2 attempt is
answered 505 and it falls back to HTTP/1.1): tests/test_router.py.

Not modelled: KV cache, tokenizer/text, streaming, TP > 1.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

torch = dist = load_file = hf_forward = None  # imported by import_torch(): not in synthetic mode


def import_torch() -> None:
    """torch takes seconds to import; a synthetic server (of a fleet of them) does not need it."""
    global torch, dist, load_file, hf_forward
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_reference import hf_forward


GREEDY_BELOW = 1e-5  # SGLang samples greedily below this temperature


class BadRequest(Exception):
    pass


def load_hf_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadRequest(f"{path}: no config.json")
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadRequest(f"{path}: no *.safetensors files")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return config, sd


class Model:
    """The served weights; replaced only whole, under the lock, after validation."""

    ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")

    def __init__(self, model_path: str, dtype: str):
        self.config, sd = load_hf_dir(model_path)
        self.model_path = model_path
        self.dtype = None if dtype == "auto" else getattr(torch, dtype)
        self.sd = {k: v.to(self.dtype or v.dtype) for k, v in sd.items()}
        self.weight_version = "default"
        self.lock = threading.Lock()

    def check(self, named: dict[str, tuple]) -> None:
        """named: name -> shape. Refuse unknown, missing-shape or mis-shaped tensors."""
        for name, shape in named.items():
            if name not in self.sd:
                raise BadRequest(f"unknown tensor {name}")
            if tuple(shape) != tuple(self.sd[name].shape):
                raise BadRequest(f"{name} has shape {list(shape)}, served {list(self.sd[name].shape)}")

    def replace(self, tensors: dict[str, torch.Tensor], version) -> None:
        new = {k: v.to(self.sd[k].dtype) for k, v in tensors.items()}
        with self.lock:
            self.sd = {**self.sd, **new}
            if version is not None:
                self.weight_version = str(version)

    def load_dir(self, path: str, version) -> None:
        config, sd = load_hf_dir(path)
        for key in self.ARCH_KEYS:
            if config.get(key) != self.config.get(key):
                raise BadRequest(f"{path}: {key}={config.get(key)} differs from the served model's {self.config.get(key)}")
        if set(sd) != set(self.sd):
            raise BadRequest(f"{path}: tensor names differ from the served model's: "
                             f"{sorted(set(sd) ^ set(self.sd))[:5]}")
        self.check({k: v.shape for k, v in sd.items()})
        self.replace(sd, version)
        self.model_path = path

    def sample(self, prompt: list[int], sp: dict, return_logprob: bool) -> dict:
        start = time.monotonic()
        vocab = self.config["vocab_size"]
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"input_ids must be a non-empty list of token ids below {vocab}")
        max_new = int(sp.get("max_new_tokens", 128))
        temperature = float(sp.get("temperature", 1.0))
        top_p = float(sp.get("top_p", 1.0))
        stops = set(sp.get("stop_token_ids") or [])
        if not sp.get("ignore_eos", False):
            stops.add(self.config.get("eos_token_id"))
        seed = sp.get("sampling_seed")
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed())
        with self.lock:
            sd, version = self.sd, self.weight_version
        seq, out, lps = list(prompt), [], []
        finish = {"type": "length", "length": max_new}
        for _ in range(max_new):
            logits = hf_forward(sd, self.config, torch.tensor([seq]))[0, -1]
            if temperature < GREEDY_BELOW:
                logp = torch.log_softmax(logits, -1)
                tok = int(logits.argmax())
            else:
                logp = torch.log_softmax(logits / temperature, -1)
                p = logp.exp()
                if top_p < 1.0:
                    sp_sorted, order = p.sort(descending=True)
                    drop = sp_sorted.cumsum(-1) - sp_sorted >= top_p
                    p = torch.zeros_like(p).scatter(0, order, sp_sorted.masked_fill(drop, 0.0))
                tok = int(torch.multinomial(p, 1, generator=gen))
            out.append(tok)
            lps.append(float(logp[tok]))
            seq.append(tok)
            if tok in stops:
                finish = {"type": "stop", "matched": tok}
                break
        meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": len(out), "cached_tokens": 0, "weight_version": version,
                "model_path": self.model_path, "e2e_latency": time.monotonic() - start}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
        return {"text": "", "output_ids": out, "meta_info": meta}


class SyntheticModel:
    """Model's interface without a model: seeded random lengths, token ids and logprobs."""

    def __init__(self, model_path: str, vocab: int, eos: int, median_len: float, sigma: float):
        if vocab <= 2:
            raise ValueError("--synthetic-vocab must be > 2 (ids are drawn from [2, V))")
        self.config = {"vocab_size": vocab, "eos_token_id": eos}
        self.model_path, self.weight_version = model_path, "default"
        self.mu, self.sigma = math.log(median_len), sigma
        self.lock = threading.Lock()

    def load_dir(self, path: str, version) -> None:
        with self.lock:
            self.model_path = path
            if version is not None:
                self.weight_version = str(version)

    def sample(self, prompt: list[int], sp: dict, return_logprob: bool) -> dict:
        start = time.monotonic()
        vocab, eos = self.config["vocab_size"], self.config["eos_token_id"]
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"input_ids must be a non-empty list of token ids below {vocab}")
        max_new = int(sp.get("max_new_tokens", 128))
        seed = sp.get("sampling_seed")
        rng = random.Random(int(seed) if seed is not None else None)
        # Drawn first and always, so the ids and logprobs of a seed do not depend on max_new.
        want = max(1, round(rng.lognormvariate(self.mu, self.sigma)))
        if sp.get("ignore_eos", False) or want >= max_new:  # SGLang checks length before eos
            n, finish = max_new, {"type": "length", "length": max_new}
        else:
            n, finish = want, {"type": "stop", "matched": eos}
        span, draw = vocab - 2, rng.random
        out, lps = [], []
        for _ in range(n):
            out.append(2 + int(draw() * span))
            lps.append((draw() - 1.0) * 5.0)
        if finish["type"] == "stop":
            out[-1] = eos
        with self.lock:
            version, path = self.weight_version, self.model_path
        meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": n, "cached_tokens": 0, "weight_version": version,
                "model_path": path, "e2e_latency": time.monotonic() - start}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
        return {"text": "", "output_ids": out, "meta_info": meta}


class WeightGroup:
    """This server's place (rank rank_offset) in the trainer's weight-update group."""

    def __init__(self, body: dict):
        self.name = body.get("group_name", "weight_update_group")
        world, rank = int(body["world_size"]), int(body["rank_offset"])
        timeout = timedelta(seconds=120)
        url = f"tcp://{body['master_address']}:{int(body['master_port'])}"
        store, _, _ = next(dist.rendezvous(url, rank=rank, world_size=world, timeout=timeout))
        store.set_timeout(timeout)
        from torch.distributed.distributed_c10d import _new_process_group_helper, _world  # as SGLang does

        self.pg, _ = _new_process_group_helper(world, rank, [], body.get("backend", "gloo"),
                                               dist.PrefixStore(self.name, store),
                                               group_name=self.name, timeout=timeout)
        _world.pg_group_ranks[self.pg] = {r: r for r in range(world)}

    def receive(self, dtypes, shapes) -> list[torch.Tensor]:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        out = []
        for dtype, shape in zip(dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
            self.pg.broadcast([t], opts).wait()
            out.append(t)
        return out

    def destroy(self):
        dist.destroy_process_group(self.pg)


class State:
    def __init__(self, model, context_length: int, decode_latency_s: float = 0.0,
                 max_running_requests: int = 0):
        self.model = model
        self.synthetic = isinstance(model, SyntheticModel)
        self.context_length = context_length
        self.decode_latency_s = decode_latency_s
        self.max_running = max_running_requests  # in sequences (rows), 0: unlimited
        self.running = 0
        self.capacity = threading.Condition()
        self.groups: dict[str, WeightGroup] = {}
        self.updating = False  # between /begin_weight_update and /end_weight_update

    def check_length(self, prompt: list, sp: dict) -> None:
        """SGLang's TokenizerManager check, with its >= and its words."""
        n_in, max_new = len(prompt), sp.get("max_new_tokens")
        if n_in >= self.context_length:
            raise BadRequest(f"The input ({n_in} tokens) is longer than the model's context "
                             f"length ({self.context_length} tokens).")
        if max_new is not None and int(max_new) + n_in >= self.context_length:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.context_length} tokens. You requested a total of {int(max_new) + n_in} "
                f"tokens: {n_in} tokens from the input messages and {int(max_new)} tokens for the "
                f"completion. Please reduce the number of tokens in the input messages or the "
                f"completion to fit within the limit.")

    def generate(self, rows, return_logprob: bool) -> list[dict]:
        """All rows of a request, holding len(rows) of the engine's running slots meanwhile."""
        k = len(rows)
        with self.capacity:
            self.capacity.wait_for(lambda: not self.max_running or self.running == 0
                                   or self.running + k <= self.max_running)
            self.running += k
        try:
            results = [self.model.sample(p, sp, return_logprob) for p, sp in rows]
            if self.decode_latency_s > 0:
                time.sleep(max(len(r["output_ids"]) for r in results) * self.decode_latency_s)
            return results
        finally:
            with self.capacity:
                self.running -= k
                self.capacity.notify_all()


def _rows(body: dict):
    """(prompt, sampling_params) per request, n samples of a prompt next to each other."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids must be a list of token ids or a list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    sps = body.get("sampling_params") or {}
    if isinstance(sps, dict):
        sps = [sps] * len(prompts)
    if len(sps) != len(prompts):
        raise BadRequest(f"{len(sps)} sampling_params for {len(prompts)} requests")
    rows = []
    for prompt, sp in zip(prompts, sps):
        n = int(sp.get("n", 1))
        seed = sp.get("sampling_seed")
        for j in range(n):  # distinct seeds for parallel samples of one request
            rows.append((prompt, {**sp, "sampling_seed": None if seed is None else int(seed) + j}))
    return single and len(rows) == 1, rows


def handle(state: State, method: str, path: str, body: dict):
    """-> (status, JSON-able answer or text)."""
    m = state.model
    if method == "GET" and path in ("/health", "/health_generate"):
        return 200, ""
    if method == "GET" and path in ("/model_info", "/get_model_info"):
        return 200, {"model_path": m.model_path, "tokenizer_path": None, "is_generation": True,
                     "tp_size": 1, "dp_size": 1, "weight_version": m.weight_version}
    if method == "GET" and path in ("/server_info", "/get_server_info"):
        return 200, {"tp_size": 1, "dp_size": 1, "model_path": m.model_path,
                     "context_length": state.context_length,
                     "max_running_requests": state.max_running}
    if method != "POST":
        return 404, {"error": {"message": f"no {method} {path}"}}
    if path == "/generate":
        single, rows = _rows(body)
        for prompt, sp in rows:
            state.check_length(prompt, sp)
        results = state.generate(rows, bool(body.get("return_logprob")))
        return 200, results[0] if single else results
    if path == "/flush_cache":
        return 200, "Cache flushed.\n"
    if path == "/update_weight_version":
        with m.lock:
            m.weight_version = str(body["new_version"])
        return 200, {"success": True, "new_version": m.weight_version}
    if state.synthetic and path in ("/init_weights_update_group", "/update_weights_from_distributed",
                                    "/update_weights_from_tensor"):
        return 400, {"success": False, "message": f"{path} is not supported in synthetic mode"}
    if path == "/update_weights_from_disk":
        try:
            m.load_dir(body["model_path"], body.get("weight_version"))
        except (BadRequest, OSError, ValueError, KeyError) as e:
            return 400, {"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
    if path == "/init_weights_update_group":
        name = body.get("group_name", "weight_update_group")
        if name in state.groups:
            return 400, {"success": False, "message": f"group {name!r} already exists"}
        state.groups[name] = WeightGroup(body)
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
    if path == "/destroy_weights_update_group":
        group = state.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is not None:
            group.destroy()
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
    if path in ("/begin_weight_update", "/end_weight_update"):
        state.updating = path == "/begin_weight_update"
        return 200, {"success": True, "message": ""}
    if path == "/update_weights_from_distributed":
        if not state.updating:
            return 400, {"success": False, "message": "call /begin_weight_update first"}
        group = state.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return 400, {"success": False, "message": "no such weight update group"}
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        received = group.receive(dtypes, shapes)  # before any check: keep in step with rank 0
        try:
            m.check(dict(zip(names, shapes)))
        except BadRequest as e:
            return 400, {"success": False, "message": str(e)}
        m.replace(dict(zip(names, received)), body.get("weight_version"))
        return 200, {"success": True, "message": "Succeeded to update parameter online."}
    return 404, {"error": {"message": f"no POST {path}"}}


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                status, answer = handle(state, method, self.path, body)
            except BadRequest as e:  # SGLang's shape of a refusal: the message alone
                status, answer = 400, {"error": {"message": str(e)}}
            except (KeyError, TypeError, ValueError) as e:
                status, answer = 400, {"error": {"message": f"{type(e).__name__}: {e}"}}
            except Exception as e:  # noqa: BLE001 - a server answers 500, it does not die
                status, answer = 500, {"error": {"message": f"{type(e).__name__}: {e}"}}
            raw = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # not 5: a router opens many connections at once


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context-length", type=int, default=None,
                    help="default: the config's max_position_embeddings (synthetic: 32768)")
    ap.add_argument("--max-running-requests", type=int, default=0,
                    help="running sequences (rows) at most; 0: unlimited")
    ap.add_argument("--decode-latency-s", type=float, default=0.0,
                    help="seconds per decoded token of a request's longest row")
    ap.add_argument("--base-gpu-id", type=int, default=0, help="accepted and ignored, as on CPU")
    ap.add_argument("--synthetic-vocab", type=int, default=0, help="> 0: synthetic mode, no model")
    ap.add_argument("--synthetic-median-len", type=float, default=200.0)
    ap.add_argument("--synthetic-len-sigma", type=float, default=0.8)
    ap.add_argument("--synthetic-eos", type=int, default=1)
    args, unknown = ap.parse_known_args(argv)
    if args.tp != 1:
        ap.error("the test server serves with --tp 1 only")
    if unknown:
        print(f"ignoring SGLang options {unknown}", file=sys.stderr)
    if args.synthetic_vocab > 0:
        model = SyntheticModel(args.model_path, args.synthetic_vocab, args.synthetic_eos,
                               args.synthetic_median_len, args.synthetic_len_sigma)
    else:
        import_torch()
        torch.set_num_threads(1)
        model = Model(args.model_path, args.dtype)
    context = args.context_length or model.config.get("max_position_embeddings") or 32768
    state = State(model, context, args.decode_latency_s, args.max_running_requests)
    server = Server((args.host, args.port), make_handler(state))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mode = " (synthetic)" if state.synthetic else ""
    print(f"serving {args.model_path}{mode} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
