"""Weight-push cost, trainer to SGLang engines, by mode and engine count, on a real (single-process,
CPU, gloo) Megatron model and N SGLang-protocol test servers (tests/sglang_test_server.py) that
really replace the weights they serve:

    python tools/bench_weight_sync.py [--json] [--engines 1 2 4] [--layers 1] [--bucket-mb 512]
        [--models tiny ling_lite_slice] [--modes disk distributed tensor] [--reps 2]
        [--verify-tensors 4] [--plot runs/bench_weight_sync/bench_weight_sync.png] [--verbose]

Models: "tiny" is the ling-tiny preset; "ling_lite_slice" is Ling-lite's layer shapes (the
ling-lite preset's hidden size 2048, 16/4 heads, 64 experts of FFN 1408, shared expert 2816,
vocabulary 126,464) with --layers layers (default 1: one layer is already 1.1B parameters, 2.2 GB
in bf16, half of it embedding and head; each engine holds another copy, and a disk push briefly
holds three per engine, so more layers do not fit 24 GiB beside 4 engines). Each model is built
by build_model in bf16 (params_dtype) in a fresh process (distributed.init, gloo, world 1), so
what is sent is what weight_buckets.hf_buckets (the trainer's gather + HF conversion + bucketing)
produces. Before every push every parameter is negated, so every push changes every tensor the
engines serve.

Engines: N test servers started on export_hf of the same model, each --tp 1, except one with
--tp 2 when N >= 2 (engine 2 of N): its two TP ranks join the weight group as ranks of their own
and must both receive every bucket, so the group's rank layout (1 + sum of TP sizes) is exercised.
The servers of one engine count are started for it and stopped after it.

Modes (per engine count, one JSON object each):
- disk: export_hf to a fresh directory, then /update_weights_from_disk (push_from_disk) on every
  engine in parallel;
- distributed: WeightGroup over gloo with all N engines (group created once, outside the clock,
  as in training: connect_s), each bucket one broadcast announced by /update_weights_from_distributed;
- tensor: TensorPush (/update_weights_from_tensor, buckets as shared-memory files), measured at
  N=1 only: in one process one trainer rank feeds one engine. With k GPUs every training rank
  feeds the engine rank on its own GPU in parallel, so the per-engine cost does not grow with N.

Fields: model; mode; engines; bytes (tensor bytes pushed: the sum of the buckets, equal to the
export's tensor bytes for disk); seconds (wall time of the whole push: gather + convert + bucket +
send + engine load (for disk: export + reload), best of --reps after one warm-up push, as
SGLangEngine.push_weights reports it: the trainer's own path, staging buffers included); gb_per_s
(bytes / seconds / 1e9); verified (after the push every engine serves exactly the trainer's
tensors: push_weights' read-back of --verify-tensors tensors through /get_weights_by_name,
compared bit for bit; every timed push is checked, true only if all were);
vs_raw_broadcast (seconds / raw_s); extras: buckets, gather_s (walking hf_buckets alone, no send:
the CPU-local part), raw_s, tps (the engines' TP sizes), connect_s, problem (on a failed check),
skipped (a configuration that would not fit in the memory available now is not run), goal.

raw_s: the fastest of several raw broadcasts (before the modes, and one before every
distributed push, so both see the same state of the machine) of the same bytes from group rank 0
over the distributed mode's group (same
engines, same gloo group) as flat uint8 tensors, each received and dropped by every TP rank of
every engine through the test server's POST /bench_receive: one broadcast per bucket-size piece
(one when the model fits in one bucket), since a single 2.2 GB tensor per receiving rank would
not fit in memory next to the engines here. For disk and tensor vs_raw_broadcast is against the
same raw figure measured for that engine count (they use no group themselves: it says how far
they are from the wire's cost), null where none was measured (no /bench_receive, or --modes
without distributed). Goal: distributed on the Ling-lite slice vs_raw_broadcast <= 1.25 (printed
beside those rows, and as "goal" in their JSON).

After the per-configuration lines, an "estimate" object for the whole Ling-lite (16.8B parameters,
33.6 GB in bf16) at the ling_lite recipe's layout (recipes/ling_lite/rl_stage1_math.yaml on
recipes/base/cluster.yaml: nodes, GPUs per node, engine_tp), from the slice's measured per-byte
CPU-local cost (gather_s / bytes) plus the transport at assumed GPU-cluster bandwidths, every
assumption named in it. Then a PNG of seconds by mode and engine count (one panel per model).

Everything started (servers, groups, temporary directories) is stopped and removed at the end,
also on error. A benchmark, not a test: nothing here asserts. On 2 CPU cores: the tiny model at
1, 2, 4 engines takes ~1 minute, the one-layer slice several (building it alone ~25 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST_SERVER = (sys.executable, str(ROOT / "tests" / "sglang_test_server.py"))
FIELDS = ("model", "mode", "engines", "bytes", "seconds", "gb_per_s", "verified", "vs_raw_broadcast")
MODELS = ("tiny", "ling_lite_slice")
MODES = ("disk", "distributed", "tensor")
GOAL = 1.25  # distributed on the Ling-lite slice: seconds / raw broadcast
MARGIN_GB = 1.5
# Read-back is limited to tensors of at most this many elements: the test server's
# /get_weights_by_name turns the whole tensor into a Python list before truncating it (~10 GB and
# tens of seconds for the slice's 259M-element embedding or head).


def log(a, *msg) -> None:
    if a.verbose:
        print(*msg, file=sys.stderr, flush=True)


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def arch_of(name: str, layers: int):
    from megatron_ring.models.presets import get_preset

    if name == "tiny":
        return get_preset("ling-tiny")
    if name == "ling_lite_slice":
        return get_preset("ling-lite").replace(num_layers=layers)
    raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")


def tensor_bytes(arch, itemsize: int = 2) -> int:
    from megatron_ring.models import hf_convert as conv

    total = 0
    for shape in conv.expected_hf_shapes(arch).values():
        n = 1
        for d in shape:
            n *= d
        total += n * itemsize
    return total


def tps_of(n: int) -> list[int]:
    """The engines' TP sizes: all 1, but engine 2 of N runs TP 2 when N >= 2."""
    return [2 if j == 1 else 1 for j in range(n)]


