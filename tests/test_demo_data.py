"""The embedded demo data: deterministic, disjoint splits, correct teacher solutions (math and
science answers recomputed independently, every code teacher program run against its tests),
short sequences, and a tokenizer that round-trips text exactly with fixed special-token ids."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jinja2
import pytest
from math_verify import parse, verify
from tokenizers import Tokenizer

from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.data.demo_data import (draw, ensure_demo_data, generate, load_manifest, row_prompt,
                                          sft_token_lengths, write_demo_data)
from megatron_ring.data.demo_tokenizer import CHAT_TEMPLATE, render_chat
from megatron_ring.data.sft_rows import read_sft_rows

ROOT = Path(__file__).resolve().parents[1]
RL_FILES = ("rl_math.jsonl", "rl_code_science.jsonl", "rl_heldout.jsonl", "rl_eval.jsonl")
ALL_FILES = ("sft_train.jsonl", "sft_heldout.jsonl") + RL_FILES
SMALL = dict(n_sft=200, n_rl_math=32, n_rl_code_science=32, n_heldout=16, n_sft_heldout=16, n_eval=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, seed=0)
    return out


def rows(directory: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text().splitlines()]


def all_rows(directory: Path) -> list[dict]:
    return [r for name in ALL_FILES for r in rows(directory, name)]


def solution(row: dict) -> str | None:
    return row["messages"][1]["content"] if "messages" in row else None


def boxed(text: str) -> str:
    m = re.search(r"\\boxed\{([^{}]*)\}$", text)
    assert m, f"solution does not end with \\boxed{{...}}: {text!r}"
    return m.group(1)


def test_manifest_counts_and_completeness(demo, tmp_path):
    manifest = load_manifest(demo)
    assert manifest is not None and manifest["seed"] == 0
    expected = {"sft_train.jsonl": {"math": 3900, "code": 1500, "science": 600},
                "rl_math.jsonl": {"math": 512, "code": 0, "science": 0},
                "rl_heldout.jsonl": {"math": 64, "code": 32, "science": 32},
                "rl_eval.jsonl": {"math": 512, "code": 256, "science": 256}}
    for name, domains in expected.items():
        assert manifest["files"][name]["domains"] == domains
    for name in ALL_FILES:
        data = rows(demo, name)
        assert manifest["files"][name]["rows"] == len(data)
        assert all(r["domain"] in ("math", "code", "science") for r in data)
    assert manifest["files"]["rl_code_science.jsonl"]["rows"] == 512
    assert 200 <= manifest["files"]["sft_heldout.jsonl"]["rows"] <= 400

    small = tmp_path / "small"
    first = ensure_demo_data(small, **SMALL)
    assert ensure_demo_data(small, **SMALL) == first  # complete: reused
    original = (small / "rl_math.jsonl").read_bytes()
    (small / "rl_math.jsonl").write_text("truncated\n")
    assert load_manifest(small) is None  # a file that does not match its hash: incomplete
    assert ensure_demo_data(small, **SMALL) == first
    assert (small / "rl_math.jsonl").read_bytes() == original
    (small / "manifest.json").unlink()
    assert load_manifest(small) is None
    assert not list(small.rglob("*.tmp"))


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    """Regenerated in a fresh interpreter (other hash seed) at the default sizes: identical files."""
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "megatron_ring.data.demo_data", str(again), "--seed", "0"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    files = sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (demo / f).read_bytes() == (again / f).read_bytes(), f
    other = write_demo_data(tmp_path / "seed1", seed=1, **SMALL)
    assert other["content_hash"] != write_demo_data(tmp_path / "seed0", seed=0, **SMALL)["content_hash"]


def test_splits_are_disjoint(demo):
    prompts = [row_prompt(r) for r in all_rows(demo)]
    assert len(prompts) == len(set(prompts))
    # Science options are shuffled: the question stems themselves must not repeat either.
    stems = [p.split("\n")[0] for p, r in zip(prompts, all_rows(demo)) if r["domain"] == "science"]
    assert len(stems) == len(set(stems))


def test_heldout_does_not_depend_on_training_sizes():
    a = generate(seed=3, **SMALL)
    b = generate(seed=3, **{**SMALL, "n_sft": 400, "n_rl_math": 64})
    assert a["rl_heldout.jsonl"] == b["rl_heldout.jsonl"]


def test_too_many_tasks_for_the_pool_is_refused():
    import random
    with pytest.raises(RuntimeError, match="distinct math tasks"):
        draw("math", 500, random.Random(0), set(), math_digits=1)


def _math_reference(prompt: str) -> int:
    """The answer recomputed from the question text alone."""
    if m := re.fullmatch(r"Compute (\d+)([-+*])(\d+)\.", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    m = re.fullmatch(r"Solve (\d+)x([-+])(\d+)=(\d+)\.", prompt)
    assert m, prompt
    a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    x, rest = divmod(c - b if sign == "+" else c + b, a)
    assert rest == 0 and x > 0, prompt
    return x


def test_math_answers_and_every_step(demo):
    checked = 0
    for row in all_rows(demo):
        if row["domain"] != "math":
            continue
        prompt, text = row_prompt(row), solution(row)
        reference = str(_math_reference(prompt))
        if text is None:  # an RL row: the reference answer
            assert row["answer"] == reference, prompt
            continue
        assert boxed(text) == reference, (prompt, text)
        for chain in re.findall(r"\d[\d+\-*/]*(?:=[\d+\-*/]*\d)+", text):  # every "4+8+1=13", "20-5=15"...
            values = [eval(side) for side in chain.split("=")]
            assert all(v == values[0] for v in values), (chain, text)
        if checked % 8 == 0:  # Math-Verify is ~1 ms a call: every eighth solution, and all RL rows below
            assert verify(parse(f"${reference}$"), parse(text)), text
        checked += 1
    for name in RL_FILES:
        for row in rows(demo, name):
            if row["domain"] == "math":
                assert verify(parse(f"${row['answer']}$"), parse(f"\\boxed{{{_math_reference(row['prompt'])}}}"))
    assert checked == 3900 + 166


SCIENCE_LAWS = {"speed": lambda x, y: x // y, "current": lambda x, y: x // y, "force": lambda x, y: x * y,
                "work": lambda x, y: x * y, "voltage": lambda x, y: x * y}
CONVERSIONS = {"centimeters": 100, "meters": 1000, "grams": 1000, "minutes": 60, "seconds": 60,
               "milliliters": 1000, "hours": 24, "millimeters": 10}


def test_science_answers(demo):
    letters = []
    for row in all_rows(demo):
        if row["domain"] != "science":
            continue
        stem, *option_lines = row_prompt(row).split("\n")
        assert [line[:3] for line in option_lines] == ["A. ", "B. ", "C. ", "D. "]
        options = dict(line.split(". ", 1) for line in option_lines)
        assert len(set(options.values())) == 4, stem
        letter = row.get("answer") or boxed(solution(row))
        letters.append(letter)
        correct = options[letter]
        if row["kind"] == "units":
            n, unit = re.search(r"How many (\w+) are in (\d+) ", stem).group(2, 1)
            assert correct == str(int(n) * CONVERSIONS[unit]), stem
        elif row["kind"] in SCIENCE_LAWS:
            x, y = map(int, re.findall(r"\d+", stem)[:2])
            assert correct.split()[0] == str(SCIENCE_LAWS[row["kind"]](x, y)), stem
        if "messages" in row:
            assert re.search(rf"(?<![\w.]){re.escape(correct)}(?!\w)", solution(row)), (stem, correct)
            assert solution(row).endswith(f"option {letter}. \\boxed{{{letter}}}")
    assert len(letters) == 600 + 26 + 154 + 32 + 256  # sft_train, sft_heldout, rl_code_science, rl_heldout, rl_eval
    assert all(letters.count(L) > 0.18 * len(letters) for L in "ABCD")  # shuffled options


HARNESS = r"""
import contextlib, io, json, signal, sys
failures = []
signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("timeout")))
for job in json.load(sys.stdin):
    for case in job["code_test_cases"]:
        signal.alarm(5)
        try:
            scope, out = {"__name__": "__main__"}, io.StringIO()
            with contextlib.redirect_stdout(out):
                sys.stdin = io.StringIO(case["input"])
                exec(compile(job["groundtruth"], "teacher", "exec"), scope)
                if job["test_type"] == "function":
                    print(json.dumps(scope[job["fn_name"]](*json.loads(case["input"]))))
            got = out.getvalue() if job["test_type"] == "stdio" else json.loads(out.getvalue())
            want = case["output"] if job["test_type"] == "stdio" else json.loads(case["output"])
            if got != want:
                failures.append([job["prompt"], case, got])
        except BaseException as e:
            failures.append([job["prompt"], case, repr(e)])
        finally:
            signal.alarm(0)
