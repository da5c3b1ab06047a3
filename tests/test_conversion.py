"""HF <-> Megatron conversion: exact round trips, any layout, refusal of bad checkpoints, exports that
carry their source's tokenizer and modeling code and load with transformers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_workers
from tests.hf_reference import hf_forward
from tests.hf_remote_code import AUTO_MAP, GENERATION, write_source
from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.models import hf_convert as conv
from megatron_ring.models.hf_checkpoint import CheckpointError, HFReader, HFWriter
from megatron_ring.models.hf_config import source_dtype
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


@pytest.mark.slow  # `megatron-ring convert` end to end under torchrun
def test_roundtrip_through_tp2_ep2_is_bit_exact_and_loads_like_its_source(tmp_path, tiny_arch):
    """A hub-style source (remote code, auto_map, tokenizer, float32) -> Megatron at TP2/EP2 ->
    HF with no --source or --dtype: the same tensors, and the export loads the way a user loads
    it (AutoModelForCausalLM with trust_remote_code, AutoTokenizer) with the source's logits."""
    import transformers

    source = write_source(tmp_path / "src", tiny_arch)
    meg, back = tmp_path / "meg", tmp_path / "back"
    r = cli("convert", "hf-to-megatron", source, meg, "--tp", 2, "--ep", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("convert", "megatron-to-hf", meg, back, "--tp", 2, "--ep", 2)  # the checkpoint names its source
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"float32, tokenizer and code of {source}" in r.stdout
    src, out = HFReader(source), HFReader(back)
    assert set(src.file_of) == set(out.file_of)
    for name in src.file_of:
        assert torch.equal(src.read(name), out.read(name)), name  # float32, as the source stores them
    assert out.arch == src.arch
    for name in ("configuration_bailing_moe.py", "modeling_bailing_moe.py", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (back / name).read_bytes() == (source / name).read_bytes(), name
    assert out.config["auto_map"] == AUTO_MAP and out.config["torch_dtype"] == "float32"

    model, info = transformers.AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True,
                                                                    output_loading_info=True)
    assert type(model).__name__ == "BailingMoeForCausalLM" and model.dtype == torch.float32
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = transformers.AutoTokenizer.from_pretrained(back, trust_remote_code=True)  # config has auto_map
    messages = [{"role": "user", "content": "Compute 12+30."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == ChatTokenizer(source).encode_prompt(messages)  # the trainer's tokens, from the export alone
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(ids).logits
    expected = hf_forward({n: src.read(n) for n in src.file_of}, src.config, ids)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert transformers.GenerationConfig.from_pretrained(back).temperature == GENERATION["temperature"]


def test_writer_carries_a_named_source_under_the_models_own_config(tmp_path, tiny_arch):
    source = write_source(tmp_path / "src", tiny_arch)
    out = tmp_path / "out"
    writer = HFWriter(out, tiny_arch.replace(rope_theta=600000.0), torch.bfloat16, source=source)
    writer.add("lm_head.weight", torch.zeros(tiny_arch.vocab_size, tiny_arch.hidden_size))
    writer.close()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["transformers_version"] == "x"  # carried
    assert config["rope_theta"] == 600000.0 and config["torch_dtype"] == "bfloat16"  # the model's own
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
         "configuration_bailing_moe.py", "modeling_bailing_moe.py", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    bare = tmp_path / "bare"  # no source known: config and weights only
    HFWriter(bare, tiny_arch).close()
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors.index.json"]
    assert source_dtype(source) == "float32" and source_dtype(tmp_path) is None


def _fake_checkpoint(path, arch, state):
    """A complete checkpoint directory holding only the records (no tensors): enough for model.init's checks."""
    from megatron_ring.train.checkpoint_dir import publish, seal

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True)
    (tmp / "ling_arch.json").write_text(json.dumps(arch.__dict__))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 3, **state}))
    seal(tmp, 3)
    publish(tmp, path)
    return path


def test_the_hf_source_follows_model_init_through_checkpoints(tmp_path, tiny_hf, tiny_arch):
    """model.init -> the HF directory its weights descend from: an HF directory itself, a
    checkpoint's recorded hf_source (or a converted one's older "source"), none for random."""
    from megatron_ring.recipe import load_recipe
    from megatron_ring.train.init_source import init_source, recorded_hf_source

    recipe = ROOT / "recipes/tiny/distill.yaml"
    assert init_source(load_recipe(recipe, [f"model.init={tiny_hf}"]), tmp_path).hf_source == str(tiny_hf)
    run = _fake_checkpoint(tmp_path / "run/checkpoints/iter_0000003", tiny_arch, {"hf_source": str(tiny_hf)})
    init = init_source(load_recipe(recipe, [f"model.init={run.parent}"]), tmp_path)
    assert (init.path, init.hf_source, init.reader) == (str(run), str(tiny_hf), None)
    old = _fake_checkpoint(tmp_path / "old/iter_0000000", tiny_arch, {"source": str(tiny_hf)})
    assert recorded_hf_source(old) == str(tiny_hf)
    scratch = _fake_checkpoint(tmp_path / "scratch/iter_0000001", tiny_arch, {"hf_source": None})
    assert recorded_hf_source(scratch) is None and init_source(load_recipe(recipe), tmp_path) is None


@pytest.mark.slow  # `megatron-ring convert` end to end under torchrun
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
