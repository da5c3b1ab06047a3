"""The GPU image, checked without a docker engine: docker/Dockerfile parses, uses only declared
variables and starts from versions.py's NGC tag, its RUN scripts are valid bash, and setup.py and
the image take every pin from megatron_ring/versions.py and write none themselves. Each check also
runs on a broken copy, so that a check which can no longer fail is noticed."""

import ast
import importlib.metadata
import json
import re
import runpy
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
VERSIONS_PY = ROOT / "megatron_ring" / "versions.py"
pytestmark = pytest.mark.slow  # the docker image: `make test` only
V = runpy.run_path(str(VERSIONS_PY))

KEYWORDS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
            "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
# Instructions whose arguments docker expands $VAR in (RUN's shell expands its own).
EXPANDING = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "ONBUILD", "STOPSIGNAL", "USER", "VOLUME",
             "WORKDIR"}
BASE_ENV = {"PATH", "HOME", "PWD"}  # always set, by the base image or the shell
VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)|([A-Za-z_]\w*))")
ASSIGNED = re.compile(r"(?:^|[\s;&|(])([A-Za-z_]\w*)=|\bfor\s+([A-Za-z_]\w*)\s+in\b")
NGC_IMAGE = "nvcr.io/nvidia/pytorch:${NGC_TAG}-py3"


def parse(text: str) -> list[tuple[int, str, str]]:
    """Dockerfile -> [(first line, KEYWORD, arguments)]. As docker does: comment and blank lines
    are dropped, also inside a continuation, and a trailing backslash joins the next line."""
    out, buf, start = [], None, 0
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        if buf is None:
            buf, start = "", no
        body = raw.rstrip()
        if body.endswith("\\"):
            buf += body[:-1]
            continue
        keyword, _, args = (buf + body).strip().partition(" ")
        out.append((start, keyword, args.strip()))
        buf = None
    if buf is not None:
        raise ValueError(f"line {start}: the continuation runs past the end of the file")
    return out


def _names(text: str) -> set[str]:
    return {a or b for a, b in VAR.findall(text)}


def _bash_syntax(script: str) -> str:
    done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    return done.stderr.strip() if done.returncode else ""


def dockerfile_problems(text: str, ngc_tag: str) -> list[str]:
    """Everything docker would reject or misread in `text`, and any departure from the image's
    contract (one stage, FROM the NGC image at an ARG whose default is versions.py's tag)."""
    try:
        instructions = parse(text)
    except ValueError as e:
        return [str(e)]
    errors, global_args, args, env, froms = [], {}, set(), set(BASE_ENV), 0
    for line, kw, rest in instructions:
        where = f"line {line} {kw}"
        if kw not in KEYWORDS:
            errors.append(f"{where}: not a Dockerfile instruction")
            continue
        if froms == 0 and kw not in ("ARG", "FROM"):
            errors.append(f"{where}: only ARG may come before FROM")
        if kw == "ARG":
            name, _, default = rest.partition("=")
            if froms == 0:
                global_args[name.strip()] = shlex.split(default)[0] if default else None
            args.add(name.strip())
        elif kw == "FROM":
            froms += 1
            undeclared = _names(rest) - set(global_args)
            if undeclared:
                errors.append(f"{where}: undeclared {sorted(undeclared)}")
            if rest != NGC_IMAGE:
                errors.append(f"{where}: the base must be {NGC_IMAGE}, not {rest}")
            if global_args.get("NGC_TAG") != ngc_tag:
                errors.append(f"{where}: ARG NGC_TAG defaults to {global_args.get('NGC_TAG')}, versions.py "
                              f"says {ngc_tag}")
            args = set()  # a stage sees only the ARGs declared in it
        elif kw == "ENV":
            tokens = shlex.split(rest)
            env |= {t.split("=")[0] for t in tokens} if "=" in tokens[0] else {tokens[0]}
        elif kw in ("SHELL", "CMD", "ENTRYPOINT") and (kw == "SHELL" or rest.startswith("[")):
            try:
                assert all(isinstance(x, str) for x in json.loads(rest))
            except (ValueError, AssertionError, TypeError):
                errors.append(f"{where}: not a JSON list of strings")
        elif kw in ("COPY", "ADD"):
            sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
            errors += [f"{where}: {s} is not in the build context" for s in sources if not (ROOT / s).exists()]
        if kw in EXPANDING and kw != "FROM":
            undeclared = _names(rest) - args - env
            if undeclared:
                errors.append(f"{where}: undeclared {sorted(undeclared)}")
        if kw == "RUN":
            if rest.startswith("["):
                errors.append(f"{where}: exec form; the image's RUNs are bash scripts")
                continue
            assigned = {a or b for a, b in ASSIGNED.findall(rest)}
            undeclared = _names(rest) - args - env - assigned
            if undeclared:
                errors.append(f"{where}: undeclared {sorted(undeclared)}")
            syntax = _bash_syntax(rest)
            if syntax:
                errors.append(f"{where}: bash -n: {syntax}")
    if froms != 1:
        errors.append(f"{froms} FROM instructions; the image has one stage")
    return errors


