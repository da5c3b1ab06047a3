"""Hugging Face BailingMoe checkpoint directories: safetensors shards (config.json and the side
files that travel with it: hf_config.py).

Reading validates every tensor name and shape against the architecture before anything is
loaded, so a wrong checkpoint is refused with the tensor and file named. Writing streams
tensors into size-bounded shards and writes the index last, so a killed export never leaves a
directory that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_ring.models.hf_config import CheckpointError, arch_from_config, copy_aux, export_config, read_config
from megatron_ring.models.hf_convert import expected_hf_shapes
from megatron_ring.models.presets import LingArch

INDEX = "model.safetensors.index.json"


class HFReader:
    """Lazy, validated access to the tensors of an HF checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.arch = arch_from_config(self.config, str(self.path / "config.json"))
        self.file_of = self._index()
        self._handles = {}

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
        file_of = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{index}: names shard {fname}, which does not exist")
            with safe_open(fpath, framework="pt") as f:
                for name in f.keys():
                    if name in file_of:
                        raise CheckpointError(f"tensor {name} is stored twice: {file_of[name]} and {fname}")
                    file_of[name] = fname
        return file_of

    def validate(self, arch: LingArch | None = None) -> None:
        """Refuse missing, unexpected or mis-shaped tensors, naming each (first few of each kind)."""
        expected = expected_hf_shapes(arch or self.arch)
        present = set(self.file_of)
        problems = []
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected))
        if missing:
            problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:5]}")
        if extra:
            problems.append(f"{len(extra)} unexpected tensor(s), e.g. "
                            + ", ".join(f"{n} (in {self.file_of[n]})" for n in extra[:5]))
        bad = []
        for name in sorted(present & set(expected)):
            shape = tuple(self._handle(name).get_slice(name).get_shape())
            if shape != expected[name]:
                bad.append(f"{name} in {self.file_of[name]} has shape {list(shape)}, expected {list(expected[name])}")
        if bad:
            problems.append(f"{len(bad)} mis-shaped tensor(s): " + "; ".join(bad[:5]))
        if problems:
            raise CheckpointError(f"checkpoint {self.path} does not match the model: " + "; ".join(problems))

    def _handle(self, name: str):
        fname = self.file_of[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.path / fname, framework="pt")
        return self._handles[fname]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name}")
        return self._handle(name).get_tensor(name)


class HFWriter:
    """Streams tensors into safetensors shards; `close()` writes the side files of `source` (an HF
    or tokenizer directory the weights came from, if known), the config and the index last."""

    def __init__(self, path: str | os.PathLike, arch: LingArch, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 4 << 30, source: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.arch, self.dtype, self.max_shard_bytes, self.source = arch, dtype, max_shard_bytes, source
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        fname = f"part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.path / (fname + ".tmp")), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._total += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / f"part-{i:05d}.safetensors.tmp", self.path / final)
            weight_map.update({name: final for name in names})
        if self.source is not None:
            copy_aux(self.source, self.path)
        config = export_config(self.arch, self.dtype, self.source)
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": self._total}, "weight_map": weight_map}, indent=2))
        os.replace(tmp, self.path / INDEX)
