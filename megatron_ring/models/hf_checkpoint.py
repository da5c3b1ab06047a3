"""Hugging Face BailingMoe checkpoint directories: config.json and safetensors shards.

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

from megatron_ring.models.hf_convert import expected_hf_shapes
from megatron_ring.models.presets import LingArch

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match what it is loaded into."""


def arch_from_config(config: dict, source: str = "config.json") -> LingArch:
    def need(key):
        if key not in config:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return config[key]

    if config.get("model_type") != "bailing_moe":
        raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected 'bailing_moe'")
    if config.get("first_k_dense_replace", 0) != 0:
        raise CheckpointError(f"{source}: first_k_dense_replace={config['first_k_dense_replace']} "
                              "(dense leading layers) is not supported: Ling-lite has 0")
    for flag in ("use_bias", "use_qkv_bias", "tie_word_embeddings"):
        if config.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported by the Ling architecture")
    if not config.get("norm_topk_prob", True):
        raise CheckpointError(f"{source}: norm_topk_prob=false is not supported (Ling renormalises top-k)")
    heads = need("num_attention_heads")
    return LingArch(
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=need("num_key_value_heads"),
        head_dim=config.get("head_dim") or need("hidden_size") // heads,
        vocab_size=need("vocab_size"),
        num_experts=need("num_experts"),
        moe_topk=need("num_experts_per_tok"),
        moe_ffn_hidden_size=need("moe_intermediate_size"),
        shared_expert_ffn_hidden_size=need("moe_intermediate_size") * need("num_shared_experts"),
        max_position_embeddings=need("max_position_embeddings"),
        rms_norm_eps=need("rms_norm_eps"),
        rope_theta=float(need("rope_theta")),
        norm_head=bool(config.get("norm_head", False)),
        eos_token_id=config.get("eos_token_id", 0),
        pad_token_id=config.get("pad_token_id", 0),
    )


def config_from_arch(arch: LingArch, dtype: torch.dtype = torch.bfloat16) -> dict:
    if arch.shared_expert_ffn_hidden_size % arch.moe_ffn_hidden_size:
        raise CheckpointError("shared expert width must be a multiple of the expert width in HF format")
    return {
        "architectures": ["BailingMoeForCausalLM"],
        "model_type": "bailing_moe",
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "num_experts": arch.num_experts,
        "num_experts_per_tok": arch.moe_topk,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "intermediate_size": arch.moe_ffn_hidden_size,
        "num_shared_experts": arch.shared_expert_ffn_hidden_size // arch.moe_ffn_hidden_size,
        "norm_topk_prob": True,
        "first_k_dense_replace": 0,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "norm_head": arch.norm_head,
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "hidden_act": "silu",
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


class HFReader:
    """Lazy, validated access to the tensors of an HF checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face checkpoint directory)")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        self.arch = arch_from_config(self.config, str(config_path))
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
    """Streams tensors into safetensors shards; `close()` writes config and index last."""

    def __init__(self, path: str | os.PathLike, arch: LingArch, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 4 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.arch, self.dtype, self.max_shard_bytes = arch, dtype, max_shard_bytes
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
        (self.path / "config.json").write_text(json.dumps(config_from_arch(self.arch, self.dtype), indent=2))
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": self._total}, "weight_map": weight_map}, indent=2))
        os.replace(tmp, self.path / INDEX)
