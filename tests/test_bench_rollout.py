"""tools/bench_rollout.py end to end at a toy size: synthetic engines behind the real router, one
JSON object per configuration with the agreed fields, nothing lost, an engine killed in the last."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["engines", "router", "samples", "tokens", "seconds", "tokens_per_s", "samples_lost", "engine_killed",
          "rank0_peak_rss_mb", "reward_overlap_frac", "scaling"]


@pytest.mark.slow  # three configurations, each a fresh process with its servers and router: ~25 s
def test_bench_rollout_json(tmp_path):
    png = tmp_path / "bench_rollout.png"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_rollout.py"), "--json", "--prompts", "8",
                          "--samples", "2", "--engines", "1", "2", "--decode-latency-s", "0.001",
                          "--plot", str(png)], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["engines"], r["engine_killed"]) for r in rows] == [(1, False), (2, False), (2, True)]
    for r in rows:
        assert list(r) == FIELDS
        assert r["samples"] == 16 and r["samples_lost"] == 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert r["rank0_peak_rss_mb"] > 0 and 0.0 <= r["reward_overlap_frac"] <= 1.0
    assert rows[0]["scaling"] == 1.0 and rows[1]["scaling"] > 0
    assert png.stat().st_size > 0
