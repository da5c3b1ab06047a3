import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ring.models.hf_checkpoint import HFWriter  # noqa: E402
from megatron_ring.models.hf_convert import expected_hf_shapes  # noqa: E402
from megatron_ring.models.presets import get_preset  # noqa: E402
from megatron_ring.platform.distributed import torchrun  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end to end (the CLI pipeline, SLURM, the docker image); "
                                       "`make test` runs them, `make test-fast` (-m 'not slow') does not")


def write_random_hf(path: Path, arch, seed: int = 0) -> Path:
    """A random HF-format Ling checkpoint (fp32). Weights are large enough that routing and
    attention are far from uniform, so layout mistakes change the numbers."""
    g = torch.Generator().manual_seed(seed)
    writer = HFWriter(path, arch, dtype=torch.float32, max_shard_bytes=1 << 20)  # several shards
    for name, shape in expected_hf_shapes(arch).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (0.5 if name.endswith("mlp.gate.weight") else 0.08)
        writer.add(name, t)
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_arch():
    return get_preset("ling-tiny")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_arch):
    return write_random_hf(tmp_path_factory.mktemp("tiny_hf"), tiny_arch)


@pytest.fixture(scope="session")
def tiny_hf_normhead(tmp_path_factory, tiny_arch):
    return write_random_hf(tmp_path_factory.mktemp("tiny_hf_nh"), tiny_arch.replace(norm_head=True), seed=1)


def demo_data(tmp_path_factory, name: str, **sizes) -> Path:
    """A small demo data set (data/demo_data.py) in a fresh temporary directory."""
    from megatron_ring.data.demo_data import write_demo_data

    out = tmp_path_factory.mktemp(name)
    write_demo_data(out, **sizes)
    return out


def run_workers(module: str, nproc: int, *args, timeout: int = 600):
    """Run tests/workers/<module>.py under torchrun; fail with its output if it fails."""
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = torchrun(nproc, ["-m", f"tests.workers.{module}", *map(str, args)], env=env,
                    capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"{module} x{nproc} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_json(path: Path):
    return json.loads(Path(path).read_text())
