"""A checkpoint directory on disk: when it is complete, which one a run resumes from, and how a
new one becomes visible. No Megatron here (the launcher checks a run's checkpoints before
torchrun starts); checkpoint.py writes and reads the state inside.

RUN/checkpoints/iter_NNNNNNN/ is written as iter_NNNNNNN.tmp/; manifest.json (every file's
size) is written last, after every file and the directory are fsynced; then the directory is
renamed and `latest` replaced (written, fsynced, renamed). A checkpoint is complete when its
manifest matches its files: a truncated shard, a half-copied directory or one cut short by a
crash is refused, not loaded. Sizes, not checksums: a crash or a full disk truncates, and
hashing a 16.8B-parameter checkpoint at every save and resume would cost minutes.

A run never restarts from step 0 while it has checkpoints: a `latest` that is empty, or names a
missing or incomplete directory, stops the run with an error naming the newest complete one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import traceback
from pathlib import Path

from megatron_ring.models.hf_config import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
_ITER = re.compile(r"iter_(\d+)")


def iter_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint directory's name (None: not an iter_N directory)."""
    m = _ITER.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable only once its
    directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def seal(tmp: Path, step: int) -> None:
    """Make a fully written tmp directory durable and self-describing: fsync every file and
    directory, then write the manifest (last, so its presence means everything before it is on disk)."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            fsync_path(p)
            files[p.relative_to(tmp).as_posix()] = p.stat().st_size
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
        fsync_path(d)
    write_durably(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
    fsync_path(tmp)


def publish(tmp: Path, final: Path) -> None:
    """Rename a sealed tmp directory into place, then point `latest` at it, each step durable."""
    root = final.parent
    if final.exists():  # a newer checkpoint left by a run killed before it moved `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    pointer = root / (LATEST + ".tmp")
    write_durably(pointer, final.name + "\n")
    os.replace(pointer, root / LATEST)
    fsync_path(root)


def incomplete(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory is not complete, or None when its manifest matches its files."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (an interrupted save or copy, or a checkpoint saved before manifests)"
    try:
        files = json.loads(manifest.read_text())["files"]
        files = {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest} is unreadable ({type(e).__name__}: {e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{f} has {actual} bytes, its manifest says {size} (truncated or overwritten)"
    return None


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The complete iter_N directories of a checkpoints root, oldest first."""
    found = [p for p in Path(root).glob("iter_*") if step_of(p) is not None and p.is_dir()]
    return sorted((p for p in found if incomplete(p) is None), key=step_of)


def previous_good(path: str | os.PathLike) -> str:
    """A phrase naming the newest complete checkpoint before `path` in its root, for errors."""
    path = Path(path)
    step = step_of(path)
    if step is None:
        return ""
    older = [p for p in complete_checkpoints(path.parent) if step_of(p) < step]
    if older:
        return f"; the previous complete checkpoint is {older[-1]}"
    return f"; {path.parent} holds no earlier complete checkpoint"


def latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint a run in `root` resumes from: the one `latest` names; None when `root`
    holds no checkpoint directory (a new run). Without `latest` (a run killed between its first
    checkpoint's rename and the pointer) the newest complete one. A damaged `latest` is an error
    naming the newest complete checkpoint: resuming elsewhere, or from step 0, would silently
    discard training."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        found = complete_checkpoints(root)
        if found:
            return found[-1]
        damaged = sorted(p.name for p in root.glob("iter_*") if step_of(p) is not None and p.is_dir())
        if damaged:
            raise CheckpointError(f"{root} holds {', '.join(damaged)} but no `latest` and no complete checkpoint "
                                  f"({incomplete(root / damaged[-1])}); to start over, move {root} away")
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(_damaged(pointer, f"is unreadable ({e})")) from None
    if not name:
        raise CheckpointError(_damaged(pointer, "is empty"))
    if step_of(name) is None:
        raise CheckpointError(_damaged(pointer, f"names {name!r}, not an iter_N checkpoint directory"))
    path = root / name
    why = incomplete(path)
    if why is not None:
        raise CheckpointError(_damaged(pointer, f"names {name}, which is not a complete checkpoint: {why}"))
    return path


def _damaged(pointer: Path, what: str) -> str:
    root = pointer.parent
    found = complete_checkpoints(root)
    if found:
        advice = (f"the newest complete checkpoint is {found[-1]}; to resume from it: "
                  f"echo {found[-1].name} > {pointer}")
    else:
        advice = f"{root} holds no complete checkpoint; to start over, move {root} away"
    return f"{pointer} {what}. Not resuming, and not restarting from step 0 over existing checkpoints: {advice}"


def retain(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """`train.keep_last`: once a new checkpoint is complete, delete the periodic ones beyond the
    newest keep_last (0: keep all). Never deleted: the one `latest` names, a step-0 baseline and
    the distillation's epoch-end checkpoints (`select`'s candidates), nor a directory that is not
    complete (not ours to judge). Each is renamed to a .tmp name first, so that a crash mid-delete
    leaves a partial directory nothing lists or loads, which the next save removes. Returns what
    was deleted."""
    if keep_last <= 0:
        return []
    root = Path(root)
    try:
        current = (root / LATEST).read_text().strip()
    except OSError:
        current = None
    periodic = [p for p in complete_checkpoints(root) if not _kept_for_good(p)]
    doomed = [p for p in periodic[:-keep_last] if p.name != current]
    for p in doomed:
        trash = p.with_name(p.name + ".deleted.tmp")
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_path(root)
    return doomed


def _kept_for_good(path: Path) -> bool:
    """A step-0 baseline, an epoch end, or a checkpoint whose trainer state cannot be read."""
    if step_of(path) == 0:
        return True
    try:
        return bool(json.loads((path / "trainer_state.json").read_text()).get("epoch_end"))
    except (OSError, ValueError, AttributeError):
        return True


def remove_partial(root: Path) -> None:
    """Remove iter_*.tmp directories left by saves that were killed (never complete, never read)."""
    for p in root.glob("iter_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def describe_read_error(e: BaseException) -> str:
    """The underlying error in one line (torch.distributed.checkpoint wraps each rank's error
    in a CheckpointException whose own text is only the list of ranks)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        if not failures:  # torch tells only the coordinating rank what failed
            return f"{type(e).__name__}: failed on another rank (rank 0 reports the cause)"
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    lines = str(e).strip().splitlines()
    if lines:
        return f"{type(e).__name__}: {lines[0][:500]}"
    tb = traceback.extract_tb(e.__traceback__)  # a bare assert: say where it failed
    return type(e).__name__ + (f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else "")


def describe_write_error(e: BaseException, where: Path) -> str:
    """One line for a failed write: the errno in words when one is found in the exception or
    in those it wraps (Megatron reports its writer processes' errors as text), and the space
    left on the file system, so a full disk reads as one."""
    codes = _errnos(e)
    text = describe_read_error(e)
    if codes:
        text = "; ".join(f"[Errno {c}] {os.strerror(c).lower()}" for c in codes)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return text
    if errno.ENOSPC in codes or free < (64 << 20):
        text += f" ({free / 2**20:.1f} MiB free on the file system of {where})"
        if errno.ENOSPC not in codes:
            text += ": probably no space left on device"
    return text


def _errnos(e: BaseException) -> list[int]:
    """Every errno in an exception, its causes and torch's per-rank failures."""
    seen, out, todo = set(), [], [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        code = getattr(x, "errno", None) if isinstance(x, OSError) else None
        codes = [code] if code else [int(c) for c in re.findall(r"\[Errno (\d+)\]", str(x))]
        out += [c for c in codes if c not in out]
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return out
