"""The carried segments of an RL checkpoint as one binary file (numpy .npz, no pickle): at
32K-token responses a JSON list of token ids and logprobs is tens of MB of text per save, and
float text round trips only by luck. Every Response field is an array: scalars one entry per
segment, token lists concatenated with offsets (int64 ids, float64 logprobs: Python's own
floats, so read back bit-exactly); an array field (the routed experts) is its rows concatenated
with offsets and a presence flag per segment. The fields come from the Response dataclass, so a
field added there is carried without a change here.

Rank 0 encodes at save time (the segments of that step, not of the step running while an async
save finishes); checkpoint.save writes the bytes into the .tmp directory before it is sealed.
Checkpoints saved before this file keep the segments as JSON (`pending` in trainer_state.json)
and still resume."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np

from megatron_ring.models.hf_config import CheckpointError
from megatron_ring.rl.responses import Response, Segment

FILE = "carried_segments.npz"
_SCALAR = {"int": np.int64, "float": np.float64, "str": np.str_}
_LIST = {"list[int]": np.int64, "list[float]": np.float64}
_ARRAY = "np.ndarray | None"


def _fields() -> list[tuple[str, str]]:
    out = [(f.name, str(f.type)) for f in dataclasses.fields(Response)]
    unknown = [f"{n}: {t}" for n, t in out if t not in _SCALAR and t not in _LIST and t != _ARRAY]
    if unknown:  # a new Response field of a kind this file cannot hold
        raise TypeError(f"carried_segments: cannot store Response fields {unknown}")
    return out


def encode(segments: list[Segment]) -> bytes:
    """The segments as the bytes of an .npz file."""
    arrays = {"start": np.array([s.start for s in segments], np.int64),
              "end": np.array([s.end for s in segments], np.int64)}
    for name, kind in _fields():
        values = [getattr(s.response, name) for s in segments]
        if kind in _SCALAR:
            arrays[name] = np.array(values, _SCALAR[kind]) if values else np.zeros(0, _SCALAR[kind])
        elif kind == _ARRAY:
            present = [v for v in values if v is not None]
            arrays[name] = np.concatenate(present) if present else np.zeros(0, np.uint8)
            arrays[name + ".present"] = np.array([v is not None for v in values], bool)
            arrays[name + ".offsets"] = np.cumsum([0] + [0 if v is None else len(v) for v in values], dtype=np.int64)
        else:
            arrays[name] = np.array([x for v in values for x in v], _LIST[kind])
            arrays[name + ".offsets"] = np.cumsum([0] + [len(v) for v in values], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(path: Path) -> list[Segment]:
    """The segments of a file `encode` wrote; errors name the file and the array."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable carried-segments file ({type(e).__name__}: {e})") from None
    fields = _fields()
    want = ({"start", "end"} | {n for n, _ in fields} | {n + ".offsets" for n, k in fields if k not in _SCALAR}
            | {n + ".present" for n, k in fields if k == _ARRAY})
    if set(arrays) != want:
        raise CheckpointError(f"{path}: carried-segments arrays {sorted(arrays)}, expected {sorted(want)} "
                              "(saved by another version of Response)")
    n = len(arrays["start"])
    columns = {}
    for name, kind in fields:
        a = arrays[name]
        if kind in _SCALAR:
            if len(a) != n:
                raise CheckpointError(f"{path}: array {name} has {len(a)} entries, start has {n}")
            columns[name] = [x.item() for x in a]
        elif kind == _ARRAY:
            off, present = arrays[name + ".offsets"], arrays[name + ".present"]
            if len(off) != n + 1 or off[-1] != len(a) or len(present) != n:
                raise CheckpointError(f"{path}: array {name}.offsets/.present do not match {name} ({len(a)} rows)")
            columns[name] = [a[off[i]:off[i + 1]] if present[i] else None for i in range(n)]
        else:
            off = arrays[name + ".offsets"]
            if len(off) != n + 1 or off[-1] != len(a):
                raise CheckpointError(f"{path}: array {name}.offsets does not match {name} ({len(a)} values)")
            columns[name] = [a[off[i]:off[i + 1]].tolist() for i in range(n)]
    return [Segment(Response(**{name: columns[name][i] for name, _ in fields}),
                    int(arrays["start"][i]), int(arrays["end"][i])) for i in range(n)]


def read(checkpoint: Path | None, saved: dict) -> list[Segment]:
    """The carried segments of a resumed checkpoint: its binary file, else (older checkpoints)
    the JSON list in its RL state."""
    if checkpoint is not None and (Path(checkpoint) / FILE).is_file():
        return decode(Path(checkpoint) / FILE)
    return [Segment.from_json(s) for s in saved.get("pending", [])]
