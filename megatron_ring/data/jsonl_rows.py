"""Reading jsonl data files row by row: every row is decoded (UTF-8) and parsed or counted as
bad, by reason, with file:line for the first few. Nothing is dropped silently; the caller's
policy decides whether bad rows are skipped or stop the run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

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


def read_rows(paths: list[str], parse: Callable[[object, str], T], what: str, on_bad: str = "fail",
              show: int = 5, hint: str = "") -> tuple[list[T], RowReport]:
    """parse(row, "file:line") returns the item or raises ValueError saying what is wrong."""
    report = RowReport()
    items: list[T] = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: {what} file not found")
        try:
            with open(path, "rb") as f:  # decoded line by line: one bad byte costs one row
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    report.total += 1
                    where = f"{path}:{lineno}"
                    try:
                        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                        items.append(parse(json.loads(line), where))
                    except UnicodeDecodeError as e:
                        report.bad(where, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", show)
                    except json.JSONDecodeError as e:
                        report.bad(where, f"not JSON ({e.msg})", show)
                    except ValueError as e:
                        report.bad(where, str(e), show)
        except OSError as e:
            raise DataError(f"{path}: cannot read {what} file ({e.strerror or e})") from None
    report.kept = len(items)
    if report.n_bad and on_bad == "fail":
        raise DataError(f"bad {what} rows{hint}: {report.summary()}")
    if not items:
        raise DataError(f"no usable {what} rows in {', '.join(map(str, paths))}: {report.summary()}")
    return items, report
