"""Worker (one lone process, no torchrun: its process group re-forms in place): the training
session both stages share, on the tiny distillation recipe started from an HF directory. The
first session runs three optimizer steps, saving after step 2; a second session on the same run
directory must resume from step 2 (weights, optimizer, scheduler, the stage's own state) and run
step 3 on the same batch to the same weights."""

import argparse

import torch

from megatron_ring.recipe import load_recipe
from megatron_ring.train.engine import Batch, forward_backward
from megatron_ring.train.session import Session


def batch(step: int, vocab: int) -> list[Batch]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(2, vocab, (2, 17), generator=g)
    return [Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 16))]


def step(session, n: int) -> dict:
    micro = batch(n, session.model.arch.vocab_size)
    return session.optimizer_step(lambda ddp: forward_backward(ddp, micro))


def phase(recipe, run_dir, first: bool) -> dict:
    session = Session(recipe, run_dir, "distill")
    state = session.build_trainer(4, reference=True)
    out = {"lrs": []}
    if first:
        assert state is None and session.resumed_from is None
        initial = {n: q.detach().clone() for n, q in session.model.named_parameters()}
        for n in (1, 2):
            out[f"metrics_{n}"] = step(session, n)
            out["lrs"].append(session.optimizer.param_groups[0]["lr"])
        session.save(2, {"marker": "two"})
        ref = dict(session.reference.named_parameters())
        out["reference_frozen"] = all(torch.equal(ref[n], t) and not ref[n].requires_grad for n, t in initial.items())
        out["model_moved"] = all(not torch.equal(q, initial[n]) for n, q in session.model.named_parameters())
    else:
        out["state"] = {k: state[k] for k in ("stage", "step", "marker")}
        out["resumed_from"] = str(session.resumed_from)
    out["metrics_3"] = step(session, 3)
    out["lrs"].append(session.optimizer.param_groups[0]["lr"])
    out["weights"] = {n: q.detach().clone() for n, q in session.model.named_parameters()}
    session.close(session.open_log(4, 3), [])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    recipe = load_recipe("recipes/tiny/distill.yaml", [
        "data.demo=null", f"model.init={a.init}", f"data.train=[{a.data}/sft_train.jsonl]",
        f"data.tokenizer={a.data}/tokenizer", "parallel.ep=1", "cluster.gpus_per_node=1", "train.global_batch=4",
        "train.micro_batch=4", "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.warmup_frac=0.5",
        "optimizer.lr_schedule=cosine", "logging.wandb=disabled", "logging.progress=false"])
    torch.save({"train": phase(recipe, a.run_dir, True), "resume": phase(recipe, a.run_dir, False)}, a.out)


if __name__ == "__main__":
    main()
