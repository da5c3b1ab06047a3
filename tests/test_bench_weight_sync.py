"""tools/bench_weight_sync.py end to end on the tiny model: one and two engines (one of them TP 2),
every mode, one JSON object per configuration with the agreed fields, every push verified, the
same bytes in every mode, then the Ling-lite estimate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["model", "mode", "engines", "bytes", "seconds", "gb_per_s", "verified", "vs_raw_broadcast"]


@pytest.mark.slow  # a Megatron process, three test servers and nine pushes per engine count: ~30 s
def test_bench_weight_sync_json(tmp_path):
    png = tmp_path / "bench_weight_sync.png"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_weight_sync.py"), "--json", "--models", "tiny",
                          "--engines", "1", "2", "--plot", str(png)],
                         check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    rows, est = lines[:-1], lines[-1]
    assert [(r["mode"], r["engines"]) for r in rows] == [("disk", 1), ("distributed", 1), ("tensor", 1),
                                                         ("disk", 2), ("distributed", 2)]
    for r in rows:
        assert list(r)[:len(FIELDS)] == FIELDS
        assert r["model"] == "tiny" and "skipped" not in r
        assert r["verified"] is True, r
        assert r["seconds"] > 0 and r["gb_per_s"] > 0
        assert r["vs_raw_broadcast"] is None or r["vs_raw_broadcast"] > 0
    assert len({r["bytes"] for r in rows}) == 1 and rows[0]["bytes"] > 0
    assert [r["tps"] for r in rows] == [[1], [1], [1], [1, 2], [1, 2]]
    assert est["estimate"] == "ling-lite" and est["layout"]["engines"] == 128
    assert set(est["modes"]) == {"disk", "distributed", "tensor"} and est["assumptions"]
    assert png.stat().st_size > 0