def install_problems(text: str) -> list[str]:
    """Does the image install what versions.py pins, from versions.py, in the order that builds
    the extensions against the torch that stays (SGLang, which replaces torch, first)?"""
    errors, order, constraints_file, pip_constraint = [], [], None, None
    for line, kw, rest in parse(text):
        if kw == "RUN":
            for cmd, name in re.findall(r"versions\.py\s+([a-z-]+)(?:\s+([\w.-]+))?", rest):
                if cmd == "pin":
                    order.append(name)
                elif cmd == "constraints":
                    constraints_file = re.search(r"versions\.py\s+constraints\s*>\s*(\S+)", rest).group(1)
        elif kw == "ENV":
            for token in shlex.split(rest):
                if token.startswith("PIP_CONSTRAINT="):
                    pip_constraint = token.split("=", 1)[1]
    if constraints_file is None or constraints_file != pip_constraint:
        errors.append(f"PIP_CONSTRAINT={pip_constraint} is not the file versions.py constraints writes "
                      f"({constraints_file})")
    wanted = {"sglang", "transformer-engine", "apex", "megatron-core"}
    if not wanted <= set(order):
        errors.append(f"not installed from `versions.py pin`: {sorted(wanted - set(order))}")
    elif not order.index("sglang") < min(order.index("transformer-engine"), order.index("apex")):
        errors.append(f"sglang must be installed before the extensions are built: {order}")
    return errors


def hardcoded_pins(text: str, versions: dict, allowed: tuple[str, ...] = ()) -> list[str]:
    """Lines of `text` that write a pinned version (or a pinned package with a version spec)
    themselves instead of reading it from versions.py."""
    pins = versions["IMAGE"] + versions["CPU_EXTRA"] + [versions["MEGATRON_CORE"]]
    needles = {versions["version_of"](p) for p in pins} | {versions["APEX_REF"], versions["NGC_TAG"]}
    names = {versions["name_of"](p) for p in pins} | {"apex"}
    spec = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(\[[^\]]*\])?\s*(==|>=|<=|~=|!=|@)")
    hits = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip() in allowed:
            continue
        found = sorted(n for n in needles if n in line) + [m.group(0) for m in spec.finditer(line)]
        hits += [f"line {no}: {f}" for f in found]
    return hits


def pin_mismatches(kwargs: dict, versions: dict) -> list[str]:
    """Compare setup()'s requirements with versions.py: each group holds its pins verbatim, and no
    group names a pinned package any other way."""
    wanted = {"install_requires": [versions["MEGATRON_CORE"], versions["SGLANG_ROUTER"]], "cpu": versions["CPU_EXTRA"],
              "gpu": versions["GPU_EXTRA"]}
    groups = {"install_requires": kwargs["install_requires"], **kwargs["extras_require"]}
    pinned = {canonicalize_name(versions["name_of"](p))
              for p in versions["IMAGE"] + versions["CPU_EXTRA"] + [versions["MEGATRON_CORE"]]}
    errors = [f"{g} lacks {p}" for g, pins in wanted.items() for p in pins if p not in groups.get(g, [])]
    for group, reqs in groups.items():
        for r in reqs:
            if canonicalize_name(Requirement(r).name) in pinned and r not in wanted.get(group, []):
                errors.append(f"{group}: {r} is not versions.py's pin")
    return errors


