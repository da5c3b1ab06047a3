"""Rollout throughput of an engine fleet behind the real sglang-router: N synthetic SGLang-protocol
test servers (tests/sglang_test_server.py: simulated per-token decode latency, an engine capacity
in running sequences, lognormal response lengths) behind sglang-router, sampled by FleetClient
(one request per sample) with rewards streamed into a RewardPool (generate_scored), for N in
--engines, plus one run at the largest N with one engine SIGKILLed once a third of the samples
are back. Per configuration one JSON object (--json) or one table row, and a PNG of tokens/s
against engines with the ideal line (N x one engine's):

    python tools/bench_rollout.py [--json] [--engines 1 2 4] [--prompts 512] [--samples 16]
        [--decode-latency-s 0.005] [--capacity 8] [--median-len 40] [--len-sigma 0.7]
        [--max-new-tokens 160] [--queue-factor 1.5 | --concurrency C] [--no-kill]
        [--plot runs/bench_rollout/bench_rollout.png] [--verbose]

Fields: engines; router (sglang-router version); samples (requested); tokens (generated, in the
samples returned); seconds (until the last group was back); tokens_per_s; samples_lost
(requested minus distinct samples returned with tokens and logprobs of equal length that are
exactly what their seed gives: missing, duplicated, empty or wrong ones all count); engine_killed;
rank0_peak_rss_mb (peak RSS of the client process: FleetClient, the completions, the reward
stream; servers, router and reward workers are other processes); reward_overlap_frac (share of
groups whose rewards were done before the last group was back); scaling (tokens_per_s at N /
(N x tokens_per_s at 1 engine), 1.0 at N=1; the killed run too, over its nominal N).

Every configuration runs in a fresh process (its own peak RSS, no warm pools) with the router in
front even at N=1, so the N=1 baseline pays the same hops. The reward fn is
tests/reward_fns.bench_reward (parses the ids, then waits --reward-wait-s) on 2 workers, warmed
up before the clock starts. An engine's ideal throughput is capacity / decode latency tokens/s
(2,400 by default); a configuration takes about samples x mean length x latency / (N x capacity),
plus the longest response's latency (the tail no engine count shortens).

The defaults: lengths lognormal with median 40 and sigma 0.7 (mean ~49 tokens, 2.4% cut at 160
and finishing on length), 20 ms a token, 48 sequences an engine, so a request decodes for ~1 s
and 4 engines want ~190 requests/s. What bounds it on 2 cores is CPU per request, not the
engines: the client ~2 ms (aiohttp; httpx's pool cost grew with the connections open and made
the client the bottleneck at a few hundred in flight), a test server ~1.5 ms, the router ~1 ms.
Concurrency is queue_factor x N x capacity (288 at 4 engines: each engine has a queue to refill
its slots from). 512 x 16 samples at 1, 2, 4 engines and the killed run take ~7 minutes. A
benchmark, not a test: nothing here asserts."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_SERVER = (sys.executable, str(ROOT / "tests" / "sglang_test_server.py"))
FIELDS = ("engines", "router", "samples", "tokens", "seconds", "tokens_per_s", "samples_lost", "engine_killed",
          "rank0_peak_rss_mb", "reward_overlap_frac", "scaling")
VOCAB, SEED = 32000, 7


def prompts_of(n: int, length: int) -> list[list[int]]:
    return [[2 + (i * 7919 + j * 104729) % (VOCAB - 2) for j in range(length)] for i in range(n)]


def server_args(a) -> list[str]:
    return ["--synthetic-vocab", str(VOCAB), "--synthetic-median-len", str(a.median_len),
            "--synthetic-len-sigma", str(a.len_sigma), "--decode-latency-s", str(a.decode_latency_s),
            "--max-running-requests", str(a.capacity), "--context-length", str(a.context_length)]


def concurrency_of(a, engines: int) -> int:
    """Requests in flight: --concurrency, or (0) queue_factor x the fleet's running slots, so every
    engine has a queue to refill its slots from while the client sends the next requests."""
    return a.concurrency or max(1, math.ceil(a.queue_factor * engines * a.capacity))


def cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lost_samples(groups, prompts, a, keys, params) -> int:
    """Requested minus distinct valid samples that are exactly their seed's (recomputed with the
    test server's own synthetic model)."""
    from megatron_ring.rollout.fleet_plan import clamp_max_new_tokens
    from megatron_ring.rollout.sglang_client import sampling_seed
    from tests.sglang_test_server import SyntheticModel

    model = SyntheticModel("check", VOCAB, 1, a.median_len, a.len_sigma)
    good, seen = 0, set()
    for i, group in enumerate(groups):
        max_new = clamp_max_new_tokens(params.max_new_tokens, len(prompts[i]), a.context_length)
        for j, c in enumerate((group or [])[:a.samples]):
            if not c.tokens or len(c.tokens) != len(c.logprobs) or tuple(c.tokens) in seen:
                continue
            seen.add(tuple(c.tokens))
            want = model.sample(prompts[i], {"max_new_tokens": max_new,
                                             "sampling_seed": sampling_seed(params.seed, keys[i], j)}, True)
            lps = [lp for lp, _, _ in want["meta_info"]["output_token_logprobs"]]
            good += c.tokens == want["output_ids"] and c.logprobs == lps
    return len(prompts) * a.samples - good


