"""A real single-node SLURM cluster (munged, slurmctld, slurmd) in a temporary folder, for tests.

Debian's slurm 22.05 needs munge authentication, so the cluster starts its own munged
(own key and socket), then slurmctld and slurmd in the foreground with a slurm.conf whose
state, spool, log and pid paths all live in the folder. Ports are free ones, so two
clusters (or a leftover system one) never collide. ``stop`` cancels every job, signals the
job processes slurmd reports for them, then stops the three daemons by the PIDs started
here: nothing else is ever killed.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ports import free_ports

__all__ = ["SlurmCluster", "SlurmError", "missing_binaries", "BINARIES"]

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _node_name() -> str:
    """This machine's short hostname: the node's name, which the ranks resolve to rendezvous."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        raise SlurmError(f"this machine's hostname {host!r} does not resolve; add it to /etc/hosts (the ranks rendezvous at the node's name)") from None
    return host


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _slurm_conf(root: Path, cpus: int, node: str) -> str:
    user = getpass.getuser()
    ctld_port, slurmd_port = free_ports(2)
    return f"""\
ClusterName=caldtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s); sched_interval: how often pending jobs are tried
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
KillWait=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """``start()`` brings up munged, slurmctld and slurmd under ``root``; ``stop()`` takes them down."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.node = ""
        self._daemons: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}  # each daemon's stdout/stderr file

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.node = _node_name()
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o755)  # munged refuses a socket folder others can write to; clients must reach it
        key = munge / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self.conf.write_text(_slurm_conf(self.root, self.cpus, self.node))
        try:
            self._spawn("munged", [
                _binary("munged"), "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed", f"--log-file={self.root}/log/munged.log",
            ])
            self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged did not create its socket")
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self._scontrol_ok("ping"), timeout, "slurmctld does not answer scontrol ping")
            self._spawn("slurmd", [_binary("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_for(lambda: self.node_state().startswith("IDLE"), timeout, "node never became IDLE")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, end their leftover processes, then stop the daemons started here."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self._client(["scancel", "--full", "--user", getpass.getuser()], check=False)
            self._wait_for(lambda: not self._job_pids(), 40.0, None)
            for pid in self._job_pids():  # slurmd's step daemons re-parent to init: end them by their reported PIDs
                _signal(pid, signal.SIGKILL)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        """The environment a client (and a job submitted with it) needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def sbatch(self, script: str | Path, *options: str, args: tuple[str, ...] | list[str] = (), env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit ``script`` with sbatch ``options``; ``args`` go to the script itself. Returns the job id."""
        out = self._client(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self._client(["scontrol", "show", "job", "--oneliner", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until: set[str] = FINISHED) -> dict[str, str]:
        """Poll until the job is in one of ``until`` (``sbatch --wait`` returns slowly)."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.time() > deadline:
                raise SlurmError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(1.0)

    def signal_batch(self, job_id: int, sig: str) -> None:
        """Send ``sig`` to the batch shell only, as SLURM's ``--signal=B:SIG@time`` warning does."""
        self._client(["scancel", "--batch", f"--signal={sig}", str(job_id)])

    def cancel(self, job_id: int) -> None:
        """A plain ``scancel``: SIGTERM to every process of the job, which SLURM then cancels."""
        self._client(["scancel", str(job_id)])

    def signal_job(self, job_id: int, sig: str) -> None:
        """Send ``sig`` to every process of the job, the batch shell and srun included, as a time
        limit or a preemption with a grace time does."""
        self._client(["scancel", "--full", f"--signal={sig}", str(job_id)])

    def node_state(self) -> str:
        out = self._client(["scontrol", "show", "node", "--oneliner", self.node], check=False).stdout
        match = re.search(r"State=(\S+)", out)
        return match.group(1) if match else ""

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.root / "log" / f"{name}.log"
            if path.is_file():
                parts.append(f"--- {name}.log\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # -- internals ------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        self._logs[name] = open(self.root / "log" / f"{name}.stdout", "ab")
        # Own session: a Ctrl-C at the test's terminal reaches pytest only, which then stops us in order.
        self._daemons[name] = subprocess.Popen(
            cmd, stdout=self._logs[name], stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )

    def _client(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _scontrol_ok(self, *args: str) -> bool:
        return self._client(["scontrol", *args], check=False).returncode == 0

    def _job_pids(self) -> list[int]:
        """PIDs of job processes (step daemons included) that slurmd still tracks on the node."""
        if self._daemons.get("slurmd") is None or self._daemons["slurmd"].poll() is not None:
            return []
        out = self._client(["scontrol", "listpids"], check=False).stdout
        return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]

    def _wait_for(self, ready, timeout: float, message: str | None) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None and message is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} during start-up\n{self.log_tail()}")
            if ready():
                return True
            time.sleep(0.5)
        if message is not None:
            raise SlurmError(f"{message} within {timeout:.0f} s\n{self.log_tail()}")
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
