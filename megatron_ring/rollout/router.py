"""The real sglang-router (PyPI `sglang-router`, a Rust binary) as a process we start and stop,
so a fleet of SGLang servers is one URL to the trainer.

It is an SGLangServer (sglang_server.py) with another command: the same own session, log file,
/health wait and SIGTERM-then-SIGKILL stop. What differs, measured with sglang-router 0.3.2:
- /health answers 200 about 1 s after start, before any worker is registered: registration
  (GET /health, /server_info, /model_info of the worker, HTTP/2 first then HTTP/1.1) runs in the
  background, so `start` also waits until GET /workers lists every worker.
- Workers are managed by id: POST /workers {"url"} queues an addition (202), DELETE
  /workers/{uuid} a removal (202; a URL in place of the id is a 400); /add_worker,
  /remove_worker and /list_workers of older routers are 404. Both calls only queue, so
  add_worker/remove_worker wait until the list shows the change.
- Round robin spreads requests without a "model" field over all workers even when their
  model_path (the router's model_id) differ.
- The Prometheus exporter binds 0.0.0.0:29000 unless told otherwise, and a second router on a
  node panics on the taken port: every router gets its own free port, on 127.0.0.1.
- The log is coloured whatever NO_COLOR says: log_tail strips the escapes.
- SIGTERM ends an idle router in ~1.5 s.

What a SIGKILLed worker does to requests (measured: 3 synthetic test servers, requests of 2 s,
the flags below; tests/test_router.py checks the part we rely on):
- Requests in flight on it fail upstream ("error sending request"). With retries (router_argv's
  default: 3 attempts) the router sends the same body (so the same sampling_seed) to another
  worker, and the client gets a normal 200, late by the lost time plus a whole new generation.
  With retries=1 it gets HTTP 500 {"error": {"code": "call_upstream_request_error", ...}}.
- New requests: round robin still picks it; the connection is refused at once (2 ms) and the
  retry goes to another worker (a retry is picked by the same round robin, so it can land on
  the dead one once more). After --cb-failure-threshold (3) failures its circuit breaker opens
  and it is not picked any more (measured: after the two requests it held and one more). The
  health checker marks it is_healthy=false 3-4 s after the kill (2 failed checks 2 s apart).
  With the router's own defaults (10 failures; a check every 60 s, 3 to fail) it was still
  "healthy" 8 s after the kill and every other request paid a retry (+50 ms) until 10 had failed.
- It stays listed (is_healthy false) until remove_worker. A server restarted on the same URL
  is routed to again ~4 s later (2 good checks), with no call to us.
So a dead server costs the requests it held a regeneration, and no error as long as a retry
reaches a live worker; the fleet still has to notice (workers(healthy_only=True)) and replace it.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import time
import urllib.parse

from megatron_ring.platform.distributed import free_port
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import SGLangServer

ROUTER_COMMAND = (sys.executable, "-m", "sglang_router.launch_router")

# The router answers 413 to a larger request body (measured: it does not limit answers). A
# request of 16 rows of up to 32K prompt ids is 16 x 32768 x 8 bytes ("151642, ") = 4 MB. Its
# answer, should a later router limit answers too: per token ~8 bytes in output_ids, ~42 in
# output_token_logprobs ("[-1.2345678901234567e-05, 151642, null], ") and up to ~24 of a real
# server's detokenized text, 74 x 16 x 32768 = 39 MB. 160 MiB: 4x that.
MAX_PAYLOAD_BYTES = 160 * 2**20

# A dead worker is skipped because the router retries a failed request on another worker, and
# stops picking it once its circuit breaker (3 failures; half-open again after 10 s) or the
# health checker (2 failed /health 2 s apart) has marked it. A busy but alive server must pass:
# /health of a real SGLang server runs a 1-token generation, hence the 10 s check timeout.
# Registration of a worker not up yet is retried every 1 s, not 30. Log level warn: info writes
# two lines per request. Stopping ends requests in flight after 5 s, not 180.
ROUTER_FLAGS = ("--health-check-interval-secs", "2", "--health-failure-threshold", "2",
                "--health-check-timeout-secs", "10", "--cb-failure-threshold", "3",
                "--cb-timeout-duration-secs", "10", "--worker-startup-check-interval", "1",
                "--shutdown-grace-period-secs", "5", "--log-level", "warn")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _norm(url: str) -> str:  # the router keeps a URL as given, trailing slash included
    return str(url).rstrip("/")


def version() -> str:
    return importlib.metadata.version("sglang-router")


def router_argv(worker_urls, host: str, port: int, policy: str = "round_robin", retries: int = 3,
                request_timeout_s: float = 3600, extra_args=(), command=ROUTER_COMMAND,
                metrics_port: int | None = None) -> list[str]:
    """retries: attempts in all (the router's --retry-max-retries counts the first one too)."""
    return [*command, "--host", host, "--port", str(port), "--worker-urls", *map(str, worker_urls),
            "--policy", policy, "--retry-max-retries", str(retries),
            "--request-timeout-secs", str(int(request_timeout_s)),
            "--max-payload-size", str(MAX_PAYLOAD_BYTES), *ROUTER_FLAGS,
            "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(free_port() if metrics_port is None else metrics_port),
            *map(str, extra_args)]


class Router(SGLangServer):
    """A running sglang-router: `url`, `log_path`, `proc`; workers(), add_worker(),
    remove_worker(), alive(), log_tail(), stop()."""

    @classmethod
    def start(cls, worker_urls, log_path, port: int | None = None, host: str = "127.0.0.1",
              ready_timeout_s: float = 60.0, **argv_options) -> Router:
        """Launch, and wait until /health is 200 and every worker is registered."""
        port = free_port() if port is None else port
        router = cls(router_argv(worker_urls, host, port, **argv_options), host, port, log_path)
        try:
            deadline = time.monotonic() + ready_timeout_s
            router.wait_ready(ready_timeout_s)
            router._wait_workers(lambda have: {_norm(u) for u in worker_urls} <= set(map(_norm, have)),
                                 f"workers {list(worker_urls)} registered", deadline)
        except BaseException:
            router.stop(grace_s=5.0)
            raise
        return router

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.2) -> None:
        try:
            super().wait_ready(timeout_s, poll_s)
        except RolloutError as e:  # worded for a server
            raise RolloutError(str(e).replace("SGLang server", "sglang-router", 1)) from None

    def log_tail(self, lines: int = 40) -> str:
        return _ANSI.sub("", super().log_tail(lines))

    def _call(self, method: str, endpoint: str, body=None):
        try:
            return SGLangClient(self.url, timeout_s=30.0).request(method, endpoint, body, retry=False)
        except RolloutError as e:
            raise self._error(str(e)) from None

    def _error(self, what: str) -> RolloutError:
        return RolloutError(f"sglang-router {self.url}: {what}; {self.log_path} ends with:\n{self.log_tail()}")

    def _entries(self, healthy_only: bool = False) -> list[dict]:
        answer = self._call("GET", "/workers")
        if not isinstance(answer, dict) or not isinstance(answer.get("workers"), list):
            raise self._error(f"GET /workers answered {str(answer)[:300]}")
        return [w for w in answer["workers"] if not healthy_only or w.get("is_healthy")]

    def workers(self, healthy_only: bool = False) -> list[str]:
        """The registered worker URLs, as they were given (healthy_only: those its health checker
        has not marked unhealthy; a worker whose circuit breaker is open is listed healthy but
        not picked)."""
        return [w["url"] for w in self._entries(healthy_only)]

    def _wait_workers(self, done, what: str, deadline: float, poll_s: float = 0.2) -> None:
        while True:
            if not self.alive():
                raise self._error(f"exited with code {self.proc.returncode} while waiting for {what}")
            have = self.workers()
            if done(have):
                return
            if time.monotonic() > deadline:
                raise self._error(f"no {what} in time; it lists {have}")
            time.sleep(poll_s)

    def add_worker(self, url: str, timeout_s: float = 60.0) -> None:
        """Register a running server; returns once the router lists it. Registration needs the
        server healthy: after a timeout here the router keeps trying in the background (for
        --worker-startup-timeout-secs, 30 min) and adds it if it comes up."""
        if _norm(url) not in map(_norm, self.workers()):
            self._call("POST", "/workers", {"url": url})
        self._wait_workers(lambda have: _norm(url) in map(_norm, have), f"worker {url} added",
                           time.monotonic() + timeout_s)

    def remove_worker(self, url: str, timeout_s: float = 30.0) -> None:
        """Stop routing to url (no-op if not registered); returns once the router drops it."""
        for w in self._entries():
            if _norm(w["url"]) == _norm(url):
                self._call("DELETE", f"/workers/{urllib.parse.quote(str(w['id']))}")
        self._wait_workers(lambda have: _norm(url) not in map(_norm, have), f"worker {url} removed",
                           time.monotonic() + timeout_s)