def measure(a, engines: int, kill: bool) -> dict:
    """One configuration, in this (fresh) process."""
    from megatron_ring.inference.sampling_params import SamplingParams
    from megatron_ring.rewards.reward_pool import RewardPool
    from megatron_ring.rollout import router
    from megatron_ring.rollout.fleet import Fleet
    from megatron_ring.rollout.fleet_client import FleetClient
    from megatron_ring.rollout.fleet_plan import FleetPlan
    from megatron_ring.rollout.streamed_rewards import generate_scored
    from tests.reward_fns import bench_reward

    plan = FleetPlan(url=None, placement="colocated", engine_tp=1, engines=engines, engines_per_node=engines, hosts=1,
                     base_gpu_ids=list(range(engines)), router=True, context_length=a.context_length,
                     server_args=server_args(a))
    prompts, keys = prompts_of(a.prompts, a.prompt_len), list(range(a.prompts))
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=1.0, seed=SEED)
    total = a.prompts * a.samples
    row = {"wait_s": a.reward_wait_s}
    pool = RewardPool(a.reward_workers, 60.0, fns={"bench": bench_reward})  # its workers start meanwhile
    try:
        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as logs:
            fleet = Fleet.start(plan, "synthetic-bench", logs, command=TEST_SERVER, ready_timeout_s=120)
            victim, back = fleet.servers[-1], [0]
            try:
                pool.score([("bench", "2 3", row)] * (2 * a.reward_workers))  # workers up before the clock
                client = FleetClient(fleet.url, concurrency=concurrency_of(a, engines),
                                     context_length=a.context_length, on_failure=fleet.prune)

                def on_group_of(on_group):
                    def handed(i, completions):
                        back[0] += len(completions)
                        if kill and back[0] >= total / 3 and victim.alive():
                            os.killpg(victim.proc.pid, signal.SIGKILL)
                        on_group(i, completions)
                    return handed

                pids = {"servers": [s.proc.pid for s in fleet.servers if not (kill and s is victim)],
                        "router": [fleet.router.proc.pid]}
                cpu0 = {k: sum(map(cpu_s, v)) for k, v in pids.items()}
                self0 = resource.getrusage(resource.RUSAGE_SELF)
                scored = generate_scored(
                    lambda on_group: client.generate(prompts, a.samples, params, keys, on_group_of(on_group)),
                    pool, lambda i, g: [("bench", " ".join(map(str, c.tokens)), row) for c in g if c.tokens])
                self1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = {k: sum(map(cpu_s, v)) - cpu0[k] for k, v in pids.items()}
                rss_mb = self1.ru_maxrss / 1024
                if kill:
                    victim.proc.wait(10)
                killed = kill and not victim.alive()
            finally:
                fleet.close()
    finally:
        pool.close()
    groups = scored.groups
    tokens = sum(len(c.tokens) for g in groups for c in g if c.tokens and len(c.tokens) == len(c.logprobs))
    seconds = scored.generated_s
    client_cpu = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    print(f"engines={engines} kill={kill} concurrency={client.concurrency} seconds={seconds:.1f} "
          f"scored_s={scored.scored_s:.1f} cpu_s: client={client_cpu:.1f} servers={cpu['servers']:.1f} "
          f"router={cpu['router']:.1f} stats={client.stats} lost_engines={len(fleet.lost)}",
          file=sys.stderr, flush=True)
    return {"engines": engines, "router": router.version(), "samples": total, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "samples_lost": lost_samples(groups, prompts, a, keys, params), "engine_killed": killed,
            "rank0_peak_rss_mb": round(rss_mb, 1), "reward_overlap_frac": round(scored.overlap_frac, 3)}


