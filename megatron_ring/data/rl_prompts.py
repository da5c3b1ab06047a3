"""RL prompt rows, one prompt each: {"domain": "math"|"science"|"code", "prompt", ...}.
math and science carry "answer" (science: the option letter); code carries its tests in one of
the forms of `data/code_tests.py`: "code_test_cases" [{input, output}] as in the released
Ring-lite RL data (plus code_language, groundtruth, test_type, fn_name), or unit tests
(HumanEval's test + entry_point, MBPP's test_list). Bad rows, a code row whose tests cannot run
included, are reported with file:line, as for SFT rows.

The released Ring-lite RL rows (as seen in third-party use; unverified) carry no "domain": code
rows hold mid, dataset, difficulty, groundtruth (a reference solution), code_language and
code_test_cases; math rows an answer. So a row without "domain" is code when it has
code_test_cases, math when it has "answer" or "groundtruth" (its reference answer there);
science must say so. The prompt may be under "prompt", "question" or "problem", and
code_test_cases may be JSON text (as some parquet exports store it). The row the verifiers get is
the row with "domain", "prompt" (and "answer", "code_test_cases") set to what was read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from megatron_ring.data.code_tests import code_tests
from megatron_ring.data.jsonl_rows import DataError, RowReport, read_rows

DOMAINS = ("math", "science", "code")


@dataclass
class PromptRow:
    domain: str
    prompt: str
    answer: str | None = None
    row: dict = field(default_factory=dict)  # the whole row, for verifiers that need more fields
    source: str = ""

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


PROMPT_KEYS = ("prompt", "question", "problem")
ANSWER_KEYS = ("answer", "groundtruth")  # math and science; a code row's groundtruth is its solution


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if k in row), None)


def _domain(row: dict) -> str:
    domain = row.get("domain")
    if domain is None:  # the released form: inferred
        if "code_test_cases" in row:
            return "code"
        if any(k in row for k in ANSWER_KEYS):
            return "math"
        raise ValueError(f"missing 'domain' ({'|'.join(DOMAINS)}), and no 'code_test_cases' (code) or "
                         "'answer'/'groundtruth' (math) to tell it by")
    if domain not in DOMAINS:
        raise ValueError(f"'domain' must be one of {list(DOMAINS)}, got {domain!r}")
    return domain


def _answer(row: dict) -> str:
    answer = _first(row, ANSWER_KEYS)
    if isinstance(answer, list) and len(answer) == 1:  # a one-answer list
        answer = answer[0]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("missing or empty 'answer' (or 'groundtruth')")
    return answer.strip()


def parse_prompt_row(row, source: str = "") -> PromptRow:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    domain = _domain(row)
    prompt = _first(row, PROMPT_KEYS)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt' (or 'question', 'problem')")
    row = {**row, "domain": domain, "prompt": prompt}
    if domain == "code":
        if isinstance(row.get("code_test_cases"), str):
            try:
                row["code_test_cases"] = json.loads(row["code_test_cases"])
            except ValueError as e:
                raise ValueError(f"'code_test_cases' is text but not JSON ({e})") from None
        code_tests(row)  # ValueError naming the key when its tests cannot run
        return PromptRow(domain, prompt, None, row, source)
    row["answer"] = _answer(row)
    return PromptRow(domain, prompt, row["answer"], row, source)


def read_prompts(paths: list[str], domains=(), on_bad: str = "fail", show: int = 5,
                 report: RowReport | None = None) -> list[PromptRow]:
    """The RL prompt rows of these files, of the given domains only (none given: all). Bad rows
    stop the read (DataError with file:line) unless on_bad is "skip"; so do files that hold no
    prompt of those domains. `report`, when given, receives the row counts (bad rows by reason
    and the first `show` of them)."""
    rows, read = read_rows(list(paths), parse_prompt_row, "RL prompt", on_bad, show)
    if report is not None:
        vars(report).update(vars(read))
    if domains:
        rows = [r for r in rows if r.domain in domains]
    if not rows:
        raise DataError(f"no prompts of domains {list(domains) or 'any'} in {', '.join(map(str, paths))}")
    return rows
