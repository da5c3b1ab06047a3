"""`megatron-ring score`: a file of responses scored offline by the RL rewards, run as a user runs
it; bad input named by file:line before anything is scored. (Timeouts: tests/test_rewards.py.)"""

import json
import subprocess

import pytest

from megatron_ring.cli import main
from tests.sandbox_fixtures import ROOT, needs_bwrap
from tests.test_code_reward import HUMANEVAL, MBPP

STDIO = {"domain": "code", "prompt": "echo", "code_test_cases": [{"input": "7\n", "output": "7\n"}]}
FUNCTION = {"domain": "code", "prompt": "is 3?", "test_type": "function", "fn_name": "is3",
            "code_test_cases": [{"input": "[3]", "output": "true"}]}
MATH = {"domain": "math", "prompt": "1+1?", "answer": "2"}

# (prompt row, response, reward, timed out, error contains)
CASES = [
    (MATH, "so \\boxed{2}", 1.0, False, None),
    (MATH, "so \\boxed{3}", 0.0, False, None),
    ({"domain": "science", "prompt": "A or B?", "answer": "B"}, "\\boxed{B}", 1.0, False, None),
    (STDIO, "```python\nprint(input())\n```", 1.0, False, None),
    (STDIO, "no code", 0.0, False, "no ``` code block"),
    (HUMANEVAL, "```python\ndef add(a, b):\n    return a + b\n```", 1.0, False, None),
    (HUMANEVAL, "```python\ndef add(a, b):\n    return a - b\n```", 0.0, False, "test line 4 failed"),
    (MBPP, "```python\nimport math\ndef hyp(a, b):\n    return math.hypot(a, b)\n```", 1.0, False, None),
    (FUNCTION, "```python\ndef is3(x):\n    return 1\n```", 0.0, False, "wrong result '1'"),
    (MATH, "\\boxed{2}", 1.0, False, None),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@needs_bwrap
def test_score_a_file_of_responses(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [c[0] for c in CASES])
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"response": c[1]} for c in CASES])
    run = subprocess.run([str(ROOT / ".venv/bin/megatron-ring"), "score", prompts, responses, "--json",
                          "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == len(CASES) + 1
    for i, (line, (row, _, reward, timed_out, error)) in enumerate(zip(lines, CASES), start=1):
        assert (line["prompt"], line["response"]) == (f"{prompts}:{i}", f"{responses}:{i}")
        assert (line["domain"], line["reward"], line["timed_out"]) == (row["domain"], reward, timed_out), line
        assert (line["error"] is None) if error is None else (error in line["error"]), line
    summary = lines[-1]["summary"]
    assert (summary["n"], summary["passed"], summary["timeouts"]) == (len(CASES), 6, 0) and summary["seconds"] > 0


def test_score_refuses_bad_input_by_file_and_line(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [MATH, STDIO, MATH])
    two = write_jsonl(tmp_path / "two.jsonl", [{"response": "a"}, {"response": "b"}])
    four = write_jsonl(tmp_path / "four.jsonl", [{"response": "a"}] * 4)
    bad_response = write_jsonl(tmp_path / "bad_r.jsonl", [{"response": "a"}, {"text": "b"}, {"response": "c"}])
    bad_prompt = write_jsonl(tmp_path / "bad_p.jsonl", [MATH, {**STDIO, "test_type": "assert"}, MATH])
    three = write_jsonl(tmp_path / "three.jsonl", [{"response": "a"}] * 3)
    for args, message in (
            ([prompts, two], f"{prompts} has 3 rows and {two} 2: {prompts}:3 has no response"),
            ([prompts, four], f"{prompts} has 3 rows and {four} 4: {four}:4 answers no prompt"),
            ([prompts, bad_response], f'{bad_response}:2: expected {{"response": "..."}}'),
            ([bad_prompt, three], f"{bad_prompt}:2: 'test_type' must be one of ['stdio', 'function', 'unit'], got 'assert'"),
            ([prompts, three, "--workers", "0"], "reward workers must be >= 1, got 0")):
        assert main(["score", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("megatron-ring score: error: ") and message in err, (message, err)
    with pytest.raises(SystemExit):
        main(["score", prompts])  # RESPONSES is required
