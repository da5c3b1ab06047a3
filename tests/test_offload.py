"""TrainerOffload (train/offload.py) on the real stack: a tiny Ling Session (Megatron DDP, the
distributed optimizer, a frozen reference) in one lone CPU process. That process is this file
run as a script (the CPU layer patches torch for the whole process, so not pytest's own): two
sessions from the same init run the same two steps, one plain, one with offload/reload cycles
before, between and after them; a bf16 session covers the optimizer's fp32 main params. The
reference's own trip to host memory (rl.reference_offload, HostCopies) ends each offload run."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def _batch(n, vocab):
    from megatron_ring.train.engine import Batch
    ids = torch.randint(2, vocab, (2, 17), generator=torch.Generator().manual_seed(n))
    return [Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 16))]


def _freed_by_offload(s):
    """Every storage offload must free: grad buffers (zeroed on reload), and what must come back
    bit for bit: Adam state, fp32 main params, the reference."""
    kept = []
    for opt in getattr(s.optimizer, "chained_optimizers", [s.optimizer]):
        kept += [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        kept += [p for g in getattr(opt, "shard_fp32_from_float16_groups", []) for p in g]
    kept += [*s.reference.parameters(), *s.reference.buffers()]
    grads = [b.grad_data for b in s.ddp.buffers + s.ddp.expert_parallel_buffers]
    return list({t.untyped_storage().data_ptr(): t for t in grads + kept}.values()), kept


def _run(recipe, run_dir, offload: bool, steps: int) -> dict:
    from megatron_ring.models.lm_head import hidden_tokens
    from megatron_ring.platform import distributed
    from megatron_ring.train.engine import forward_backward
    from megatron_ring.train.offload import TrainerOffload
    from megatron_ring.train.session import Session

    s = Session(recipe, run_dir, "distill")
    s.build_trainer(4, reference=True)
    vocab = s.model.arch.vocab_size
    probe = _batch(0, vocab)[0]
    logits = lambda: (hidden_tokens(s.reference, probe.input_ids, probe.positions(), None)  # noqa: E731
                      @ s.reference.output_weight().T).detach().clone()
    off, out = TrainerOffload(s.ddp, s.optimizer, s.reference), {"cycles": [], "losses": []}
    out["ref_before"] = logits()

    def cycle():
        freed, kept = _freed_by_offload(s)
        weights = {n: p.detach().clone() for n, p in s.model.named_parameters()}
        saved, expected = [t.detach().clone() for t in kept], sum(t.untyped_storage().nbytes() for t in freed)
        r = off.offload()
        out["cycles"].append(dict(
            bytes=r["offload_bytes"], expected=expected, n=len(freed),
            sizes=[t.untyped_storage().nbytes() for t in freed], offloaded=off.offloaded,
            again=off.offload()["offload_bytes"],  # idempotent
            weights_kept=all(torch.equal(p, weights[n]) for n, p in s.model.named_parameters())))
        off.reload()
        out["cycles"][-1].update(reloaded=not off.offloaded, reload_again=off.reload()["reload_s"],
                                 grads_zero=all(not b.grad_data.any() for b in s.ddp.buffers),
                                 restored=all(torch.equal(a, t) for a, t in zip(saved, kept)))

    off.reload()  # reload before any offload: nothing happens
    for n in range(1, steps + 1):
        if offload:
            cycle()
        micro = _batch(n, vocab)
        out["losses"].append(s.optimizer_step(lambda ddp: forward_backward(ddp, micro))["loss"])
    if offload:
        cycle()
    out["ref_after"] = logits()
    if offload:  # rl.reference_offload: the reference waits in host memory between its passes
        from megatron_ring.rl.actor import reference_tensors
        from megatron_ring.train.offload import HostCopies
        stash, ref = HostCopies(), reference_tensors(s.reference)
        out["stash_expected"] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ref}.values())
        out["stash_bytes"] = stash.move_out(ref)
        out["stash_freed"] = all(t.untyped_storage().nbytes() == 0 for t in ref)
        stash.move_back()
        out["ref_after_stash"] = logits()
    out["weights"] = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    out["main_params"] = sum(len(g) for o in getattr(s.optimizer, "chained_optimizers", [s.optimizer])
                             for g in getattr(o, "shard_fp32_from_float16_groups", []))
    out["optimizer"] = [type(o).__name__ for o in getattr(s.optimizer, "chained_optimizers", [s.optimizer])]
    distributed.shutdown()
    return out


def main(data, init, run_dir, out):
    from megatron_ring.recipe import load_recipe

    def recipe(dtype):
        return load_recipe("recipes/tiny/distill.yaml", [
            "data.demo=null", f"model.init={init}", f"data.train=[{data}/sft_train.jsonl]",
            f"data.tokenizer={data}/tokenizer", "parallel.ep=1", "cluster.gpus_per_node=1",
            "train.global_batch=4", "train.micro_batch=4", f"train.dtype={dtype}",
            "logging.wandb=disabled", "logging.progress=false"])
    torch.save({"plain": _run(recipe("fp32"), f"{run_dir}/plain", False, 2),
                "offload": _run(recipe("fp32"), f"{run_dir}/offload", True, 2),
                "bf16": _run(recipe("bf16"), f"{run_dir}/bf16", True, 1)}, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf):
    from megatron_ring.data.demo_data import write_demo_data
    root = tmp_path_factory.mktemp("offload")
    write_demo_data(root / "data", n_sft=16, n_rl_math=4, n_rl_code_science=4, n_heldout=4, n_sft_heldout=4, n_eval=4)
    r = subprocess.run([sys.executable, "-m", "tests.test_offload", root / "data", tiny_hf, root / "runs",
                        root / "out.pt"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    return torch.load(root / "out.pt", weights_only=False)


def test_offload_frees_every_training_only_storage(runs):
    for name in ("offload", "bf16"):
        cycles = runs[name]["cycles"]
        for c in cycles:
            assert c["offloaded"] and c["sizes"] == [0] * c["n"]
            assert c["bytes"] == c["expected"] > 0
            assert c["weights_kept"]  # the policy's weights stay (the weight push reads them)
            assert c["reloaded"] and c["grads_zero"] and c["restored"]  # state, main params, reference
        # before the first step Adam has no state yet; after it, its state is freed too
        assert cycles[1]["expected"] > cycles[0]["expected"]
    assert runs["bf16"]["main_params"] > 0 and runs["offload"]["main_params"] == 0


def test_training_through_offload_is_bit_identical(runs):
    plain, off = runs["plain"], runs["offload"]
    assert off["losses"] == plain["losses"] and len(off["cycles"]) == 3
    assert all(torch.equal(off["weights"][n], w) for n, w in plain["weights"].items())


def test_reference_logits_survive_a_round_trip(runs):
    for name in ("offload", "bf16"):
        assert torch.equal(runs[name]["ref_before"], runs[name]["ref_after"])


def test_reference_waits_in_host_memory_and_comes_back_bit_identical(runs):
    for name in ("offload", "bf16"):
        r = runs[name]
        assert r["stash_freed"] and r["stash_bytes"] == r["stash_expected"] > 0
        assert torch.equal(r["ref_after_stash"], r["ref_before"])


def test_offload_and_reload_are_idempotent(runs):
    for c in runs["offload"]["cycles"] + runs["bf16"]["cycles"]:
        assert c["again"] == 0 and c["reload_again"] == 0.0


if __name__ == "__main__":
    main(*sys.argv[1:5])
