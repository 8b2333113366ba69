"""A real one-node Slurm cluster that tests start by themselves.

``ensure_installed()`` apt-installs Debian's slurm-wlm and munge if they are missing, or
returns why it can't.  ``start(workdir)`` starts a private munged (own key and socket),
slurmctld and slurmd as foreground children reading the slurm.conf it writes into *workdir*
(via SLURM_CONF; nothing under /etc is used), waits for the node to be idle and returns a
``Cluster``.  State, spool and logs stay in *workdir*; ports are picked free, so concurrent
test sessions get separate clusters.  ``Cluster.stop()`` cancels jobs and ends the daemons,
which also get SIGTERM if the test process dies.  Needs root.

Tests use the session-scoped ``slurm_cluster`` fixture and carry the ``slurm`` mark::

    pytest_plugins = ["tests.slurm_cluster"]  # or: from tests.slurm_cluster import slurm_cluster

    @pytest.mark.slurm
    def test_something(slurm_cluster):
        job = slurm_cluster.sbatch(["--wrap", "true"])
        assert slurm_cluster.wait(job) == {job: "COMPLETED"}

Accounting is off (no sacct): finished jobs stay in ``scontrol show job`` for MinJobAge
seconds, which ``wait()`` reads.  A requeued job becomes eligible again only after
cred_expire seconds (Slurm's default 120 s, 5 s here).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

NEEDED = ("sbatch", "srun", "scontrol", "slurmctld", "slurmd", "munged", "munge", "unmunge")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}

SLURM_CONF = """\
ClusterName=pipeline-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
MinJobAge=3600
KillWait=2
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def ensure_installed() -> str | None:
    """Install slurm-wlm and munge with apt-get if needed; return None, or why not."""
    missing = [name for name in NEEDED if which(name) is None]
    if not missing:
        return None
    if os.geteuid() != 0 or which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and apt-get needs root"
    log.warning("installing slurm-wlm and munge with apt-get (missing: %s)", ", ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    try:
        for args in (install, ["update"], install):  # update only when the first install fails
            result = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", *args], env=env, capture_output=True,
                                    text=True, timeout=900)
            if args is install and result.returncode == 0:
                break
    except subprocess.TimeoutExpired as exc:
        return f"apt-get timed out: {exc}"
    missing = [name for name in NEEDED if which(name) is None]
    output = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
    return f"apt-get did not install {', '.join(missing)}: {output}" if missing else None


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the daemon if the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _spawn(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)


def _poll(predicate, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(message())
        time.sleep(0.2)


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"\n--- {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _munge_works(munge_socket: Path) -> bool:
    flag = f"--socket={munge_socket}"
    cred = subprocess.run([which("munge"), flag, "-n"], capture_output=True, timeout=10)
    decoded = subprocess.run([which("unmunge"), flag], input=cred.stdout, capture_output=True, timeout=10)
    return cred.returncode == 0 and decoded.returncode == 0


def _write_munge_key(path: Path) -> None:
    """What `mungekey --create` writes: 1024 random bits, root-owned, mode 0600."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(os.urandom(128))


def _write_conf(workdir: Path, munge_socket: Path) -> Path:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    conf = workdir / "slurm.conf"
    conf.write_text(SLURM_CONF.format(
        host=socket.gethostname().split(".")[0], workdir=workdir, munge_socket=munge_socket,
        cpus=len(os.sched_getaffinity(0)), mem_mb=mem_kb // 1024 // 2, ctld_port=_free_port(),
        slurmd_port=_free_port()))
    return conf


@dataclass
class Cluster:
    workdir: Path
    munge_dir: Path
    env: dict
    procs: list = field(default_factory=list)  # (name, Popen), stopped in reverse order

    def run(self, *cmd: str, check: bool = True) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        result = subprocess.run([which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
        return result.stdout

    def logs(self) -> str:
        return "".join(_tail(self.workdir / f"{name}.log") for name, _ in self.procs)

    def sbatch(self, args: list[str]) -> str:
        """Submit a batch job; return its job id (the array job id for an array)."""
        return self.run("sbatch", "--parsable", *args).strip().split(";")[0]

    def states(self, job: str) -> dict[str, str]:
        """{"<id>" or "<array id>_<tasks>": JobState} for each record scontrol has of *job*."""
        states = {}
        for line in self.run("scontrol", "--oneliner", "show", "job", job).splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            key = fields["JobId"]
            if fields.get("ArrayTaskId"):
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[key] = fields["JobState"]
        return states

    def wait(self, job: str, timeout: float = 30) -> dict[str, str]:
        """Wait until every task of *job* has left the queue; return their final states."""
        _poll(lambda: all(state in FINAL_STATES for state in self.states(job).values()), timeout,
              lambda: f"job {job} not done after {timeout} s: {self.states(job)}{self.logs()}")
        return self.states(job)

    def requeue(self, job: str) -> None:
        """Requeue a job or one array task ("<array id>_<task>")."""
        self.run("scontrol", "requeue", job)

    def stop(self) -> None:
        """Cancel all jobs, end the daemons (SIGTERM, then SIGKILL) and remove the munge key."""
        try:
            if any(name == "slurmctld" and proc.poll() is None for name, proc in self.procs):
                self.run("scancel", "--full", "--user=root", check=False)
                _poll(lambda: not self.run("squeue", "-h", check=False).strip(), 10, lambda: "jobs still queued")
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("could not cancel the jobs before shutdown: %s", exc)
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    log.warning("%s ignored SIGTERM; killing it", name)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)


def start(workdir: Path | str) -> Cluster:
    """Start munged, slurmctld and slurmd for a cluster in *workdir*; return once it is idle."""
    workdir = Path(workdir).resolve()
    for sub in ("state", "spool"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # munged wants every directory above its socket world-searchable (pytest's tmp dirs are not)
    munge_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-"))
    munge_dir.chmod(0o755)
    munge_socket = munge_dir / "munge.socket"
    env = {**os.environ, "PATH": SEARCH_PATH, "SLURM_CONF": str(_write_conf(workdir, munge_socket))}
    cluster = Cluster(workdir, munge_dir, env)
    try:
        _write_munge_key(munge_dir / "munge.key")
        munged = [which("munged"), "--foreground", f"--key-file={munge_dir}/munge.key", f"--socket={munge_socket}",
                  f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed"]
        cluster.procs.append(("munged", _spawn(munged, workdir / "munged.log", env)))
        _poll(lambda: _check_alive(cluster) and _munge_works(munge_socket), 15,
              lambda: f"munged did not come up:{cluster.logs()}")
        for name, args in (("slurmctld", ["-D", "-c"]), ("slurmd", ["-D"])):
            cluster.procs.append((name, _spawn([which(name), *args], workdir / f"{name}.log", env)))
        _poll(lambda: _check_alive(cluster) and _node_state(cluster) == "idle", 60,
              lambda: f"Slurm node not idle after 60 s (sinfo: {_node_state(cluster)!r}):{cluster.logs()}")
    except BaseException:
        cluster.stop()
        raise
    log.info("Slurm cluster up in %s", workdir)
    return cluster


def _check_alive(cluster: Cluster) -> bool:
    for name, proc in cluster.procs:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}:{cluster.logs()}")
    return True


def _node_state(cluster: Cluster) -> str:
    return cluster.run("sinfo", "--noheader", "--Node", "--format=%t", check=False).strip()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster shared by the session; skips when Slurm can't be had."""
    reason = ensure_installed()
    if reason:
        log.warning("skipping the Slurm tests: %s", reason)
        pytest.skip(reason)
    cluster = start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