def bench_receive_supported(url: str) -> bool:
    """Whether the test server has POST /bench_receive (probed with a group it does not have:
    a 4xx other than 404 means the endpoint is there; nothing is broadcast)."""
    req = urllib.request.Request(url + "/bench_receive", data=json.dumps({"group_name": "__probe__", "numel": 1}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status != 404
    except urllib.error.HTTPError as e:
        return e.code != 404
    except OSError:
        return False


class Engines:
    """N test servers on hf_dir (TP sizes tps), started in parallel; stop() ends them all."""

    def __init__(self, hf_dir, tps: list[int], log_dir: Path):
        from megatron_ring.platform.distributed import free_port
        from megatron_ring.rollout.sglang_server import SGLangServer, server_argv

        self.tps, self.servers = tps, []
        try:
            for j, tp in enumerate(tps):
                port = free_port()
                self.servers.append(SGLangServer(server_argv(hf_dir, "127.0.0.1", port, tp=tp, command=TEST_SERVER),
                                                 "127.0.0.1", port, log_dir / f"engine{j}_tp{tp}.log"))
            for s in self.servers:
                s.wait_ready(600.0)
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stop(self) -> None:
        for s in self.servers:
            s.stop(grace_s=10.0)


def timed_walk(it, spent: list[float]):
    """it's items; spent[0] += the time spent producing them (gather + convert + bucket)."""
    it = iter(it)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            spent[0] += time.perf_counter() - t
            return
        spent[0] += time.perf_counter() - t
        yield item


class Bench:
    """One model in this process: the trainer's side of every configuration."""

    def __init__(self, a, name: str, work: Path):
        import torch

        from megatron_ring.models.builder import build_model
        from megatron_ring.platform import distributed

        self.a, self.name, self.work = a, name, work
        self.torch = torch
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        layout = distributed.init(1, 1)
        self.arch = arch_of(name, a.layers)
        t = time.perf_counter()
        self.model = build_model(self.arch, layout.validate(self.arch), params_dtype=torch.bfloat16)
        log(a, f"{name}: built in {time.perf_counter() - t:.1f} s, {tensor_bytes(self.arch) / 1e9:.3f} GB in bf16")
        self.bucket_bytes = a.bucket_mb << 20
        self.dtype = torch.bfloat16
        self.version = 0
        self.bytes = tensor_bytes(self.arch)
        self.gather_s = self.walk()

    # -- pieces ---------------------------------------------------------------------------

    def walk(self) -> float:
        """Best of 3 walks of hf_buckets without sending: the CPU-local part of a push."""
        from megatron_ring.rollout.weight_buckets import Staging, hf_buckets

        best, staging = float("inf"), Staging()  # warm buffers, as from the second push of a run on
        for _ in range(3):
            t = time.perf_counter()
            for _ in hf_buckets(self.model, self.bucket_bytes, self.dtype, staging=staging):
                pass
            best = min(best, time.perf_counter() - t)
        return best

    def next_version(self) -> int:
        """Change every weight (negated: exact in bf16), so the push must replace what is served."""
        with self.torch.no_grad():
            for p in self.model.parameters():
                p.neg_()
        self.version += 1
        return self.version

    def export(self, path: Path) -> None:
        from megatron_ring.models.weights import export_hf

        export_hf(self.model, path, self.dtype)

    def engine(self, mode: str, urls: list[str], group, tensor):
        """The trainer's own push path: SGLangEngine over these engines (servers started by Engines)."""
        from megatron_ring.rollout.fleet import Fleet
        from megatron_ring.rollout.sglang_client import SGLangClient
        from megatron_ring.rollout.sglang_engine import SGLangEngine

        return SGLangEngine(SGLangClient(urls[0]), fleet=Fleet(urls[0], urls), weight_mode=mode,
                            sync=group if mode == "distributed" else tensor, weights_dir=self.work / "disk",
                            export_dtype=self.dtype, bucket_bytes=self.bucket_bytes,
                            verify_tensors=self.a.verify_tensors)

    def push(self, engine):
        """One push_weights (gather, buckets, send, engine load; then the read-back, untimed):
        (seconds, bytes, buckets, problem: '' when verified)."""
        from megatron_ring.rollout.base import RolloutError

        try:
            figures = engine.push_weights(self.model, self.next_version())
        except RolloutError as e:
            return float("nan"), self.bytes, None, str(e)
        return figures["push_s"], figures["push_bytes"], figures.get("push_buckets"), ""

    def raw_broadcast(self, group) -> float:
        """One pass of the same bytes over group's pg: rank 0 broadcasts flat uint8 pieces of at
        most a bucket each; every TP rank of every engine receives and drops them (/bench_receive)."""
        import torch.distributed as dist

        from megatron_ring.rollout.weight_sync import Task, wait_all

        flat = self.torch.zeros(min(self.bytes, self.bucket_bytes), dtype=self.torch.uint8)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        t = time.perf_counter()
        left = self.bytes
        while left > 0:
            n = min(left, flat.numel())
            piece = flat[:n]
            calls = [Task(lambda c=c: c.post("/bench_receive", {"group_name": group.name, "numel": n}, retry=False),
                          c.url) for c, _ in group.engines]
            work = group.pg.broadcast([piece], opts)
            wait_all(calls, work.is_completed, group.timeout_s, f"raw broadcast of {n} bytes")
            work.wait()
            left -= n
        return time.perf_counter() - t

    # -- one engine count -----------------------------------------------------------------

    def need_gb(self, mode: str, tps: list[int]) -> float:
        """Memory a push needs beyond what is held already (engines and trainer are running)."""
        gb, bucket = self.bytes / 2**30, min(self.bytes, self.bucket_bytes) / 2**30
        if mode == "disk":  # each engine: the loaded files beside the served weights
            return gb * len(tps) + bucket
        if mode == "distributed":  # per TP rank a received bucket; the sender's two staging buffers
            return bucket * (sum(tps) + 2)
        return 4 * bucket  # the staging buffers (shared memory), the engine's copy

    def engines(self, n: int, hf_dir: Path, modes: list[str], row) -> None:
        from megatron_ring.rollout.tensor_push import TensorPush
        from megatron_ring.rollout.weight_sync import WeightGroup

        a, tps = self.a, tps_of(n)
        start_need = len(tps) * 1.2 * self.bytes / 2**30
        if mem_available_gb() - MARGIN_GB < start_need:
            for mode in modes:
                row(mode, n, tps, skipped=f"{n} engines need ~{start_need:.1f} GB, {mem_available_gb():.1f} available")
            return
        fleet, group = Engines(hf_dir, tps, self.work / "logs"), None
        try:
            urls = fleet.urls
            raw_s = None
            plan = [m for m in modes if m != "tensor" or n == 1]
            if plan:  # the raw broadcast needs the group, whichever modes run
                group = WeightGroup(list(zip(urls, tps)), "127.0.0.1", backend="gloo", timeout_s=600.0)
                t = time.perf_counter()
                group.connect()
                connect_s = time.perf_counter() - t
                if bench_receive_supported(urls[0]):
                    raw_s = min(self.raw_broadcast(group) for _ in range(1 + a.reps))
                else:
                    log(a, f"{urls[0]} has no /bench_receive: vs_raw_broadcast is null")
            for mode in plan:
                need = self.need_gb(mode, tps)
                if mem_available_gb() - MARGIN_GB < need:
                    row(mode, n, tps, raw_s=raw_s, skipped=f"needs ~{need:.1f} GB more, "
                                                           f"{mem_available_gb():.1f} GB available")
                    continue
                tensor = None
                if mode == "tensor":
                    tensor = TensorPush(urls[:1], tp=tps[0], engines_per_node=1, timeout_s=600.0)
                engine = self.engine(mode, urls, group, tensor)
                runs = []
                for _ in range(1 + a.reps):
                    if mode == "distributed" and raw_s is not None:  # side by side: the same memory state
                        raw_s = min(raw_s, self.raw_broadcast(group))
                    runs.append(self.push(engine))
                timed = runs[1:]
                problems = [p for *_, p in timed if p]
                verified = None if any(p is None for *_, p in timed) else not problems
                seconds, nbytes, buckets, _ = min(timed, key=lambda r: r[0])
                log(a, f"{self.name} {mode} engines={n}: " + ", ".join(f"{r[0]:.3f}" for r in runs) + " s")
                row(mode, n, tps, seconds=seconds, nbytes=nbytes, buckets=buckets, verified=verified, raw_s=raw_s,
                    connect_s=connect_s if mode == "distributed" else None, problem=problems[0] if problems else None)
        finally:
            try:
                if group is not None:
                    group.close()
            finally:
                fleet.stop()

    def run(self) -> list[dict]:
        rows = []

        def row(mode, n, tps, seconds=None, nbytes=None, buckets=None, verified=None, raw_s=None, connect_s=None,
                problem=None, skipped=None):
            r = {"model": self.name, "mode": mode, "engines": n, "bytes": nbytes if nbytes is not None else self.bytes,
                 "seconds": None if seconds is None else round(seconds, 4),
                 "gb_per_s": None if seconds is None else round((nbytes or self.bytes) / seconds / 1e9, 3),
                 "verified": verified,
                 "vs_raw_broadcast": round(seconds / raw_s, 3) if seconds is not None and raw_s else None,
                 "buckets": buckets, "gather_s": round(self.gather_s, 4),
                 "raw_s": None if raw_s is None else round(raw_s, 4), "tps": tps}
            if connect_s is not None:
                r["connect_s"] = round(connect_s, 3)
            if problem:
                r["problem"] = problem
            if skipped:
                r["skipped"] = skipped
            if self.name == "ling_lite_slice" and mode == "distributed" and r["vs_raw_broadcast"] is not None:
                r["goal"] = f"vs_raw_broadcast <= {GOAL}: " + ("met" if r["vs_raw_broadcast"] <= GOAL else "not met")
            rows.append(r)
            print(json.dumps(r), flush=True)

        hf_dir = self.work / "initial"
        self.export(hf_dir)
        for n in sorted(set(self.a.engines)):
            self.engines(n, hf_dir, list(self.a.modes), row)
        return rows


def one_model(a, name: str) -> int:
    """In a fresh process: every configuration of one model, one JSON line each on stdout."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    from megatron_ring.platform import distributed

    with tempfile.TemporaryDirectory(prefix=f"bench_weight_sync_{name}_") as work:
        try:
            Bench(a, name, Path(work)).run()
        finally:
            distributed.shutdown()
    return 0


def child(a, name: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", name, "--engines", *map(str, a.engines), "--modes", *a.modes,
           f"--layers={a.layers}", f"--bucket-mb={a.bucket_mb}", f"--reps={a.reps}",
           f"--verify-tensors={a.verify_tensors}", *(["--verbose"] if a.verbose else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if a.verbose else subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.terminate()  # its finally stops the servers it started
        proc.wait(60)
        raise
    if proc.returncode != 0:
        tail = "\n".join((err or "").strip().splitlines()[-30:])
        raise SystemExit(f"model {name} failed (exit {proc.returncode}):\n{tail}")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# -- the whole Ling-lite, estimated ---------------------------------------------------------

ASSUMED = {
    "ib_bus_gb_s": 20.0,  # NCCL broadcast over the nodes: one 200 Gb/s HDR/NDR NIC per GPU, ~80% of 25 GB/s
    "hbm_copy_gb_s": 1000.0,  # a device-to-device copy (read + write) on an A100/H100
    "cuda_ipc_handle_s": 0.002,  # per bucket: open a CUDA IPC handle, one HTTP round trip to the engine
    "fs_write_gb_s": 2.0,  # rank 0 writing the HF export to the shared file system
    "fs_read_gb_s_per_node": 5.0,  # a node's engines reading the export (once per node, then page cache)
    "pcie_h2d_gb_s": 20.0,  # an engine rank copying its loaded shard to its GPU
}


def recipe_layout() -> dict:
    import yaml

    base = yaml.safe_load((ROOT / "recipes" / "base" / "cluster.yaml").read_text())
    rl = yaml.safe_load((ROOT / "recipes" / "ling_lite" / "rl_stage1_math.yaml").read_text())
    cluster = {**base.get("cluster", {}), **rl.get("cluster", {})}
    nodes, gpn = int(cluster["nodes"]), int(cluster["gpus_per_node"])
    tp = int(rl["rollout"]["engine_tp"])
    engines = int(rl["rollout"].get("engines") or 0) or nodes * gpn // tp
    return {"nodes": nodes, "gpus_per_node": gpn, "engine_tp": tp, "engines": engines,
            "engines_per_node": engines // nodes, "group_world": 1 + engines * tp,
            "train_tp": int(rl["parallel"]["tp"]), "train_ep": int(rl["parallel"]["ep"]),
            "recipe": "recipes/ling_lite/rl_stage1_math.yaml + recipes/base/cluster.yaml"}


def estimate(rows: list[dict], bucket_mb: int) -> dict:
    from megatron_ring.models.presets import get_preset

    measured = [r for r in rows if r["seconds"] is not None]
    src = next((r for r in measured if r["model"] == "ling_lite_slice"), None) or (measured[0] if measured else None)
    lay = recipe_layout()
    arch = get_preset("ling-lite")
    nbytes = tensor_bytes(arch)
    gb = nbytes / 1e9
    buckets = -(-nbytes // (bucket_mb << 20))
    out = {"estimate": "ling-lite", "params": nbytes // 2, "bytes": nbytes, "layout": lay, "buckets": buckets,
           "measured_on": None if src is None else src["model"], "assumptions": dict(ASSUMED)}
    if src is None:
        return out
    local_s_per_gb = src["gather_s"] / (src["bytes"] / 1e9)
    out["local_s_per_gb"] = round(local_s_per_gb, 4)
    out["assumptions"]["local"] = ("gather + HF conversion + bucketing at the per-byte CPU cost measured here "
                                   f"on {src['model']} (gather_s / bytes); an upper bound: on GPUs they run at "
                                   "HBM speed; the TP/EP gather is added at ib_bus_gb_s")
    out["assumptions"]["overlap"] = "none: the parts are added (WeightGroup overlaps gathering and sending: a bound)"
    a = ASSUMED
    local = local_s_per_gb * gb
    # TP/EP shards to full tensors: a rank receives all but its own 1/(tp x ep); EP groups span
    # nodes (EP 8 at TP 2 is 16 GPUs, two nodes), so count it all at the network's rate.
    gather = gb * (1 - 1 / (lay["train_tp"] * lay["train_ep"])) / a["ib_bus_gb_s"]
    parts = {
        "disk": {"local_s": local, "tp_ep_gather_s": gather, "fs_write_s": gb / a["fs_write_gb_s"],
                 "fs_read_s": gb / a["fs_read_gb_s_per_node"], "h2d_s": gb / lay["engine_tp"] / a["pcie_h2d_gb_s"]},
        "distributed": {"local_s": local, "tp_ep_gather_s": gather, "nccl_broadcast_s": gb / a["ib_bus_gb_s"],
                        "engine_copy_s": gb / a["hbm_copy_gb_s"]},
        "tensor": {"local_s": local, "tp_ep_gather_s": gather, "ipc_handles_s": buckets * a["cuda_ipc_handle_s"],
                   "device_copy_s": gb / a["hbm_copy_gb_s"]},
    }
    notes = {
        "disk": "rank 0 exports, every node's engines read the export once (page cache), each TP rank copies its half",
        "distributed": (f"one NCCL broadcast per bucket from rank 0 to all {lay['group_world'] - 1} engine ranks "
                        f"on {lay['nodes']} nodes: pipelined, bound by one NIC (ib_bus_gb_s), independent of N"),
        "tensor": ("every training rank gathers the full model and hands its colocated engine rank a CUDA IPC "
                   "handle per bucket: all engines in parallel, no network"),
    }
    out["assumptions"]["local_on_gpu"] = ("seconds_gpu_local: local_s replaced by gpu_local_passes passes over "
                                          "the bytes at hbm_copy_gb_s (cast, HF reshuffle, bucket cat)")
    out["assumptions"]["gpu_local_passes"] = 3
    gpu_local = 3 * gb / a["hbm_copy_gb_s"]
    out["modes"] = {m: {"seconds": round(sum(p.values()), 2),
                        "seconds_gpu_local": round(sum(p.values()) - p["local_s"] + gpu_local, 2),
                        "parts": {k: round(v, 3) for k, v in p.items()}, "how": notes[m]} for m, p in parts.items()}
    return out


# -- output ---------------------------------------------------------------------------------

def plot(rows: list[dict], png: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in a.models if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for mode, style in zip(MODES, ("o-", "s-", "D")):
            pts = [(r["engines"], r["seconds"]) for r in mine if r["mode"] == mode and r["seconds"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=mode + (" (1 engine per rank)" if mode == "tensor" else ""))
        raw = sorted({(r["engines"], r["raw_s"]) for r in mine if r["raw_s"] is not None})
        if raw:
            ax.plot(*zip(*raw), ls="--", color="gray", label="raw broadcast")
        ax.set_xlabel("engines (one of them TP 2 from N=2)")
        ax.set_ylabel("seconds per push")
        ax.set_xticks(sorted({r["engines"] for r in mine}))
        ax.set_title(f"{model}: {mine[0]['bytes'] / 1e9:.3g} GB bf16, {a.bucket_mb} MB buckets", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


TABLE = FIELDS + ("buckets", "gather_s", "raw_s")


def table_line(r: dict) -> str:
    cells = " ".join(f"{'-' if r.get(c) is None else r[c]!s:>{max(len(c), 9)}}" for c in TABLE)
    if r.get("goal"):
        cells += f"  goal {r['goal']}"
    if r.get("skipped"):
        cells += f"  skipped: {r['skipped']}"
    if r.get("problem"):
        cells += f"  NOT VERIFIED: {r['problem']}"
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--layers", type=int, default=1, help="layers of ling_lite_slice")
    p.add_argument("--bucket-mb", type=int, default=512, help="rollout.weight_bucket_mb")
    p.add_argument("--reps", type=int, default=2, help="timed pushes per configuration (after one warm-up)")
    p.add_argument("--verify-tensors", type=int, default=4, help="tensors read back after each push")
    p.add_argument("--plot", default=str(ROOT / "runs" / "bench_weight_sync" / "bench_weight_sync.png"),
                   help="'': no plot")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration, then the estimate")
    p.add_argument("--verbose", action="store_true", help="progress and every push's time on stderr")
    p.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        return one_model(a, a.one)
    t0 = time.perf_counter()
    if not a.json:
        print(f"weight push by mode, bf16, {a.bucket_mb} MB buckets, best of {a.reps} after a warm-up; "
              f"goal: distributed on ling_lite_slice vs_raw_broadcast <= {GOAL}")
        print(" ".join(f"{c:>{max(len(c), 9)}}" for c in TABLE))
    rows = []
    for name in a.models:
        for r in child(a, name):
            rows.append(r)
            print(json.dumps(r) if a.json else table_line(r), flush=True)
    est = estimate(rows, a.bucket_mb)
    print(json.dumps(est) if a.json else "estimate: " + json.dumps(est, indent=1), flush=True)
    if a.plot and rows:
        plot(rows, Path(a.plot), a)
        if not a.json:
            print(f"plot: {a.plot}")
    print(f"bench_weight_sync: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
