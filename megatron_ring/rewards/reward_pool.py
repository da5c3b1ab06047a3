"""Rewards computed in worker processes with a hard timeout: a verifier that hangs (a pathological
sympy expression, a sandbox that never returns) is SIGKILLed and replaced, and its item scores 0,
instead of stalling the whole RL step.

An item's deadline is `timeout_s`, except for code: the sandbox's own wall clock for the row's
number of cases plus a margin, so a correct program with slow or many cases is not cut off.

Workers are started with "spawn": the trainer has torch and gloo threads, which fork would copy in
a broken state. Each item runs in a worker's main thread, where Math-Verify's signal.alarm
timeouts work.

Every reward function is fn(response, row, settings) -> reward, or (reward, why it is 0), where
settings (CodeRewardSettings: hidden paths, sandbox limits, float tolerance) are the pool's own,
given at construction and sent to each worker: nothing is configured process-wide. `score_one`
is what a worker does for one item; a caller scoring in its own process (held-out evaluation)
calls it with its settings."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait

from megatron_ring.rewards.choice_reward import score_choice
from megatron_ring.rewards.code_reward import CodeRewardSettings, code_verdict, run_tests, sandbox_budget_s
from megatron_ring.rewards.math_reward import score_math
from megatron_ring.rewards.sandbox import bwrap_path


def math_reward(response: str, row: dict, settings: CodeRewardSettings) -> float:
    return score_math(response, str(row["answer"]))


def choice_reward(response: str, row: dict, settings: CodeRewardSettings) -> float:
    return score_choice(response, str(row["answer"]))


# domain -> fn(response, row, settings) -> reward, or (reward, why it is 0): code says which case
# failed; row is the whole prompt row (PromptRow.row).
REWARD_FNS = {"math": math_reward, "science": choice_reward, "code": code_verdict}

STARTUP_TIMEOUT_S = 120.0  # a worker importing sympy on a loaded machine
POLL_S = 0.02  # how often a streaming pool with busy workers looks for newly arrived batches
CODE_MARGIN_S = 5.0  # a code item's deadline past the sandbox's own: extraction, killing it, replying


@dataclass
class RewardResult:
    reward: float
    timed_out: bool = False
    error: str | None = None  # why the reward is 0, when known (a failed code case, a verifier's error)


def verdict(value) -> tuple[float, str | None]:
    """A reward fn's answer as (reward, why it is 0)."""
    return (float(value[0]), value[1]) if isinstance(value, tuple) else (float(value), None)


def score_one(domain: str, response: str, row: dict, settings: CodeRewardSettings,
              fns: dict | None = None) -> RewardResult:
    """One item scored in this process, without a deadline (what a pool's worker does): a domain
    without a reward function, or a verifier that raises, scores 0 with the reason."""
    fns = REWARD_FNS if fns is None else fns
    if domain not in fns:
        return RewardResult(0.0, error=f"no reward function for domain {domain!r}")
    try:
        reward, error = verdict(fns[domain](response, row, settings))
    except Exception as e:  # a verifier's bug scores 0, it does not stop the run
        reward, error = 0.0, f"{type(e).__name__}: {e}"
    return RewardResult(reward, False, error)


def _serve(conn, fns: dict, settings: CodeRewardSettings) -> None:
    """The worker: one item at a time, in this process's main thread."""
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, domain, response, row = message
        result = score_one(domain, response, row, settings, fns)
        conn.send((index, result.reward, result.error))


