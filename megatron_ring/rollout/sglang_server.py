"""Start and stop an SGLang server process for the trainer.

The server runs in its own session (process group) with its output in a log file, so a crash
is reported with the log's tail and stopping it also ends the workers it spawned; it gets
SIGTERM when the process that started it dies, even of SIGKILL (platform/parent_death.py). The command is
a parameter: tests start their small stand-in server exactly the way the real one is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_ring.platform import parent_death
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient

SGLANG_COMMAND = (sys.executable, "-m", "sglang.launch_server")


def server_argv(model_path, host: str, port: int, tp: int = 1, dtype: str | None = None,
                extra_args=(), command=SGLANG_COMMAND) -> list[str]:
    argv = [*command, "--model-path", str(model_path), "--host", host, "--port", str(port)]
    if tp != 1:
        argv += ["--tp", str(tp)]
    if dtype:
        argv += ["--dtype", dtype]
    return argv + [str(a) for a in extra_args]


def _tied():
    """SIGTERM to the server when this process dies; the kernel ties a child to the thread that
    started it, so only a server started by the main thread is tied (others stop with stop())."""
    return parent_death.preexec(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None


class SGLangServer:
    """A server process started by us: `url`, `log_path`, `stop()`."""

    def __init__(self, argv: list[str], host: str, port: int, log_path, env: dict | None = None):
        self.argv, self.url = list(argv), f"http://{host}:{port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env},
                                     start_new_session=True, preexec_fn=_tied())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.2) -> None:
        """Until GET /health is 200; RolloutError with the log tail if it exits or times out."""
        client = SGLangClient(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise RolloutError(f"SGLang server {self.url} exited with code {self.proc.returncode} "
                                   f"before it was ready; {self.log_path} ends with:\n{self.log_tail()}")
            if client.health(timeout_s=2.0):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RolloutError(f"SGLang server {self.url} not healthy after {timeout_s:g} s; "
                                   f"{self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the launcher (it shuts its workers down), SIGKILL to the group after grace_s."""
        if self._log.closed:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its session is left (workers of a launcher that died first)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()


def launch(model_path, log_path, port: int, host: str = "127.0.0.1", tp: int = 1,
           dtype: str | None = None, extra_args=(), command=SGLANG_COMMAND, env: dict | None = None,
           ready_timeout_s: float = 600.0) -> SGLangServer:
    """Start a server on model_path and wait until it is healthy."""
    server = SGLangServer(server_argv(model_path, host, port, tp, dtype, extra_args, command),
                          host, port, log_path, env)
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop(grace_s=5.0)
        raise
    return server
