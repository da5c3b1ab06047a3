"""torchrun as a launcher runs it: every rank's output kept in a log directory, local rank 0's
shown live, and a failed worker reported as one error line with exit code 2, instead of each
rank's traceback followed by torchrun's elastic ChildFailedError report (~65 lines).

`python -m megatron_ring.platform.torchrun_agent PROG LOG_DIR TORCHRUN_ARGS...` is torchrun's own
agent (torch.distributed.run.main) with `--log-dir LOG_DIR --redirects 3`: rank r writes
LOG_DIR/<run id>/attempt_<n>/<r>/stdout.log and stderr.log, and torchrun's own log goes to
LOG_DIR/torchrun.log. Rank 0's output is copied to the console as it grows (progress bars
included) without its error reports (tracebacks, `megatron-ring CMD: error:` lines); when a
worker fails the agent names the log directory and prints, once, the first error of the rank
that failed first (failure_report). Workers die with this process (parent_death.PARENT_ENV).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from megatron_ring.platform import parent_death

_RANK_PREFIX = re.compile(r"\[rank\d+\]: ?")  # torch's excepthook in workers prefixes traceback lines
_ERROR_LINE = re.compile(r"megatron-ring [\w-]+: error: ")
_TRACEBACK = "Traceback (most recent call last):"
_CHAIN = ("Traceback", "During handling of the above exception", "The above exception")


def _body(line: str) -> str:
    m = _RANK_PREFIX.match(line)
    return line[m.end():] if m else line


def first_error(text: str) -> str | None:
    """A worker's first error in its stderr: a `megatron-ring CMD: error:` line with the indented
    detail lines under it, or the exception line that ends its first traceback (the root cause
    of a chain)."""
    in_traceback, report = False, []
    for line in map(_body, text.splitlines()):
        if report:
            if not line.startswith(" "):
                break
            report.append(line)
        elif in_traceback and line and not line[0].isspace() and not line.startswith(_CHAIN):
            return line
        elif line.startswith(_TRACEBACK):
            in_traceback = True
        elif not in_traceback and _ERROR_LINE.match(line):
            report.append(line)
    return "\n".join(report) or None


class ConsoleFilter:
    """A worker's stderr on its way to the console, without its error reports (tracebacks, and
    `megatron-ring CMD: error:` lines with their indented details): the agent says the first one
    once, at the end. Carriage returns end a segment too, so progress bars pass as drawn."""

    def __init__(self, out):
        self.out = out
        self.pending = ""
        self.hiding = None  # "traceback", "chain" (after its exception line) or "report" while inside one
        self.midline = False  # a partial line was written: what follows belongs to it

    def feed(self, text: str, final: bool = False) -> None:
        self.pending += text
        while self.pending:
            ends = [i for i in (self.pending.find("\n"), self.pending.find("\r")) if i >= 0]
            if ends:
                cut = min(ends) + 1
                segment, self.pending = self.pending[:cut], self.pending[cut:]
                self._segment(segment, complete=True)
            elif final or not self._may_hide(self.pending):
                segment, self.pending = self.pending, ""
                self._segment(segment, complete=False)
            else:
                break
        self.out.flush()

    def _may_hide(self, partial: str) -> bool:
        """Could this unfinished line still turn out to belong to an error report?"""
        if self.midline:
            return False
        if self.hiding:
            return True
        body = _body(partial)
        return (_TRACEBACK.startswith(body) or body.startswith(_TRACEBACK) or _ERROR_LINE.match(body) is not None
                or "megatron-ring ".startswith(body) or (body.startswith("megatron-ring ") and len(body) < 60)
                or (body.startswith("[") and len(body) < 12))

    def _segment(self, segment: str, complete: bool) -> None:
        at_start, self.midline = not self.midline, not complete
        if not at_start:
            if not self.hiding:
                self.out.write(segment)
            return
        body = _body(segment)
        if self.hiding == "traceback":  # frames, up to the exception line (hidden too)
            if body.strip() and not body[0].isspace() and not body.startswith(_CHAIN):
                self.hiding = "chain"
            return
        if self.hiding == "chain":  # blank lines and "During handling ..." may lead to another traceback
            if not body.strip() or body.startswith(_CHAIN):
                if body.startswith(_TRACEBACK):
                    self.hiding = "traceback"
                return
            self.hiding = None
        if self.hiding == "report":  # the error line's indented details
            if body.startswith(" "):
                return
            self.hiding = None
        if body.startswith(_TRACEBACK):
            self.hiding = "traceback"
        elif _ERROR_LINE.match(body):
            self.hiding = "report"
        else:
            self.out.write(segment)


class RankZeroConsole(threading.Thread):
    """Copies local rank 0's stdout and stderr files to this process's, as they grow."""

    def __init__(self, log_dir: Path):
        super().__init__(daemon=True, name="rank0-console")
        self.log_dir = log_dir
        self.done = threading.Event()
        self.offsets: dict[Path, int] = {}
        self.decoders: dict[Path, codecs.IncrementalDecoder] = {}
        self.stderr = ConsoleFilter(sys.stderr)

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.pump()
        self.pump(final=True)

    def pump(self, final: bool = False) -> None:
        for name, write in (("stdout.log", self._stdout), ("stderr.log", self.stderr.feed)):
            for path in sorted(self.log_dir.glob(f"*/attempt_*/0/{name}")):
                try:
                    with open(path, "rb") as f:
                        f.seek(self.offsets.get(path, 0))
                        data = f.read()
                except OSError:
                    continue
                self.offsets[path] = self.offsets.get(path, 0) + len(data)
                decoder = self.decoders.setdefault(path, codecs.getincrementaldecoder("utf-8")(errors="replace"))
                text = decoder.decode(data, final=final)
                if text or final:
                    write(text, final=final)

    @staticmethod
    def _stdout(text: str, final: bool = False) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def stop(self) -> None:
        self.done.set()
        self.join()


def _route_torchrun_log(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("torch.distributed")
    log.handlers[:] = [handler]
    log.propagate = False


def failure_report(prog: str, log_dir: Path, failed) -> list[str]:
    """The lines that end a failed run: where the logs are, then the root cause. Ranks torchrun
    stopped itself (its log names each "closing signal") are consequences, not causes; among the
    others a deliberate error line wins over a kill by a signal, which wins over a traceback (a
    peer's lost connection follows a kill), then the earliest stderr (rank order for deliberate
    errors)."""
    log = log_dir / "torchrun.log"
    stopped = {int(p) for p in re.findall(r"Sending process (\d+) closing signal", log.read_text())} \
        if log.is_file() else set()
    causes = {r: f for r, f in failed.failures.items() if f.pid not in stopped} or failed.failures
    candidates = []
    for rank, f in causes.items():
        errs = sorted(log_dir.glob(f"*/attempt_*/{f.local_rank}/stderr.log"))
        line = first_error(errs[-1].read_text(errors="replace")) if errs else None
        if line and _ERROR_LINE.match(line):  # deliberate: the worker said what is wrong
            kind, text = 0, line
        elif f.exitcode < 0:
            kind, text = 1, f"rank {rank} (pid {f.pid}) was killed by {signal.Signals(-f.exitcode).name}"
        elif line:
            kind, text = 2, line
        else:
            kind, text = 3, f"rank {rank} (pid {f.pid}) exited with code {f.exitcode}"
        # Deliberate errors are causes on every rank that says one: rank 0 first (it coordinates
        # collective work such as checkpoint writes, so it knows most); the others by time.
        when = 0 if kind == 0 else errs[-1].stat().st_mtime_ns if errs else 0
        candidates.append((kind, when, rank, text, errs[-1] if errs else None))
    kind, _, rank, text, err = min(candidates, key=lambda c: c[:3])
    if not text.startswith(f"{prog}: error: "):
        text = f"{prog}: error: {text}"
    where = f"; rank {rank}'s stderr: {err}" if err is not None else ""
    return [f"{prog}: worker logs in {log_dir}{where}", text]


def main(argv: list[str]) -> int:
    # deferred: torch is slow to import, and the launcher and tests use the log helpers above without it
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException  # torch: as above
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # torch: as above

    prog, log_dir, torchrun_args = argv[0], Path(argv[1]), argv[2:]
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ[parent_death.PARENT_ENV] = str(os.getpid())  # the workers die with this process
    _route_torchrun_log(log_dir / "torchrun.log")
    console = RankZeroConsole(log_dir)
    console.start()
    failed = None
    try:
        run.main(["--log-dir", str(log_dir), "--redirects", "3", *torchrun_args])
    except ChildFailedError as e:
        failed = e
    except SignalException as e:  # torchrun stopped its workers on SIGTERM/SIGINT
        console.stop()
        print(f"{prog}: stopped by {signal.Signals(e.sigval).name}; worker logs in {log_dir}", file=sys.stderr)
        return 128 + int(e.sigval)
    console.stop()
    if failed is None:
        return 0
    for line in failure_report(prog, log_dir, failed):
        print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