def nonstdlib_imports(source: str) -> set[str]:
    tree = ast.parse(source)
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names} | (
        {"relative import"} if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)) else set())


def versions_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VERSIONS_PY), *args], capture_output=True, text=True, cwd="/")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def setup_kwargs() -> dict:
    """setup()'s arguments, by running setup.py against a stand-in setuptools module."""
    captured = {}
    fake = types.ModuleType("setuptools")
    fake.setup, fake.find_packages = (lambda **kw: captured.update(kw)), (lambda **kw: [])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "setuptools", fake)
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_dockerfile_parses_and_declares_what_it_uses(dockerfile):
    assert dockerfile_problems(dockerfile, V["NGC_TAG"]) == []
    assert parse(dockerfile)[0][1:] == ("ARG", f"NGC_TAG={V['NGC_TAG']}")


@pytest.mark.parametrize("name, edit", [
    ("unknown instruction", lambda t: t + "\nRUNN echo hi\n"),
    ("instruction before FROM", lambda t: "WORKDIR /x\n" + t),
    ("undeclared variable", lambda t: t + "\nWORKDIR /opt/${NOWHERE}\n"),
    ("undeclared variable in RUN", lambda t: t + '\nRUN echo "$NOT_AN_ARG"\n'),
    ("stage ARG used in FROM", lambda t: t.replace("${NGC_TAG}", "${MAX_JOBS}")),
    ("hard-coded base tag", lambda t: t.replace("${NGC_TAG}", V["NGC_TAG"])),
    ("NGC_TAG default differs", lambda t: t.replace(f"ARG NGC_TAG={V['NGC_TAG']}", "ARG NGC_TAG=24.01")),
    ("bash syntax", lambda t: t + "\nRUN if true; then echo unfinished\n"),
    ("dangling continuation", lambda t: t + "\nRUN echo \\\n"),
    ("missing COPY source", lambda t: t + "\nCOPY no_such_file.txt /tmp/\n"),
    ("SHELL not JSON", lambda t: t + "\nSHELL /bin/sh -c\n"),
    ("second stage", lambda t: t + "\nFROM " + NGC_IMAGE + "\n"),
])
def test_dockerfile_checks_catch_a_broken_copy(dockerfile, name, edit):
    assert dockerfile_problems(edit(dockerfile), V["NGC_TAG"]), name


def test_run_scripts_are_checked_as_docker_joins_them():
    text = "ARG NGC_TAG=1\nFROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3\nRUN a=1 \\\n# dropped\n    && echo $a\n"
    assert parse(text)[-1] == (3, "RUN", "a=1     && echo $a")
    assert dockerfile_problems(text, "1") == []


def test_the_image_installs_every_pin_from_versions_py(dockerfile):
    assert install_problems(dockerfile) == []
    for name in {n for _, kw, rest in parse(dockerfile) if kw == "RUN"
                 for n in re.findall(r"versions\.py\s+pin\s+([\w.-]+)", rest)}:
        assert versions_cli("pin", name).returncode == 0, name


@pytest.mark.parametrize("edit", [
    lambda t: re.sub(r"\n# 1\..*?\n\n", "\n", t, flags=re.S),  # no SGLang
    lambda t: re.sub(r"(\n# 1\..*?\n)(\n.*)", r"\2\1", t, flags=re.S),  # SGLang last
    lambda t: t.replace("ENV PIP_CONSTRAINT=", "ENV PIP_CONSTRAINTS="),
])
def test_install_checks_catch_a_broken_copy(dockerfile, edit):
    assert edit(dockerfile) != dockerfile
    assert install_problems(edit(dockerfile))


