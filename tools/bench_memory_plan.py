"""The memory plan against what really happens, on CPU: the plan's activation prediction for
ling-tiny (local layer spec, fp32, TP 1, one row of T tokens) vs the peak torch's profiler
measures over one SFT forward+backward (launch/memory_measure.py, in a process of its own), at
T = 1024, 2048, 4096; then `megatron-ring plan` of the Ling-lite recipes, summarised.

    python tools/bench_memory_plan.py [--json] [--tokens 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ring.launch import memory_plan
from megatron_ring.models.presets import get_preset
from megatron_ring.recipe import load_recipe

RECIPES = ["recipes/ling_lite/distill.yaml", "recipes/ling_lite/rl_stage1_math.yaml",
           "recipes/ling_lite/rl_stage2_code_science.yaml"]


def measured_peaks(tokens: list[int]) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-m", "tests.workers.memory_plan_probe", "peak", *map(str, tokens)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    args = p.parse_args()
    arch = get_preset("ling-tiny")
    peaks = measured_peaks(args.tokens)
    rows = []
    for t in args.tokens:
        shape = memory_plan.Shape(tokens=t, seq=t, act_bytes=4, tp=1, te=False)
        predicted = sum(memory_plan.activation_bytes(arch, shape, None, memory_plan.padded_vocab(arch, 1)).values())
        rows.append({"T": t, "predicted_mb": round(predicted / 1e6, 2), "measured_mb": round(peaks[str(t)] / 1e6, 2),
                     "ratio": round(predicted / peaks[str(t)], 3)})
    plans = []
    for path in RECIPES:
        plan = memory_plan.plan(load_recipe(str(ROOT / path), []))
        j = plan.as_json()
        plans.append({"recipe": path, "total_gb": j["total_gb"], "fits": plan.total_gb <= plan.gpu_memory_gb,
                      "micro_batch_tokens": j["micro_batch_tokens"],
                      "phases": {n: ph["total_gb"] for n, ph in j["phases"].items()},
                      "update": {k: v for k, v in j["phases"]["update"].items() if k != "total_gb"}})
    out = {"activations_ling_tiny_cpu": rows, "method": "torch.profiler profile_memory=True: the largest "
           "running total of CPU allocations during one SFT forward+backward (after a warm-up step)",
           "plans": plans}
    if args.json:
        print(json.dumps(out))
    else:
        for r in rows:
            print(f"T {r['T']:6d}: predicted {r['predicted_mb']:9.1f} MB, measured {r['measured_mb']:9.1f} MB, "
                  f"ratio {r['ratio']:.3f}")
        for pl in plans:
            print(f"{pl['recipe']}: peak {pl['total_gb']:.1f} GB ({'fits' if pl['fits'] else 'exceeds'}); "
                  + ", ".join(f"{n} {v:.1f}" for n, v in pl["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
