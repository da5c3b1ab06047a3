"""A real one-node SLURM cluster on localhost, for tests.

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the module-scoped fixture)

    def test_job(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch(tmp_path / "job.sh", "arg1")
        assert slurm_cluster.wait(job, "COMPLETED")["ExitCode"] == "0:0"

or, outside pytest: `with LocalSlurm(base_dir) as cluster: ...`.

LocalSlurm runs Debian's munged, slurmctld and slurmd (SLURM 22.05) from a fresh base directory
as root, without systemd or cgroups, following ../shared/notes/slurm-localhost.md: its own munge
key and socket, a generated slurm.conf with free ports (two clusters, or a stale one, never
collide), the node sized from os.cpu_count() and /proc/meminfo, and cred_expire=5 with
sched_interval=1 so that a requeued job restarts in ~6 s instead of ~2 min. Client commands
(sbatch, scontrol, ...) find the cluster through env()'s SLURM_CONF; inherited SLURM_* variables
(a test run inside a SLURM job) are dropped so they cannot point the clients elsewhere.

If the binaries are missing they are installed with apt-get (root only). When that is impossible
or fails, SlurmUnavailable says what was missing and why; the fixture turns it into a skip.
A cluster that is installed but does not come up is an error (with the daemon log tails), not a
skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SEARCH_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be run here (binaries missing and not installable, or not root)."""


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SEARCH_DIRS)
    return shutil.which(name, path=path)


def find_binaries() -> dict[str, str | None]:
    """Path of each daemon and client command, None where not found (PATH, then /usr/sbin etc.)."""
    return {name: _which(name) for name in DAEMONS + CLIENTS}


_install_error: str | None = None  # a failed install is not retried within one process