class _Worker:
    def __init__(self, ctx, fns: dict, settings: CodeRewardSettings):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fns, settings), daemon=True,
                                   name="reward-worker")
        self.process.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.item: tuple[tuple, float, float] | None = None  # ((batch tag, index), deadline, seconds allowed)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """score([(domain, response, row), ...]) -> [RewardResult] in input order.

    `settings` (CodeRewardSettings: the host paths code never sees, the sandbox limits, the float
    tolerance of function results for rows without their own) go to every worker with each item's
    reward fn; `fns` replaces the domain -> reward table (module-level functions: they are pickled
    to the workers)."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0,
                 settings: CodeRewardSettings | None = None, fns: dict | None = None):
        if workers < 1:
            raise ValueError(f"reward workers must be >= 1, got {workers}")
        self.timeout_s = timeout_s
        self.fns = dict(REWARD_FNS if fns is None else fns)
        self.settings = CodeRewardSettings() if settings is None else settings
        if self.fns.get("code") is code_verdict:
            _check_sandbox(self.settings)
        self._ctx = mp.get_context("spawn")
        self._workers = [self._spawn() for _ in range(workers)]
        self._closed = False

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.fns, self.settings)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def score(self, items: list[tuple[str, str, dict]]) -> list[RewardResult]:
        inbox = queue.SimpleQueue()
        inbox.put((0, items))
        inbox.put(None)
        return self.score_stream(inbox)[0][0]

    def score_stream(self, inbox) -> dict:
        """Score batches as they arrive: inbox yields (tag, items) and then None. Returns
        {tag: (results in item order, time.monotonic() when the batch's last item was done)}.
        Items are handed to idle workers as soon as they are read, so a caller generating in
        another thread has its early batches scored while it is still generating."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        batches: dict = {}  # tag -> [results, items left, done at]
        waiting = deque()
        open_inbox = True

        def take(entry) -> bool:
            if entry is None:
                return False
            tag, items = entry
            if tag in batches:
                raise ValueError(f"reward batch {tag!r} submitted twice")
            batch = batches[tag] = [[None] * len(items), len(items), time.monotonic()]
            for index, (domain, response, row) in enumerate(items):
                if domain in self.fns:
                    waiting.append(((tag, index), domain, response, row))
                else:
                    self._done(batch, index, RewardResult(0.0, error=f"no reward function for domain {domain!r}"))
            return True

        def busy() -> bool:
            return bool(waiting) or any(w.item for w in self._workers)

        while open_inbox or busy():
            while open_inbox:  # read what has arrived; block only when there is nothing else to do
                try:
                    open_inbox = take(inbox.get() if not busy() else inbox.get_nowait())
                except queue.Empty:
                    break
            for worker in self._workers:
                if worker.ready and worker.item is None and waiting:
                    message = waiting.popleft()
                    worker.conn.send(message)
                    seconds = self.deadline_s(message[1], message[3])
                    worker.item = (message[0], time.monotonic() + seconds, seconds)
            if busy():
                self._collect(batches, POLL_S if open_inbox else None)
        return {tag: (b[0], b[2]) for tag, b in batches.items()}

    @staticmethod
    def _done(batch: list, index: int, result: RewardResult) -> None:
        batch[0][index] = result
        batch[1] -= 1
        if batch[1] == 0:
            batch[2] = time.monotonic()

    def deadline_s(self, domain: str, row: dict) -> float:
        """How long an item may take: code, the sandbox's budget for its cases + CODE_MARGIN_S."""
        if domain == "code" and self.fns.get("code") is code_verdict:
            return sandbox_budget_s(row, self.settings.limits) + CODE_MARGIN_S
        return self.timeout_s

    def _collect(self, batches: dict, poll_s: float | None) -> None:
        """Wait for the next message or deadline (at most poll_s, to read new batches); kill and
        replace late or dead workers."""
        now = time.monotonic()
        deadlines = [w.item[1] if w.item else w.started + STARTUP_TIMEOUT_S
                     for w in self._workers if w.item or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        if poll_s is not None:
            timeout = poll_s if timeout is None else min(timeout, poll_s)
        ready = wait([w.conn for w in self._workers], timeout)
        for worker in list(self._workers):
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    self._lost(worker, batches, f"reward worker died (exit code {worker.process.exitcode})")
                    continue
                if message == "ready":
                    worker.ready = True
                else:
                    (tag, index), reward, error = message
                    self._done(batches[tag], index, RewardResult(reward, False, error))
                    worker.item = None
            elif worker.item and time.monotonic() >= worker.item[1]:
                tag, index = worker.item[0]
                self._done(batches[tag], index, RewardResult(0.0, True, f"timed out after {worker.item[2]:g}s"))
                self._replace(worker)
            elif not worker.ready and time.monotonic() >= worker.started + STARTUP_TIMEOUT_S:
                raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT_S}s")

    def _lost(self, worker: _Worker, batches: dict, reason: str) -> None:
        if worker.item is None and not worker.ready:
            raise RuntimeError(f"{reason} while starting; run a reward fn in this process to see why")
        if worker.item is not None:
            tag, index = worker.item[0]
            self._done(batches[tag], index, RewardResult(0.0, False, reason))
        self._replace(worker)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(5.0)
            worker.kill()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if hasattr(self, "_closed"):
            self.close()


def _check_sandbox(settings: CodeRewardSettings) -> None:
    """Fail at startup, not as a silent 0 on every code item, when the sandbox cannot run."""
    bwrap_path()
    result = run_tests("print(input())", [{"input": "ok\n", "output": "ok\n"}], settings)
    if not result.all_passed:
        raise RuntimeError(f"the code sandbox fails a trivial program: {result.error}")