print(json.dumps(failures))
"""


def _run_harness(jobs: list[dict]) -> list:
    proc = subprocess.run([sys.executable, "-I", "-c", HARNESS], input=json.dumps(jobs), text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_teacher_program_passes_its_tests(demo):
    code = [r for name in RL_FILES for r in rows(demo, name) if r["domain"] == "code"]
    assert len(code) == 358 + 32 + 256  # rl_code_science, rl_heldout, rl_eval
    for r in code:
        assert r["code_language"] == "python" and len(r["code_test_cases"]) >= 3
        assert (r["test_type"] == "function") == ("fn_name" in r), r
        assert r["test_type"] in ("stdio", "function")
    with ThreadPoolExecutor(2) as pool:
        failures = sum(pool.map(_run_harness, [code[0::2], code[1::2]]), [])
    assert not failures, failures[:3]

    # The real thing, once per kind: the program as a script, stdin piped in, stdout compared.
    one_per_kind = {r["kind"]: r for r in code if r["test_type"] == "stdio"}
    assert len(one_per_kind) == 6
    for r in one_per_kind.values():
        for case in r["code_test_cases"]:
            proc = subprocess.run([sys.executable, "-I", "-c", r["groundtruth"]], input=case["input"],
                                  text=True, capture_output=True, timeout=10)
            assert proc.stdout == case["output"], (r["prompt"], case, proc.stderr)


def test_sft_code_solutions_are_a_sentence_and_a_program(demo):
    for row in rows(demo, "sft_train.jsonl"):
        if row["domain"] == "code":
            m = re.fullmatch(r"([^\n`]+)\n```python\n(.+\n)```", solution(row), re.S)
            assert m, solution(row)
            compile(m.group(2), "teacher", "exec")


def test_token_lengths(demo):
    for name in ("sft_train.jsonl", "sft_heldout.jsonl"):
        per_domain = sft_token_lengths(demo, name)
        lengths = [n for values in per_domain.values() for n in values]
        assert max(lengths) <= 192
        assert sum(n < 100 for n in lengths) >= 0.95 * len(lengths)
        assert max(per_domain["math"]) < 80 and sum(per_domain["math"]) / len(per_domain["math"]) < 64


def test_tokenizer_files_ids_and_round_trip(demo):
    directory = demo / "tokenizer"
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<unk>", "<|endoftext|>", "<role>", "</role>")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 1000
    assert all(len(t) == 1 for t in tok.get_vocab() if any(c.isdigit() for c in t)), "digits must stay single"
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == CHAT_TEMPLATE and config["model_max_length"] >= 192
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert special["eos_token"] == special["pad_token"] == "<|endoftext|>"

    texts = [render_chat(r["messages"]) for r in rows(demo, "sft_train.jsonl")]
    texts += [r["groundtruth"] for r in rows(demo, "rl_code_science.jsonl") if "groundtruth" in r]
    texts += ["  def f(x):\n\treturn x  \n\n\n", " leading and trailing spaces ", "héllo wörld ∑ 数学 🙂", "12345 67"]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    decoded = tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
    assert [d for d, t in zip(decoded, texts) if d != t] == []
    assert tok.encode("Compute 47+85.", add_special_tokens=False).tokens[-6:] == ["4", "7", "+", "8", "5", "."]


def test_chat_template_renders_ling_style(demo):
    config = json.loads((demo / "tokenizer" / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+2."},
                {"role": "assistant", "content": "2+2=4. \\boxed{4}"}]
    expected = ("<role>SYSTEM</role>Be brief.<role>HUMAN</role>Compute 2+2."
                "<role>ASSISTANT</role>2+2=4. \\boxed{4}<|endoftext|>")
    plain = jinja2.Environment().from_string(config["chat_template"])
    hf_style = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(config["chat_template"])
    for template in (plain, hf_style):
        assert template.render(messages=messages, add_generation_prompt=False) == expected
        assert (template.render(messages=messages[:2], add_generation_prompt=True)
                == "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Compute 2+2.<role>ASSISTANT</role>")
    tok = Tokenizer.from_file(str(demo / "tokenizer" / "tokenizer.json"))
    ids = tok.encode(expected, add_special_tokens=False).ids
    assert ids[0] == 2 and ids[-1] == 1 and ids.count(2) == ids.count(3) == 3


def test_sft_rows_read_by_the_chat_tokenizer(demo):
    """The training-side reader (another module) accepts every row within the 192-token limit."""
    tok = ChatTokenizer(demo / "tokenizer")
    assert tok.eos_id == tok.pad_id == 1
    examples, report = read_sft_rows([str(demo / "sft_heldout.jsonl")], tok, 192)
    assert report.kept == report.total == len(rows(demo, "sft_heldout.jsonl"))
    assert all(e.ids[-1] == 1 and e.loss_mask[-1] == 1 for e in examples)


def test_the_rl_evaluation_set_changed_no_other_file():
    """rl_eval.jsonl is drawn last: every other file is the same with or without it."""
    with_eval = generate(seed=0, **SMALL)
    without = generate(seed=0, **{**SMALL, "n_eval": 0})
    assert without.pop("rl_eval.jsonl") == [] and len(with_eval.pop("rl_eval.jsonl")) == SMALL["n_eval"]
    assert with_eval == without
