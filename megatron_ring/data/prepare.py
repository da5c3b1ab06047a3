"""SFT rows (jsonl or parquet) -> a prepared directory (indexed_sft.py), tokenised by a pool of
processes. Rows stream through in bounded chunks, and results are taken back in submission
order, so the documents are in file order, line order, whatever the number of workers (the
.bin files are byte-identical), and memory holds only the chunks in flight. Bad rows are
counted and named by file:line exactly as jsonl_rows.read_rows does. The directory appears
atomically (written under a temporary name, then renamed)."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from megatron_ring.data.indexed_sft import Writer, mask_to_spans, tokenizer_fingerprint
from megatron_ring.data.jsonl_rows import RowReport, check_report, count_rows, iter_raw, load_row
from megatron_ring.data.sft_rows import row_messages

CHUNK_ROWS = 64
_HINT = " (set data.bad_rows=skip to skip them)"
_STATE: tuple | None = None  # (tokenizer, seq_length, row keys): set before the workers fork


def _tokenise(chunk: tuple[str, list]) -> tuple[str, list]:
    path, items = chunk
    tokenizer, seq_length, row_keys = _STATE
    out = []
    for lineno, raw in items:
        try:
            ids, mask = tokenizer.encode_chat(row_messages(load_row(raw, lineno), **row_keys))
            if len(ids) > seq_length:
                raise ValueError(f"too long ({len(ids)} tokens, limit {seq_length})")
            out.append((lineno, np.asarray(ids, dtype=np.int32), mask_to_spans(mask), None))
        except ValueError as e:
            out.append((lineno, None, None, str(e)))
    return path, out


def _chunks(files: list[str]):
    for path in files:
        buf = []
        for item in iter_raw(path, "SFT"):
            buf.append(item)
            if len(buf) == CHUNK_ROWS:
                yield path, buf
                buf = []
        if buf:
            yield path, buf


def _in_order(fn, chunks, workers: int):
    """fn over chunks, results in order; at most 4 chunks per worker in flight. Workers fork
    (as DataLoader's do), inheriting the tokenizer instead of rebuilding it."""
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """tqdm when installed, else a line every 30 s."""

    def __init__(self, total: int, show: bool):
        self.total, self.done, self.last, self.bar = total, 0, time.monotonic(), None
        self.show = show
        if show:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="rows", desc="data prepare", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show and time.monotonic() - self.last > 30:
            self.last = time.monotonic()
            print(f"data prepare: {self.done}/{self.total} rows", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def file_stamps(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def prepare_sft(files: list[str], tokenizer, out: str | Path, seq_length: int, on_bad: str = "fail",
                workers: int = 0, row_keys: dict | None = None, progress: bool = True, show: int = 5) -> dict:
    """Tokenise files into the prepared directory `out` (replaced if present); returns its meta.
    workers: tokenising processes, 0 = the machine's CPUs. Raises DataError (file:line) on bad
    rows under on_bad=fail, or when no row is usable."""
    global _STATE
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    report = RowReport()
    bar = _Progress(sum(map(count_rows, files)), progress)
    try:
        writer = Writer(tmp)
        _STATE = (tokenizer, seq_length, row_keys or {})
        for path, results in _in_order(_tokenise, _chunks(files), workers):
            for lineno, ids, spans, reason in results:
                report.total += 1
                if reason is None:
                    writer.add(ids, spans)
                else:
                    report.bad(f"{path}:{lineno}", reason, show)
            bar.update(len(results))
        report.kept = writer.documents
        check_report(report, files, "SFT", on_bad, _HINT)
        meta = writer.finish({"tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_path": str(tokenizer.path),
                              "seq_length": seq_length, "files": file_stamps(files), "report": report.as_dict()})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _STATE = None
        bar.close()
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return meta
