"""A real two-node Slurm cluster on this one machine, for end-to-end tests: no mocks, no containers.

What a grid on a cluster relies on (sbatch arrays, a task landing on either node, `scontrol requeue`,
`SLURM_RESTART_COUNT`, `squeue`/`scontrol show job` states) is Slurm's own behaviour, so the tests drive
Debian's slurm-wlm 22.05 and munge: a munged, a slurmctld and two slurmd (`-N n1`, `-N n2`, on 127.0.0.2
and 127.0.0.3) run in the foreground as children of the test process. Their configuration, state, spool
folders, logs, pid files, munge key and socket all live in one folder; nothing is written to /etc or
/var, and free ports are probed, so a system Slurm or munge, a stale cluster or a second test run does not
clash with this one. Clients find the cluster through `SlurmCluster.env` (SLURM_CONF); slurm.conf's
`AuthInfo=socket=...` points both the daemons and the clients at our own munged.

Needs root (slurmd runs jobs as their submitter; munged runs with --force) and the packages from
`missing()`. At exit every job is cancelled, every daemon is stopped by its pid (SIGTERM, then SIGKILL),
and any slurmstepd or job process left over (found by our SLURM_CONF in its environment) is killed.

Timing: a requeued job waits PENDING with Reason=BeginTime until EligibleTime = requeue + cred_expire + 1 s
(Slurm's default cred_expire is 120 s; AuthInfo sets CRED_EXPIRE here), and then only a periodic scheduler
pass starts it (sched_interval, 60 s by default: SCHED_INTERVAL here), so it runs again about 11-13 s after
`scontrol requeue`. With ReturnToService=2 a node set DOWN comes back at once; DRAIN keeps work off a node.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

NODES = ["n1", "n2"]
PARTITION = "debug"
KILL_WAIT = 5
MIN_JOB_AGE = 600
CRED_EXPIRE = 10  # seconds; Slurm holds a requeued job this long (+1) before it may start again (default 120)
SCHED_INTERVAL = 2  # seconds between the main scheduler's periodic passes (default 60)
PROGRAMS = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"]


def missing() -> str | None:
    """Why this machine cannot run the cluster (for pytest.mark.skipif), or None when it can."""
    absent = [name for name in PROGRAMS if not shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin")]
    if absent:
        return f"no {', '.join(absent)}: apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a Slurm cluster of our own needs root (slurmd, munged)"
    return None


@dataclass
class SlurmCluster:
    """A running cluster: `env` holds the variables a client command needs on top of os.environ."""

    folder: Path
    conf: Path
    env: dict[str, str]
    nodes: list[str] = field(default_factory=lambda: list(NODES))
    partition: str = PARTITION

    def client_env(self) -> dict[str, str]:
        """os.environ without variables of an enclosing Slurm job, plus `env`."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))}
        return {**inherited, **self.env}

    def run(self, *command: str, timeout: float = 60, check: bool = True) -> str:
        """Run a client command (sbatch, squeue, ...) against this cluster; its stdout."""
        result = subprocess.run(command, env=self.client_env(), capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def node_states(self) -> dict[str, str]:
        """Each node's state as sinfo prints it (idle, mixed, alloc, down*, ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=15)
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` of one job (or array task, "123_4") as a dict of its Key=Value fields."""
        out = self.run("scontrol", "show", "job", "-o", job_id, timeout=15)
        fields = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def logs(self, chars: int = 3000) -> str:
        """The tail of every daemon's log, for failure messages."""
        parts = []
        for log in sorted((self.folder / "log").glob("*")):
            parts.append(f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on now (on any address)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def real_memory_mb() -> int:
    """RealMemory that `slurmd -C` reports for this machine, in MB."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return int(out.split("RealMemory=")[1].split()[0])


def write_conf(folder: Path, cpus_per_node: int) -> Path:
    """slurm.conf for the two nodes, with every path under `folder` and freshly probed ports."""
    ctld_port, *node_ports = free_ports(1 + len(NODES))
    host = socket.gethostname().split(".")[0]
    memory = max(1, real_memory_mb() // len(NODES))
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.{i + 2} Port={port} CPUs={cpus_per_node} "
        f"RealMemory={memory} State=UNKNOWN"
        for i, (name, port) in enumerate(zip(NODES, node_ports))
    )
    conf = folder / "slurm.conf"
    (folder / "plugstack.conf").write_text("")  # so that /etc/slurm/plugstack.conf is not read
    conf.write_text(f"""\
ClusterName=vaelab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / 'munge' / 'sock'},cred_expire={CRED_EXPIRE}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
PlugStackConfig={folder / 'plugstack.conf'}
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval={SCHED_INTERVAL}
KillWait={KILL_WAIT}
MinJobAge={MIN_JOB_AGE}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}/%n
SlurmctldPidFile={folder / 'run' / 'slurmctld.pid'}
SlurmdPidFile={folder / 'run'}/slurmd.%n.pid
SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={folder / 'log'}/slurmd.%n.log
{nodes}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _daemon(command: list[str], env: dict[str, str], output: Path) -> subprocess.Popen:
    with open(output, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def leftover_processes(conf: Path) -> list[int]:
    """Live processes (slurmstepd, job scripts and their children) whose environment names `conf`, or whose
    ancestor's does; never this process or its ancestors."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        pid = parents.get(pid, 1)
    marker = b"\0SLURM_CONF=" + str(conf).encode() + b"\0"
    ours = {pid for pid in parents if pid not in mine and marker in b"\0" + _environ(pid) + b"\0"}
    while grown := {pid for pid, parent in parents.items() if parent in ours and pid not in ours}:
        ours |= grown
    return sorted(ours - mine)


def _stop(daemons: list[subprocess.Popen], timeout: float = 20) -> None:
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        try:
            daemon.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


def _teardown(cluster: SlurmCluster, daemons: dict[str, subprocess.Popen]) -> None:
    """Cancel every job, wait for them to end, stop the daemons, kill whatever of ours is left."""
    if daemons.get("slurmctld") and daemons["slurmctld"].poll() is None:
        try:
            cluster.run("scancel", "--partition", cluster.partition, timeout=15, check=False)
            deadline = time.monotonic() + KILL_WAIT + 15
            while cluster.run("squeue", "-h", "-o", "%i", timeout=15, check=False).strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        except (subprocess.TimeoutExpired, OSError):
            pass
    # slurmd before slurmctld before munged: each needs the next one to shut down cleanly
    _stop([d for name, d in daemons.items() if name.startswith("slurmd")])
    _stop([d for name, d in daemons.items() if name == "slurmctld"])
    _stop([d for name, d in daemons.items() if name == "munged"])
    for pid in leftover_processes(cluster.conf):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (left := leftover_processes(cluster.conf)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the Slurm cluster in {cluster.folder} survived SIGKILL: {left}"


@contextmanager
def slurm_cluster(folder: Path, cpus_per_node: int = 1, timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd n1 and n2 with everything under `folder`; yield once sinfo shows both
    nodes idle (AssertionError with the logs' tails after `timeout` s); stop all of it afterwards, also when
    the block raised."""
    assert cpus_per_node >= 1, cpus_per_node
    folder = Path(folder).resolve()
    for sub in ["munge", "state", "spool", "run", "log"]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    socket_path = folder / "munge" / "sock"
    assert len(str(socket_path)) < 100, f"the munge socket path {socket_path} is too long for a unix socket"
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))  # our own key: no copy of /etc/munge/munge.key needed
    key.chmod(0o400)
    conf = write_conf(folder, cpus_per_node)
    env = {"SLURM_CONF": str(conf)}
    cluster = SlurmCluster(folder=folder, conf=conf, env=env)
    daemon_env = cluster.client_env()
    log = folder / "log"
    daemons: dict[str, subprocess.Popen] = {}
    try:
        daemons["munged"] = _daemon(
            ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={folder / 'run' / 'munged.pid'}", f"--seed-file={folder / 'munge' / 'seed'}",
             f"--log-file={log / 'munged.log'}"], daemon_env, log / "munged.out")
        deadline = time.monotonic() + timeout
        while not socket_path.exists():
            assert daemons["munged"].poll() is None and time.monotonic() < deadline, \
                f"munged did not start:\n{cluster.logs()}"
            time.sleep(0.1)
        daemons["slurmctld"] = _daemon(["slurmctld", "-D", "-f", str(conf)], daemon_env, log / "slurmctld.out")
        for node in NODES:
            daemons[f"slurmd.{node}"] = _daemon(["slurmd", "-D", "-N", node, "-f", str(conf)], daemon_env,
                                                log / f"slurmd.{node}.out")
        states: dict[str, str] = {}
        while states != {node: "idle" for node in NODES}:
            dead = [name for name, d in daemons.items() if d.poll() is not None]
            assert not dead and time.monotonic() < deadline, (f"the Slurm cluster did not come up in {timeout} s "
                                                              f"(exited: {dead}; sinfo: {states}):\n{cluster.logs()}")
            time.sleep(0.5)
            try:
                states = cluster.node_states()
            except (AssertionError, subprocess.TimeoutExpired):
                states = {}
        yield cluster
    finally:
        _teardown(cluster, daemons)