def child(a, engines: int, kill: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", str(engines), *(["--kill"] if kill else []),
           *(f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k in PASSED)]
    proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None if a.verbose else subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-20:])
        raise SystemExit(f"engines={engines} kill={kill} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], png: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r for r in rows if not r["engine_killed"]]
    one = next((r["tokens_per_s"] for r in clean if r["engines"] == 1), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["engines"] for r in clean]
    ax.plot(ns, [r["tokens_per_s"] for r in clean], marker="o", label="measured")
    if one is not None:
        ax.plot(ns, [n * one for n in ns], ls="--", color="gray", label="ideal (N x 1 engine)")
    for r in rows:
        if r["engine_killed"]:
            ax.plot([r["engines"]], [r["tokens_per_s"]], marker="x", ls="", color="red", ms=9,
                    label=f"{r['engines']} engines, one killed")
    ax.set_xlabel("engines")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(sorted(set(ns)))
    ax.set_title(f"rollout via sglang-router: {a.prompts}x{a.samples} samples, "
                 f"{a.decode_latency_s * 1e3:g} ms/token, capacity {a.capacity}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)


PASSED = ("prompts", "samples", "prompt_len", "decode_latency_s", "capacity", "median_len", "len_sigma",
          "max_new_tokens", "context_length", "concurrency", "queue_factor", "reward_workers", "reward_wait_s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--samples", type=int, default=16, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-latency-s", type=float, default=0.02, help="per decoded token of a request")
    p.add_argument("--capacity", type=int, default=48, help="an engine's running sequences (--max-running-requests)")
    p.add_argument("--median-len", type=float, default=40, help="lognormal median of a response's tokens")
    p.add_argument("--len-sigma", type=float, default=0.7, help="lognormal sigma of the response lengths")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longer responses are cut here (finish: length)")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight; 0: queue-factor x N x capacity")
    p.add_argument("--queue-factor", type=float, default=1.5)
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-wait-s", type=float, default=0.002, help="the reward fn's latency per item")
    p.add_argument("--no-kill", action="store_true", help="skip the run with an engine killed")
    p.add_argument("--plot", default=str(ROOT / "runs" / "bench_rollout" / "bench_rollout.png"), help="'': no plot")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration instead of a table")
    p.add_argument("--verbose", action="store_true", help="each configuration's CPU seconds etc. on stderr")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--kill", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a, a.one, a.kill)), flush=True)
        return 0
    runs = [(n, False) for n in sorted(set(a.engines))] + ([] if a.no_kill else [(max(a.engines), True)])
    if not a.json:
        print(f"{a.prompts} prompts x {a.samples} samples, lengths lognormal(median {a.median_len:g}, "
              f"sigma {a.len_sigma:g}) cut at {a.max_new_tokens}, {a.decode_latency_s * 1e3:g} ms/token, "
              f"capacity {a.capacity} sequences/engine (ideal {a.capacity / a.decode_latency_s:.0f} tokens/s "
              f"per engine), {a.reward_workers} reward workers")
        print(" ".join(f"{c:>{max(len(c), 8)}}" for c in FIELDS))
    rows, one = [], None
    for engines, kill in runs:
        r = child(a, engines, kill)
        if engines == 1 and not kill:
            one = r["tokens_per_s"]
        r["scaling"] = round(r["tokens_per_s"] / (engines * one), 3) if one else None
        r = {k: r[k] for k in FIELDS}
        rows.append(r)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(" ".join(f"{'-' if r[c] is None else r[c]!s:>{max(len(c), 8)}}" for c in FIELDS), flush=True)
    if a.plot:
        plot(rows, Path(a.plot), a)
        if not a.json:
            print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
