"""Reading data files row by row, jsonl or parquet: every row is decoded (UTF-8) and parsed or
counted as bad, by reason, with file:line for the first few (a parquet row's "line" is its
1-based row number). Nothing is dropped silently; the caller's policy decides whether bad rows
are skipped or stop the run. Rows stream: a file is never held whole in memory."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class DataError(ValueError):
    pass


@dataclass
class RowReport:
    total: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str, show: int) -> None:
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.first) < show:
            self.first.append(f"{where}: {reason}")

    @property
    def n_bad(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        text = f"{self.total} rows read, {self.kept} kept, {self.n_bad} bad"
        if self.n_bad:
            text += " (" + ", ".join(f"{n} {r}" for r, n in self.reasons.most_common()) + ")"
            text += "".join(f"\n  {line}" for line in self.first)
        return text

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "bad": self.n_bad,
                "reasons": dict(self.reasons), "first_bad": self.first}


PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH = 256


def _without_nulls(value):
    """A parquet table has one schema: a key some rows lack is null in them. Dropped, so a row
    reads as its jsonl line would (nested messages of mixed forms included)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def iter_raw(path: str, what: str) -> Iterator[tuple[int, object]]:
    """(line number, raw row) of one file: bytes of a non-blank jsonl line (load_row decodes
    it), or a parquet row as a dict."""
    if not Path(path).is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        if str(path).endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq  # deferred: only parquet inputs need it

            lineno = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH):
                for row in batch.to_pylist():
                    lineno += 1
                    yield lineno, _without_nulls(row)
            return
        with open(path, "rb") as f:  # decoded line by line: one bad byte costs one row
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield lineno, raw
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} file ({e.strerror or e})") from None
    except Exception as e:  # pyarrow's errors (ArrowInvalid: not a parquet file, corrupt pages)
        if type(e).__module__.startswith("pyarrow"):
            raise DataError(f"{path}: cannot read {what} file ({e})") from None
        raise


def count_rows(path: str) -> int:
    """Rows of a file, cheaply (a parquet footer; jsonl: its newlines): a progress bar's total.
    0 for a file that cannot be read: reading it says why."""
    try:
        if str(path).endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        n = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                n += chunk.count(b"\n")
        return n
    except Exception:  # noqa: BLE001 (OSError, pyarrow's errors)
        return 0


def load_row(raw: object, lineno: int) -> object:
    """A raw row as a JSON value; ValueError says why it is not one."""
    if not isinstance(raw, bytes):
        return raw
    try:
        return json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None


def check_report(report: RowReport, paths: list[str], what: str, on_bad: str, hint: str = "") -> None:
    """The bad-row policy: under fail any bad row stops the run; no usable row always does."""
    if report.n_bad and on_bad == "fail":
        raise DataError(f"bad {what} rows{hint}: {report.summary()}")
    if not report.kept:
        raise DataError(f"no usable {what} rows in {', '.join(map(str, paths))}: {report.summary()}")


def read_rows(paths: list[str], parse: Callable[[object, str], T], what: str, on_bad: str = "fail",
              show: int = 5, hint: str = "") -> tuple[list[T], RowReport]:
    """parse(row, "file:line") returns the item or raises ValueError saying what is wrong."""
    report = RowReport()
    items: list[T] = []
    for path in paths:
        for lineno, raw in iter_raw(path, what):
            report.total += 1
            where = f"{path}:{lineno}"
            try:
                items.append(parse(load_row(raw, lineno), where))
            except ValueError as e:
                report.bad(where, str(e), show)
    report.kept = len(items)
    check_report(report, paths, what, on_bad, hint)
    return items, report
