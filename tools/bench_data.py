"""Benchmark of the SFT data path at scale: `megatron-ring data prepare`'s code on synthetic
long-CoT rows, then a 2-rank training start over the prepared directory (torchrun, gloo: the
run's data setup, `load_rows`, and a few steps' micro-batch tensors, without the model), whose
peak RSS per rank must not grow with the data (rss_ratio = large / small, goal <= 1.3).

    python tools/bench_data.py --json [--rows 200000] [--small 1000] [--workers N] [--dir DIR]

Row lengths are drawn like the paper's long-CoT traces (log-normal, median about 9K tokens,
most between 5K and 20K, capped at the 32K context); the text is cheap (a fixed word list the
demo tokenizer's BPE learns whole), so tokenisation is fast. Prints one JSON object: rows,
prepare_s, rows_per_s, index_mb, rank_peak_rss_mb, rank_peak_rss_mb_small, rss_ratio,
padding_frac (packed rows), padding_frac_padded (each document padded alone), and the rest of
what was measured."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ = 32768
WORDS = ("the of and to in is that for it as with was on be by this are or an from at which we "
         "step so then let check value sum term case first next thus since wait compute equation "
         "answer therefore because number factor prime root square digit total result").split()


def write_tokenizer(out: Path) -> Path:
    from megatron_ring.data.demo_tokenizer import tokenizer_files, train_tokenizer

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 200)) for _ in range(200)]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(train_tokenizer(texts, vocab_size=300)).items():
        (out / name).write_text(text)
    return out


def lengths_like_the_paper(n: int, seed: int) -> np.ndarray:
    """Response tokens: log-normal around 9K (most of 5-20K), within [256, 30000]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(9000), 0.55, n), 256, 30000).astype(np.int64)


def write_rows(path: Path, n: int, seed: int, tok_dir: Path) -> None:
    from tokenizers import Tokenizer

    rng = np.random.default_rng(seed + 1)
    block = (" ".join(rng.choice(WORDS, 80000)) + " ").encode()
    starts = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord(" ")) + 1  # word starts
    per_word = len(Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(block[:200000].decode()).ids) \
        / int((starts < 200000).sum())
    lengths = (lengths_like_the_paper(n, seed) / per_word).astype(np.int64)  # tokens -> words
    with open(path, "wb") as f:
        for k, words in enumerate(lengths.tolist()):
            a = int(rng.integers(0, len(starts) - words - 1))
            response = block[starts[a]:starts[a + words] - 1].decode()
            prompt = block[starts[k % 1000]:starts[k % 1000 + 40] - 1].decode()
            f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}]}).encode() + b"\n")


def prepare(rows: int, work: Path, tok_dir: Path, workers: int, seed: int) -> dict:
    from megatron_ring.data.chat_tokenizer import ChatTokenizer
    from megatron_ring.data.prepare import prepare_sft

    src = work / f"rows_{rows}.jsonl"
    write_rows(src, rows, seed, tok_dir)
    t0 = time.perf_counter()
    meta = prepare_sft([str(src)], ChatTokenizer(tok_dir), work / f"prepared_{rows}", SEQ, "fail", workers,
                       progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    input_mb = src.stat().st_size / 2**20
    src.unlink()  # only the index is needed from here on
    size = sum(f.stat().st_size for f in (work / f"prepared_{rows}").iterdir())
    return {"seconds": seconds, "index_mb": size / 2**20, "input_mb": input_mb, "tokens": meta["tokens"]}


def rank_start(prepared: Path, tok_dir: Path, steps: int, work: Path) -> dict:
    """torchrun 2 gloo ranks through the run's data setup and `steps` steps of micro-batches."""
    out = work / f"rss_{prepared.name}"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, "--worker", str(prepared), "--tokenizer", str(tok_dir), "--steps", str(steps),
           "--dir", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "ranks": ranks}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_ring.recipe import load_recipe
    from megatron_ring.data.chat_tokenizer import ChatTokenizer
    from megatron_ring.train.sft_data import Schedule, load_rows, rank_share

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(ROOT / "recipes/tiny/distill.yaml", [
        f"data.prepared={args.worker}", f"data.tokenizer={args.tokenizer}", "data.demo=null",
        f"data.seq_length={SEQ}", "train.micro_batch=1", "train.global_batch=16"])
    run_dir = Path(args.dir)
    t0 = time.perf_counter()
    data = load_rows(recipe, run_dir, ChatTokenizer(args.tokenizer))
    setup_s = time.perf_counter() - t0
    schedule = Schedule(len(data), recipe.train.global_batch, 1, recipe.train.seed)
    positions = 0
    for step in range(1, min(args.steps, schedule.total_steps) + 1):
        for idx in rank_share(schedule.rows_of_step(step), world, rank, 1):
            batch = data.batch(idx.tolist())
            positions += int((batch["doc_ids"] >= 0).sum())
    dist.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    (run_dir / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "peak_rss_mb": round(peak, 1), "setup_s": round(setup_s, 2), "rows": len(data),
        "tokens_read": positions, "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def padding(prepared: Path) -> tuple[float, float]:
    from megatron_ring.data.indexed_sft import SFTDocuments
    from megatron_ring.data.packing import PackedRows

    lengths = SFTDocuments(prepared).lengths - 1
    return tuple(1 - PackedRows.build(lengths, SEQ, pack).efficiency for pack in (True, False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--workers", type=int, default=0, help="tokenising processes (0: all CPUs)")
    p.add_argument("--steps", type=int, default=4, help="training steps whose micro-batches each rank builds")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok_dir = write_tokenizer(work / "tokenizer")
        big = prepare(args.rows, work, tok_dir, args.workers, args.seed)
        prepare(args.small, work, tok_dir, args.workers, args.seed)
        rss_big = rank_start(work / f"prepared_{args.rows}", tok_dir, args.steps, work)
        rss_small = rank_start(work / f"prepared_{args.small}", tok_dir, args.steps, work)
        packed, padded = padding(work / f"prepared_{args.rows}")
        result = {
            "rows": args.rows, "prepare_s": round(big["seconds"], 2),
            "rows_per_s": round(args.rows / big["seconds"], 1), "index_mb": round(big["index_mb"], 1),
            "rank_peak_rss_mb": rss_big["peak_rss_mb"], "rank_peak_rss_mb_small": rss_small["peak_rss_mb"],
            "rss_ratio": round(rss_big["peak_rss_mb"] / rss_small["peak_rss_mb"], 3),
            "padding_frac": round(packed, 4), "padding_frac_padded": round(padded, 4),
            "rows_small": args.small, "tokens": big["tokens"], "tokens_per_s": round(big["tokens"] / big["seconds"]),
            "input_mb": round(big["input_mb"], 1), "workers": args.workers or os.cpu_count(),
            "seq_length": SEQ, "packed_rows": rss_big["ranks"][0]["rows"],
            "rank_setup_s": max(r["setup_s"] for r in rss_big["ranks"]),
        }
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
