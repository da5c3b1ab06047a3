"""HF <-> Megatron conversion: exact round trips, any layout, refusal of bad checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_workers
from megatron_ring.models import hf_convert as conv
from megatron_ring.models.hf_checkpoint import CheckpointError, HFReader
from megatron_ring.train.checkpoint import check_arch


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_qkv_reorder_is_per_group_and_invertible(tiny_arch):
    a = tiny_arch
    w = torch.randn((a.num_attention_heads + 2 * a.num_query_groups) * a.head_dim, a.hidden_size)
    m = conv._qkv_hf_to_megatron(w, a)
    hd, per_group = a.head_dim, a.num_attention_heads // a.num_query_groups
    # Group 1 of Megatron's layout starts with query head `per_group`, then K and V of group 1.
    block = (per_group + 2) * hd
    q_rows = a.num_attention_heads * hd
    assert torch.equal(m[block: block + hd], w[per_group * hd: per_group * hd + hd])
    k1 = w[q_rows + hd: q_rows + 2 * hd]
    assert torch.equal(m[block + per_group * hd: block + per_group * hd + hd], k1)
    assert torch.equal(conv._qkv_megatron_to_hf(m, a), w)


def test_gated_shards_split_gate_and_up_separately():
    full = torch.arange(8.0).reshape(8, 1)  # gate rows 0-3, up rows 4-7
    s = conv.Sharding(tp_dim=0, gated=True)
    pieces = [conv.shard(full, s, r, 2) for r in range(2)]
    assert pieces[0].flatten().tolist() == [0, 1, 4, 5]
    assert torch.equal(conv.unshard(pieces, s), full)


def test_roundtrip_through_tp2_ep2_is_bit_exact(tiny_hf, tmp_path):
    meg, back = tmp_path / "meg", tmp_path / "back"
    r = cli("convert", "hf-to-megatron", tiny_hf, meg, "--tp", 2, "--ep", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("convert", "megatron-to-hf", meg, back, "--tp", 2, "--ep", 2, "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-3000:]
    src, out = HFReader(tiny_hf), HFReader(back)
    assert set(src.file_of) == set(out.file_of)
    for name in src.file_of:
        assert torch.equal(src.read(name), out.read(name)), name
    assert out.config == json.loads((back / "config.json").read_text())
    assert out.arch == src.arch


def test_checkpoint_saved_at_tp2_ep2_loads_at_tp1_ep1(tiny_hf, tmp_path):
    meg = tmp_path / "meg"
    assert cli("convert", "hf-to-megatron", tiny_hf, meg, "--tp", 2, "--ep", 2).returncode == 0
    from_ckpt, from_hf = tmp_path / "a.pt", tmp_path / "b.pt"
    run_workers("forward_backward", 1, "--hf", tiny_hf, "--megatron-ckpt", meg, "--out", from_ckpt)
    run_workers("forward_backward", 1, "--hf", tiny_hf, "--out", from_hf)
    assert torch.equal(torch.load(from_ckpt)["logits"], torch.load(from_hf)["logits"])


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_shard(path, fn):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["model.layers.1.attention.dense.weight"]
    tensors = fn(load_file(shard))
    save_file(tensors, shard)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"].update({n: shard.name for n in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard.name


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_bad_checkpoint_is_refused_naming_the_tensor(tiny_hf, tmp_path, kind):
    bad = _copy(tiny_hf, tmp_path / "bad")
    name = "model.layers.1.attention.dense.weight"
    if kind == "missing":
        _edit_shard(bad, lambda t: {k: v for k, v in t.items() if k != name})
        needle = name
    elif kind == "extra":
        shard = _edit_shard(bad, lambda t: {**t, "model.layers.1.attention.rogue.weight": torch.zeros(2)})
        needle = f"model.layers.1.attention.rogue.weight (in {shard})"
    else:
        _edit_shard(bad, lambda t: {**t, name: t[name][:, :-1].contiguous()})
        needle = f"{name} in "
    words = {"missing": "missing", "extra": "unexpected", "misshaped": "mis-shaped"}
    with pytest.raises(CheckpointError, match=words[kind]) as e:
        HFReader(bad).validate()
    assert needle in str(e.value)
    # The CLI refuses it before any process group starts, with the same message.
    r = cli("convert", "hf-to-megatron", bad, tmp_path / "out", timeout=120)
    assert r.returncode == 2 and needle in r.stderr
    assert not (tmp_path / "out").exists()


def test_megatron_checkpoint_of_another_model_is_refused(tmp_path, tiny_arch):
    (tmp_path / "ling_arch.json").write_text(json.dumps({**tiny_arch.__dict__, "num_experts": 16}))
    with pytest.raises(CheckpointError, match="num_experts: checkpoint 16, model 8"):
        check_arch(tmp_path, tiny_arch)


def test_config_of_another_architecture_is_refused(tiny_hf, tmp_path):
    bad = _copy(tiny_hf, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": 1}))
    with pytest.raises(CheckpointError, match="first_k_dense_replace"):
        HFReader(bad)
