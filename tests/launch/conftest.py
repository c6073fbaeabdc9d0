"""A real two-node Slurm cluster on this machine, for testing launch/slurm.sbatch.

Debian's slurmctld/slurmd/slurm-client/munge (installed here if missing and we are root with apt;
CI's .ci/run installs them too): one munged (as the munge user, on its own socket and key), one
slurmctld and two slurmd instances (node1, node2 on 127.0.0.1, each on its own port), all in the
foreground as child processes of the test session, with every state/spool/log file in a temp folder.
Teardown cancels leftover jobs and stops the daemons by their PIDs.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("node1", "node2")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ensure_packages() -> str | None:
    """None when Slurm and munge are available (installed here if missing, by the script .ci/run
    uses too), else why they are not."""
    if os.geteuid() != 0:  # munged runs as the munge user, the daemons and jobs as root
        return "a throwaway Slurm cluster needs root (to install Slurm/munge and start their daemons)"
    try:
        res = subprocess.run(["bash", str(Path(__file__).with_name("install_slurm.sh"))], capture_output=True,
                             text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "installing Slurm/munge with apt-get timed out"
    if res.returncode != 0:
        return f"could not install Slurm/munge: {(res.stderr or res.stdout)[-500:]}"
    return None


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def cmd(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-2000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:  # jobs still running (a failed test): cancel them so no slurmstepd outlives the cluster
                self.cmd("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name, timeout=10)
                deadline = time.time() + 15
                while time.time() < deadline and self.cmd("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in [*NODES, "slurmctld", "munged"]:  # clients first, munge last
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def _write_conf(root: Path, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> Path:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=1 "
                      f"RealMemory=500 State=UNKNOWN" for n, p in zip(NODES, node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# a throwaway one-machine, two-node cluster for tests/launch
ClusterName=frugaltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
{nodes}
PartitionName=debug Nodes=node[1-2] Default=YES State=UP MaxTime=INFINITE
""")
    return conf


def _start(cluster: SlurmCluster) -> None:
    root = cluster.root
    for d in ("state", "spool", "run", "log", "munge"):
        (root / d).mkdir()
    for n in NODES:
        (root / "spool" / n).mkdir()
    # munged refuses a key or socket folder others can write or read; it runs as the munge user
    munge = pwd.getpwnam("munge")
    mdir = root / "munge"
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    os.chmod(mdir, 0o755)
    os.chmod(key, 0o600)
    ports = _free_ports(3)
    conf = cluster.conf = _write_conf(root, mdir / "munge.socket", ports[0], ports[1:])
    logs = root / "log"

    def spawn(name: str, cmd: list[str], **kw) -> None:
        out = open(logs / f"{name}.out", "w")
        cluster.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env(),
                                               start_new_session=True, **kw)
        out.close()

    spawn("munged", ["/usr/sbin/munged", "--foreground", f"--socket={mdir / 'munge.socket'}",
                     f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                     f"--seed-file={mdir / 'munged.seed'}"], user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
    deadline = time.time() + 20
    while not (mdir / "munge.socket").exists():
        if cluster.procs["munged"].poll() is not None or time.time() > deadline:
            mlog = mdir / "munged.log"
            raise RuntimeError("munged did not start:\n" + (logs / "munged.out").read_text()
                               + (mlog.read_text() if mlog.exists() else ""))
        time.sleep(0.05)
    spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(conf)])
    for n in NODES:
        spawn(n, ["/usr/sbin/slurmd", "-D", "-N", n, "-f", str(conf)])

    # ready when both nodes are idle
    deadline = time.time() + 60
    states = ""
    while time.time() < deadline:
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}\n{cluster.logs()}")
        try:
            res = cluster.cmd("sinfo", "-h", "-N", "-o", "%N %T", timeout=10)
            states = res.stdout.strip()
            if res.returncode == 0 and sorted(states.splitlines()) == [f"{n} idle" for n in NODES]:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the Slurm nodes did not become idle within 60 s (sinfo: {states!r})\n{cluster.logs()}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node Slurm cluster (node1, node2, partition debug); skips where Slurm cannot be
    installed."""
    why = _ensure_packages()
    if why and os.environ.get("FRUGAL_REQUIRE_SLURM"):  # CI: these tests must run, never skip
        pytest.fail(why)
    if why:
        pytest.skip(why)
    # not under pytest's tmp_path: its 0700 folders would keep the munge user out
    root = Path(tempfile.mkdtemp(prefix="frugal-slurm-"))
    os.chmod(root, 0o755)
    cluster = SlurmCluster(root, root / "slurm.conf")
    try:
        _start(cluster)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
