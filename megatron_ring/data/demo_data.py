"""The embedded demo data set for CPU runs: SFT conversations, RL prompts and a tokenizer,
generated from a seed in a few seconds with no downloads.

Splits are drawn in a fixed order (held-out RL prompts first, then RL train, SFT held-out, SFT
train), each from its own seeded stream, and no question is used twice across or within splits,
so the held-out sets do not depend on the training set sizes and never overlap them. Every file
is written atomically and manifest.json is written last: a directory without a manifest whose
hashes match its files is incomplete."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import statistics
import time
from pathlib import Path

from tokenizers import Tokenizer

from megatron_ring.data.demo_tasks import make_task
from megatron_ring.data.demo_tokenizer import render_chat, tokenizer_files, train_tokenizer

FORMAT = "megatron-ring-demo-data/1"
MANIFEST = "manifest.json"
DOMAINS = ("math", "code", "science")
SFT_MIX = {"math": 0.65, "code": 0.25, "science": 0.10}  # Ring-lite's distillation mix, rounded
CODE_SCIENCE_MIX = {"code": 0.7, "science": 0.3}  # the same code:science ratio
HELDOUT_MIX = {"math": 0.5, "code": 0.25, "science": 0.25}  # also the larger RL evaluation set
SFT_FILES = ("sft_train.jsonl", "sft_heldout.jsonl")
TASK_ONLY = ("key", "solution")  # task fields that RL rows leave out


def apportion(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split n by the mix with largest remainders, so the counts add up to n exactly."""
    exact = {d: n * w / sum(mix.values()) for d, w in mix.items()}
    counts = {d: int(x) for d, x in exact.items()}
    for d in sorted(mix, key=lambda d: counts[d] - exact[d])[: n - sum(counts.values())]:
        counts[d] += 1
    return counts


def plan(n_sft: int, n_rl_math: int, n_rl_code_science: int, n_heldout: int, n_sft_heldout: int,
         n_eval: int = 0) -> list:
    """(file, {domain: count}) in drawing order: held-out sets first, then the RL evaluation set
    (drawn last, so adding it changed no other file)."""
    return [
        ("rl_heldout.jsonl", apportion(n_heldout, HELDOUT_MIX)),
        ("rl_math.jsonl", {"math": n_rl_math}),
        ("rl_code_science.jsonl", apportion(n_rl_code_science, CODE_SCIENCE_MIX)),
        ("sft_heldout.jsonl", apportion(n_sft_heldout, SFT_MIX)),
        ("sft_train.jsonl", apportion(n_sft, SFT_MIX)),
        ("rl_eval.jsonl", apportion(n_eval, HELDOUT_MIX)),  # RL held-out accuracy: 64 prompts are too noisy
    ]


def draw(domain: str, n: int, rng: random.Random, seen: set, math_digits: int) -> list[dict]:
    """n tasks whose keys are not in `seen` (which they are added to)."""
    tasks: list[dict] = []
    budget = 100 * n + 1000
    while len(tasks) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"only {len(tasks)} distinct {domain} tasks could be drawn, {n} asked: "
                               "lower the counts (or raise math_digits)")
        task = make_task(domain, rng, math_digits)
        if task["key"] not in seen:
            seen.add(task["key"])
            tasks.append(task)
    return tasks


def to_row(file: str, task: dict) -> dict:
    if file in SFT_FILES:
        return {"messages": [{"role": "user", "content": task["prompt"]},
                             {"role": "assistant", "content": task["solution"]}],
                "domain": task["domain"], "kind": task["kind"]}
    return {k: v for k, v in task.items() if k not in TASK_ONLY}


