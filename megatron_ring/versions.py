"""Every version pin of the project, in one dependency-free file.

setup.py reads it by path (runpy: importing the package would need its dependencies before they are
installed) and docker/Dockerfile runs it as a script, so the development install and the GPU image
cannot drift apart. `python megatron_ring/versions.py` lists what the image asks of it.
"""

import importlib.metadata as md
import json
import sys

MEGATRON_CORE = "megatron-core==0.16.1"

# Development machines and CI: the CPU torch build they carry locally (any other torch spec pulls a
# multi-GB CUDA build); triton runs the fused loss kernels in its interpreter (TRITON_INTERPRET=1).
CPU_TORCH = "torch==2.13.0"
CPU_TRITON = "triton==3.6.0"

# GPU. megatron-core 0.16.1 declares transformer-engine >=2.9,<2.12: 2.11 is the newest inside it.
TRANSFORMER_ENGINE = "transformer-engine[pytorch]==2.11.0"
# The release whose HTTP API megatron_ring/rollout/ is written and tested against.
SGLANG = "sglang==0.5.23"
# sglang 0.5.23 pins torch exactly (a CUDA 13.0 build): the image keeps that torch, with the
# torchvision released for it (torchvision is an unpinned sglang dependency, compiled per torch).
GPU_TORCH = "torch==2.14.1"
GPU_TORCHVISION = "torchvision==0.29.1"

# The rollout fleet's router (a Rust binary in an abi3 wheel: the same on CPU and GPU machines).
SGLANG_ROUTER = "sglang-router==0.3.2"

# NVIDIA apex, built from its repository: PyPI's `apex` is an unrelated project.
APEX_GIT = "https://github.com/NVIDIA/apex.git"
APEX_REF = "575968bc1f9127ccd61003a681472a83af4ff1a1"

# nvcr.io/nvidia/pytorch:<NGC_TAG>-py3. 25.11 is the last NGC PyTorch release on CUDA 13.0, the
# CUDA of GPU_TORCH: apex refuses to compile with an nvcc whose major.minor differs from torch's.
NGC_TAG = "25.11"

# Tests only: an HF export is loaded the way a user loads it (AutoModelForCausalLM with its
# remote code, AutoTokenizer). Not in the image, whose sglang brings its own transformers.
TEST_TRANSFORMERS = "transformers==5.23.0"

CPU_EXTRA = [CPU_TORCH, CPU_TRITON]
TEST_EXTRA = ["pytest", TEST_TRANSFORMERS]
GPU_EXTRA = [TRANSFORMER_ENGINE, SGLANG]
# What the GPU image installs from PyPI; apex comes from APEX_GIT.
IMAGE = [MEGATRON_CORE, TRANSFORMER_ENGINE, SGLANG, SGLANG_ROUTER, GPU_TORCH, GPU_TORCHVISION]


def name_of(pin: str) -> str:
    """'transformer-engine[pytorch]==2.11.0' -> 'transformer-engine'."""
    return pin.split("==")[0].split("[")[0].strip()


def version_of(pin: str) -> str:
    return pin.split("==")[1].strip()


def apex_requirement() -> str:
    """pip's VCS form, which records the commit it built (direct_url.json) for `check`."""
    return f"apex @ git+{APEX_GIT}@{APEX_REF}"


def constraints() -> list[str]:
    """The image's pip constraints: its pins without extras (pip refuses extras there), plus
    transformer-engine's torch extension and CUDA 13 core (GPU_TORCH's CUDA) at its version."""
    te = version_of(TRANSFORMER_ENGINE)
    pins = [f"{name_of(p)}=={version_of(p)}" for p in IMAGE]
    return pins + [f"transformer-engine-torch=={te}", f"transformer-engine-cu13=={te}"]


def pin(name: str) -> str:
    """The GPU image's requirement for one package, extras included."""
    if name == "apex":
        return apex_requirement()
    for p in IMAGE:
        if name_of(p) == name:
            return p
    raise KeyError(f"no image pin for {name!r}; pinned: {', '.join(name_of(p) for p in IMAGE)}, apex")


def _installed(name: str):
    """The installed version of a distribution (for apex: the commit pip built), or None."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return None
    if name == "apex":
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        return direct.get("vcs_info", {}).get("commit_id")
    return dist.version.split("+")[0]  # a local build tag (+cu130) does not change the release


def check(installed=_installed) -> list[str]:
    """What differs between the installed packages and the image's pins (empty when nothing)."""
    wanted = [line.split("==") for line in constraints()] + [["apex", APEX_REF]]
    have = {name: installed(name) for name, _ in wanted}
    return [f"{name}: installed {have[name]}, pinned {want}" for name, want in wanted if have[name] != want]


USAGE = """usage: python versions.py COMMAND
  constraints   pip constraints file of the GPU image
  pin NAME      the image's requirement for NAME (megatron-core, transformer-engine, sglang, torch,
                torchvision, apex)
  apex-url      NVIDIA apex's git repository
  apex-ref      the apex commit the image builds
  ngc-tag       the NGC PyTorch release the image starts from
  check         exit 1 (listing them) unless the installed packages match the image's pins"""


def main(argv: list[str]) -> int:
    simple = {"constraints": lambda: "\n".join(constraints()), "apex-url": lambda: APEX_GIT,
              "apex-ref": lambda: APEX_REF, "ngc-tag": lambda: NGC_TAG}
    if len(argv) == 1 and argv[0] in simple:
        print(simple[argv[0]]())
        return 0
    if len(argv) == 2 and argv[0] == "pin":
        try:
            print(pin(argv[1]))
        except KeyError as e:
            print(e.args[0], file=sys.stderr)
            return 2
        return 0
    if argv == ["check"]:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
