"""RL prompt rows (jsonl), one prompt each: {"domain": "math"|"science"|"code", "prompt", ...}.
math and science carry "answer" (science: the option letter); code carries its tests in one of
the forms of `data/code_tests.py`: "code_test_cases" [{input, output}] as in the released
Ring-lite RL data (plus code_language, groundtruth, test_type, fn_name), or unit tests
(HumanEval's test + entry_point, MBPP's test_list). Bad rows, a code row whose tests cannot run
included, are reported with file:line, as for SFT rows."""

from __future__ import annotations

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


def parse_prompt_row(row, source: str = "") -> PromptRow:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    domain = row.get("domain")
    if domain not in DOMAINS:
        raise ValueError(f"'domain' must be one of {list(DOMAINS)}, got {domain!r}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing or empty 'prompt'")
    if domain == "code":
        code_tests(row)  # ValueError naming the key when its tests cannot run
        return PromptRow(domain, prompt, None, row, source)
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("missing or empty 'answer'")
    return PromptRow(domain, prompt, answer.strip(), row, source)


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