def row_prompt(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


def generate(seed: int = 0, n_sft: int = 6000, n_rl_math: int = 512, n_rl_code_science: int = 512,
             n_heldout: int = 128, n_sft_heldout: int = 256, math_digits: int = 2,
             n_eval: int = 1024) -> dict[str, list[dict]]:
    """All rows of all files, in memory. Questions are disjoint across files (asserted)."""
    seen: set = set()
    files: dict[str, list[dict]] = {}
    for file, counts in plan(n_sft, n_rl_math, n_rl_code_science, n_heldout, n_sft_heldout, n_eval):
        tasks = [t for domain, n in counts.items()
                 for t in draw(domain, n, random.Random(f"demo:{seed}:{file}:{domain}"), seen, math_digits)]
        random.Random(f"demo:{seed}:{file}:order").shuffle(tasks)
        files[file] = [to_row(file, t) for t in tasks]
    prompts = [{row_prompt(r) for r in rows} for rows in files.values()]
    assert sum(map(len, prompts)) == len(set().union(*prompts)), "a prompt occurs twice across the demo files"
    return files


def tokenizer_texts(files: dict[str, list[dict]]):
    """What the tokenizer is trained on: the training splits as the model sees them (held-out
    files are left out so the tokenizer is fit on training text only)."""
    for name in ("sft_train.jsonl", "rl_math.jsonl", "rl_code_science.jsonl"):
        for row in files[name]:
            if "messages" in row:
                yield render_chat(row["messages"])
            else:
                yield render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
                if "groundtruth" in row:
                    yield row["groundtruth"]


def _write_atomic(path: Path, text: str) -> str:
    """Write via a temporary file and rename, so a reader never sees half a file; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_demo_data(out_dir, seed: int = 0, n_sft: int = 6000, n_rl_math: int = 512,
                    n_rl_code_science: int = 512, n_heldout: int = 128, n_sft_heldout: int = 256,
                    math_digits: int = 2, vocab_size: int = 1000, n_eval: int = 1024) -> dict:
    """Generate everything into out_dir; returns the manifest. Same arguments => same bytes."""
    params = dict(seed=seed, n_sft=n_sft, n_rl_math=n_rl_math, n_rl_code_science=n_rl_code_science,
                  n_heldout=n_heldout, n_sft_heldout=n_sft_heldout, math_digits=math_digits,
                  vocab_size=vocab_size, n_eval=n_eval)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest lands
    files = generate(**{k: v for k, v in params.items() if k != "vocab_size"})
    entries = {}
    for name, rows in files.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        domains = {d: sum(r["domain"] == d for r in rows) for d in DOMAINS}
        entries[name] = {"rows": len(rows), "domains": domains, "sha256": _write_atomic(out / name, text)}
    tok = train_tokenizer(tokenizer_texts(files), vocab_size)
    for name, text in tokenizer_files(tok).items():
        entries[f"tokenizer/{name}"] = {"sha256": _write_atomic(out / "tokenizer" / name, text)}
    manifest = {"format": FORMAT, "seed": seed, "params": params, "vocab_size": tok.get_vocab_size(),
                "files": entries, "content_hash": _content_hash(entries)}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _content_hash(entries: dict) -> str:
    return hashlib.sha256(json.dumps({k: v["sha256"] for k, v in sorted(entries.items())}).encode()).hexdigest()


def load_manifest(out_dir, verify: bool = True) -> dict | None:
    """The manifest of a complete demo directory, or None (missing, unreadable, or, with verify,
    a file missing or not matching its hash)."""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or manifest.get("format") != FORMAT \
            or manifest.get("content_hash") != _content_hash(entries):
        return None
    if verify:
        for name, entry in entries.items():
            path = out / name
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                return None
    return manifest


def ensure_demo_data(out_dir, **params) -> dict:
    """Reuse out_dir if it is complete and was made with these parameters, else (re)generate it."""
    defaults = {k: p.default for k, p in inspect.signature(write_demo_data).parameters.items() if k != "out_dir"}
    manifest = load_manifest(out_dir)
    if manifest is not None and manifest["params"] == {**defaults, **params}:
        return manifest
    return write_demo_data(out_dir, **params)


def sft_token_lengths(out_dir, file: str = "sft_train.jsonl") -> dict[str, list[int]]:
    """Tokens per SFT row (chat template applied, eos included) by domain, with the directory's tokenizer."""
    out = Path(out_dir)
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    rows = [json.loads(line) for line in (out / file).read_text().splitlines()]
    encodings = tok.encode_batch([render_chat(r["messages"]) for r in rows], add_special_tokens=False)
    lengths: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for row, enc in zip(rows, encodings):
        lengths[row["domain"]].append(len(enc.ids))
    return lengths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo data set (SFT, RL prompts, tokenizer).")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sft", type=int, default=6000)
    parser.add_argument("--math-digits", type=int, default=2)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    manifest = write_demo_data(args.out_dir, seed=args.seed, n_sft=args.n_sft, math_digits=args.math_digits)
    print(f"wrote {args.out_dir} in {time.perf_counter() - t0:.1f}s; vocab {manifest['vocab_size']}")
    for name, entry in manifest["files"].items():
        if "rows" in entry:
            print(f"  {name}: {entry['rows']} rows {entry['domains']}")
    for domain, lengths in sft_token_lengths(args.out_dir).items():
        if lengths:
            print(f"  sft_train {domain}: tokens mean {statistics.mean(lengths):.1f} max {max(lengths)}")


if __name__ == "__main__":
    main()