def test_no_pinned_version_is_written_outside_versions_py(dockerfile):
    arg_line = f"ARG NGC_TAG={V['NGC_TAG']}"
    assert hardcoded_pins(dockerfile, V, allowed=(arg_line,)) == []
    assert hardcoded_pins((ROOT / "setup.py").read_text(), V) == []
    # the one place the Dockerfile may write a version, and only because docker needs it there
    assert [hit.split(": ")[1] for hit in hardcoded_pins(dockerfile, V)] == [V["NGC_TAG"]]
    assert hardcoded_pins(dockerfile + "\nRUN pip install 'sglang>=0.4'\n", V, allowed=(arg_line,))
    assert hardcoded_pins(f'CORE = ["{V["GPU_TORCH"]}"]\n', V)


def test_setup_py_requirements_are_versions_pins(setup_kwargs):
    assert pin_mismatches(setup_kwargs, V) == []
    assert set(setup_kwargs["extras_require"]) == {"cpu", "gpu", "test"}
    extras = {**setup_kwargs["extras_require"], "gpu": [V["GPU_EXTRA"][0], "sglang==0.4.0"]}
    broken = dict(setup_kwargs, extras_require=extras)
    assert pin_mismatches(broken, V) == ["gpu lacks " + V["SGLANG"], "gpu: sglang==0.4.0 is not versions.py's pin"]
    assert pin_mismatches(dict(setup_kwargs, install_requires=[*setup_kwargs["install_requires"], "torch"]), V)


def test_versions_py_is_dependency_free():
    assert nonstdlib_imports(VERSIONS_PY.read_text()) == set()
    assert nonstdlib_imports("import torch\nfrom megatron_ring import cli\nfrom . import x\n") == {
        "torch", "megatron_ring", "relative import"}


def test_versions_cli_outputs_parse():
    constraints = versions_cli("constraints")
    assert constraints.returncode == 0
    reqs = [Requirement(line) for line in constraints.stdout.splitlines()]
    for r in reqs:  # pip accepts only plain `name==version` lines as constraints
        assert not r.extras and r.marker is None and r.url is None, r
        assert [s.operator for s in r.specifier] == ["=="], r
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names))
    assert {str(r) for r in reqs} >= {f"{V['name_of'](p)}=={V['version_of'](p)}" for p in V["IMAGE"]}

    assert versions_cli("ngc-tag").stdout.strip() == V["NGC_TAG"]
    assert re.fullmatch(r"\d\d\.\d\d", V["NGC_TAG"])
    assert re.fullmatch(r"[0-9a-f]{40}", versions_cli("apex-ref").stdout.strip())
    assert versions_cli("apex-url").stdout.strip() == "https://github.com/NVIDIA/apex.git"
    for pin in V["IMAGE"]:
        assert versions_cli("pin", V["name_of"](pin)).stdout.strip() == pin
    apex = Requirement(versions_cli("pin", "apex").stdout.strip())
    assert apex.name == "apex" and apex.url == f"git+https://github.com/NVIDIA/apex.git@{V['APEX_REF']}"

    assert versions_cli("pin", "apex-from-pypi").returncode == 2
    usage = versions_cli()
    assert usage.returncode == 2 and "constraints" in usage.stderr


def test_versions_check_reports_each_mismatch():
    wanted = dict(line.split("==") for line in V["constraints"]()) | {"apex": V["APEX_REF"]}
    assert V["check"](installed=wanted.get) == []
    drifted = wanted | {"torch": V["version_of"](V["CPU_TORCH"]), "apex": None}
    assert V["check"](installed=drifted.get) == [
        f"torch: installed {V['version_of'](V['CPU_TORCH'])}, pinned {V['version_of'](V['GPU_TORCH'])}",
        f"apex: installed None, pinned {V['APEX_REF']}"]
    assert V["_installed"]("pytest") == importlib.metadata.version("pytest")
    assert V["_installed"]("no-such-distribution") is None


def test_dockerignore_keeps_runs_and_environments_out_of_the_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "runs", "build", ".git"} <= patterns