def ensure_slurm() -> dict[str, str]:
    """Paths of all binaries, installing the Debian packages (as root) when any is missing.
    Raises SlurmUnavailable naming what is missing and why it could not be installed."""
    global _install_error
    if os.geteuid() != 0:
        raise SlurmUnavailable("LocalSlurm runs slurmd/slurmctld as SlurmUser=root and needs root "
                               f"(euid is {os.geteuid()})")
    found = find_binaries()
    missing = [n for n, p in found.items() if p is None]
    if not missing:
        return found
    if _install_error is None:
        apt = _which("apt-get")
        if apt is None:
            _install_error = "apt-get not found"
        else:
            cmd = (f"{apt} update && DEBIAN_FRONTEND=noninteractive {apt} install -y "
                   f"--no-install-recommends {' '.join(APT_PACKAGES)}")
            try:
                proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=600,
                                      env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
                if proc.returncode != 0:
                    _install_error = (f"`{cmd}` exited {proc.returncode}: "
                                      f"{(proc.stdout + proc.stderr)[-1500:].strip()}")
            except subprocess.TimeoutExpired:
                _install_error = f"`{cmd}` timed out after 600 s"
    found = find_binaries()
    still = [n for n, p in found.items() if p is None]
    if still:
        raise SlurmUnavailable(f"SLURM binaries missing: {', '.join(still)}; install of "
                               f"{' '.join(APT_PACKAGES)} failed: {_install_error or 'no error, but still missing'}")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on all interfaces right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output (Key=Value separated by spaces; a value may contain spaces,
    e.g. a JobName) as a dict."""
    text = text.strip()
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.\-]*)=", text))
    out = {}
    for m, nxt in zip(keys, keys[1:] + [None]):
        out[m.group(1)] = text[m.end():nxt.start() if nxt else len(text)].strip()
    return out


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  ({e})"
    return "\n".join("  " + line for line in lines[-n:])


def _leftovers(base: Path) -> list[int]:
    """PIDs of what is left of the cluster in base: SLURM/munge daemons (slurmstepd included)
    whose command line or open files lie under base, and job scripts run from base's spool.
    Matched narrowly, so that a test runner with base on its own command line is never hit."""
    base_s = str(base)
    daemons = {"munged", "slurmctld", "slurmd", "slurmstepd", "slurmscriptd"}
    ancestors, pid = set(), os.getpid()
    while pid > 1:  # never ourselves or a parent
        ancestors.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ancestors:
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f"{base_s}/spool/" in cmdline:  # a job's batch script
                pids.append(int(entry.name))
                continue
            if comm not in daemons and not any(cmdline.startswith(d) or f"/{d} " in cmdline for d in daemons):
                continue
            links = [cmdline] + [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(base_s + "/" in link or link == base_s for link in links):
            pids.append(int(entry.name))
    return pids


class LocalSlurm:
    """munged + slurmctld + slurmd in base_dir (created if needed; should be fresh and short:
    the munge socket path must fit in 107 bytes). cpus defaults to os.cpu_count(), mem_mb to 90%
    of MemTotal; SlurmdParameters=config_overrides makes slurmd accept larger values as given."""

    def __init__(self, base_dir, cpus: int | None = None, mem_mb: int | None = None,
                 start_timeout: float = 30.0):
        self.base = Path(base_dir).resolve()
        self.cpus = int(cpus or os.cpu_count() or 1)
        self.mem_mb = int(mem_mb or max(256, _mem_total_mb() * 9 // 10))
        self.start_timeout = start_timeout
        self.conf = self.base / "etc" / "slurm.conf"
        self.logs = self.base / "log"
        self.bin: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctld_port = self.slurmd_port = None
        self.start_seconds: float | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalSlurm":
        """Write the config, start the daemons, wait until the node is idle. Raises
        SlurmUnavailable (binaries missing) or RuntimeError (did not come up; daemons stopped)."""
        t0 = time.monotonic()
        self.bin = ensure_slurm()
        socket_path = self.base / "munge" / "munge.socket"
        if len(str(socket_path)) > 100:
            raise ValueError(f"base_dir too long for a unix socket path: {socket_path}")
        for sub in ("munge", "etc", "state", "spool", "log", "run"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.base / "munge", 0o755)  # munged refuses a socket dir not executable by all
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.ctld_port, self.slurmd_port = _free_ports(2)
        self.conf.write_text(self._slurm_conf())
        try:
            # --force: pytest's tmp dirs are 0700, munged otherwise wants every parent of its
            # socket executable by all (it then only warns)
            self._spawn("munged", "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
                        f"--pid-file={self.base / 'run' / 'munged.pid'}",
                        f"--seed-file={self.base / 'munge' / 'munged.seed'}",
                        f"--log-file={self.logs / 'munged.log'}")
            self._wait_for(lambda: socket_path.exists(), 10, "munged socket")
            self._spawn("slurmctld", "-D", "-f", str(self.conf))
            self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", "localhost")
            self._wait_for(lambda: self._node_state() == "idle", self.start_timeout, "node idle")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel all jobs, SIGTERM each daemon by PID and wait for it (SIGKILL after 15 s), then
        kill any process still using base_dir (slurmstepd). Safe to call twice."""
        if not self.procs:
            return
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self.procs.get("slurmd") is not None:
            try:  # let slurmd/slurmstepd take the jobs down while they still can
                self.run("scancel", "--quiet", f"--user={os.getuid()}", check=False, timeout=10)
                self._wait_for(lambda: not self.run("squeue", "-h", "-o", "%i", "--states=RUNNING,COMPLETING",
                                                    check=False, timeout=10).stdout.strip(),
                               15, "jobs cancelled", diagnose=False)
            except Exception:
                pass
        for group in (("slurmd", "slurmctld"), ("munged",)):
            procs = [self.procs[n] for n in group if n in self.procs]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
                try:  # anything left in the daemon's own session/process group
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
        for pid in _leftovers(self.base):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.procs = {}

    # ---- clients ------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for client commands: os.environ without SLURM_*, plus SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, cmd: str, *args, check: bool = True, timeout: float = 30, cwd=None):
        """Run a client command (sbatch, scontrol, ...) against this cluster; text output."""
        exe = self.bin.get(cmd) or _which(cmd) or cmd
        proc = subprocess.run([exe, *map(str, args)], env=self.env(), cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} {' '.join(map(str, args))} exited {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def sbatch(self, script_path, *args, options=()) -> int:
        """Submit script_path with script args; options (e.g. ["--output", p]) go before the script.
        Runs in the script's directory, so the default WorkDir and slurm-%j.out land there."""
        script_path = Path(script_path).resolve()
        out = self.run("sbatch", "--parsable", *options, script_path, *args, cwd=script_path.parent).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job N -o` as a dict: JobState, ExitCode ("3:0"), Restarts, Reason, ..."""
        return parse_scontrol(self.run("scontrol", "show", "job", job_id, "-o").stdout)

    def wait(self, job_id: int, states, timeout: float = 60, poll: float = 0.2,
             fail_on_terminal: bool = True) -> dict[str, str]:
        """Poll until JobState is in states (a str or iterable); return the job dict. Raises
        TimeoutError, or at once when the job ends in a state not wanted (fail_on_terminal)."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if fail_on_terminal and state in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} ended {state}, waiting for {sorted(states)}: {info}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}\n"
                                   + self.log_tails())
            time.sleep(poll)

    def requeue(self, job_id: int) -> None:
        """`scontrol requeue N`: a running --requeue job gets SIGTERM and restarts (~6 s)."""
        self.run("scontrol", "requeue", job_id)

    def signal_batch(self, job_id: int, sig="USR1") -> None:
        """`scancel --signal=SIG --batch N`: signal only the batch shell (delivered within ~1 s)."""
        if not isinstance(sig, str):
            sig = signal.Signals(sig).name
        self.run("scancel", f"--signal={sig.removeprefix('SIG')}", "--batch", job_id)

    def cancel(self, job_id: int) -> None:
        """`scancel N`."""
        self.run("scancel", job_id)

    # ---- internals ----------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        """PID of each started daemon."""
        return {name: p.pid for name, p in self.procs.items()}

    def leftovers(self) -> list[int]:
        """PIDs of this cluster's daemons, slurmstepd and job scripts still alive (none after stop())."""
        return _leftovers(self.base)

    def log_tails(self, n: int = 30) -> str:
        return "\n".join(f"--- {f.name} (last {n} lines)\n{_tail(f, n)}" for f in sorted(self.logs.glob("*")))

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.logs / f"{name}.out", "ab")
        try:
            self.procs[name] = subprocess.Popen([self.bin[name], *args], stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env(),
                                                start_new_session=True, cwd=self.base)
        finally:
            out.close()

    def _node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _wait_for(self, cond, timeout: float, what: str, diagnose: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                if not diagnose:
                    raise TimeoutError(what)
                node = self.run("scontrol", "show", "node", "-o", check=False, timeout=10)
                raise RuntimeError(
                    f"local SLURM in {self.base}: no {what} after {timeout} s"
                    + (f"; daemons exited: {dead}" if dead else "")
                    + f"\nsinfo: {self._node_state()!r}; scontrol show node: "
                    f"{(node.stdout + node.stderr).strip()}\n{self.log_tails()}")
            time.sleep(0.1)

    def _slurm_conf(self) -> str:
        b = self.base
        return f"""\
ClusterName=testcluster
SlurmctldHost=localhost
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket,cred_expire=5
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A started LocalSlurm for the importing test module (skips if SLURM cannot be installed);
    stopped after the module's last test, also on failure."""
    try:
        ensure_slurm()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
