"""A cluster on one machine: the server on a bridge in this namespace, each worker a host of its own (a network
namespace joined to the bridge by a veth pair), with its own data dir and model cache. Only loopback and the
addresses of these namespaces are ever contacted. Needs root (network namespaces)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.e2e.system import REPO, RunningSystem


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One worker host: its namespace, the bridge end of its link, its address, its `manage.py worker`."""

    name: str
    netns: str
    link: str  # the veth end on the bridge: down cuts the host off
    address: str
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen | None = None
    known_pids: set[int] = field(default_factory=set)

    def processes(self) -> set[int]:
        """The worker and every process under it (backends and RPC servers run in their own sessions)."""
        if self.popen is None:
            return set()
        try:
            root = psutil.Process(self.popen.pid)
            pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        self.known_pids |= pids
        return pids

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Network:
    """A bridge with a /24 of 10.213.0.0/16 and one namespace per host; `destroy` takes all of it away."""

    def __init__(self):
        if os.geteuid() != 0:
            raise AssertionError("the cluster tests make network namespaces: they need root")
        sweep_abandoned()
        self.tag = secrets.token_hex(2)
        self.prefix = f"10.213.{1 + secrets.randbelow(250)}"
        self.bridge = f"aimbr{self.tag}"
        self.server_address = f"{self.prefix}.1"
        self.hosts: list[Host] = []
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.tag).write_text(str(os.getpid()))
        ip("link", "add", "name", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.server_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str, tmp: Path) -> Host:
        n = len(self.hosts) + 1
        netns, outside, inside = f"aimns{self.tag}{n}", f"aimvh{self.tag}{n}", f"aimvn{self.tag}{n}"
        ip("netns", "add", netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", netns)
        ip("link", "set", outside, "master", self.bridge, "up")
        address = f"{self.prefix}.{10 + n}"
        ip("-n", netns, "addr", "add", f"{address}/24", "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", self.server_address)
        data_dir = tmp / f"host-{name}"
        data_dir.mkdir(parents=True, exist_ok=True)
        host = Host(name, netns, outside, address, data_dir, tmp / f"worker-{name}.log")
        self.hosts.append(host)
        return host

    def cut(self, host: Host) -> None:
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def destroy(self) -> None:
        remove_network(self.tag)


OWNERS = Path("/tmp/aimind-test-networks")  # <tag>: the pid of the process that made the network


def remove_network(tag: str) -> None:
    for netns in ip("netns", "list", check=False).stdout.split():
        if netns.startswith(f"aimns{tag}"):
            ip("netns", "del", netns, check=False)  # its veth pair goes with it
    ip("link", "del", f"aimbr{tag}", check=False)
    (OWNERS / tag).unlink(missing_ok=True)


def sweep_abandoned() -> None:
    """Networks of test runs that were killed before they could clean up: their maker is gone."""
    for owner in OWNERS.glob("*") if OWNERS.is_dir() else []:
        try:
            alive = psutil.pid_exists(int(owner.read_text()))
        except ValueError:
            alive = False
        if not alive:
            remove_network(owner.name)


def start_worker(system: RunningSystem, host: Host, cache: Path, *args: str, token: str = "",
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`manage.py worker` inside the host's namespace, knowing only the server's URL and the cluster token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMIND_", "DATABASE_URL", "REDIS_URL"))}
    port_base = 21000 + int(host.address.rsplit(".", 1)[1]) * 40  # each host has its own ports anyway
    env.update({
        "AIMIND_SERVER_URL": system.base_url,
        "AIMIND_TOKEN": token or (system.data_dir / "token").read_text().strip(),
        "AIMIND_WORKER_NAME": host.name, "AIMIND_WORKER_IP": host.address, "AIMIND_DATA_DIR": str(host.data_dir),
        "AIMIND_CACHE_DIR": str(cache), "AIMIND_HEARTBEAT_INTERVAL": "1", "AIMIND_HEALTH_CHECK_INTERVAL": "0.2",
        "AIMIND_BACKEND_PORT_MIN": str(port_base), "AIMIND_BACKEND_PORT_MAX": str(port_base + 39),
        **(extra_env or {}),
    })
    log = open(host.log_path, "ab")
    host.popen = subprocess.Popen(["ip", "netns", "exec", host.netns, sys.executable, str(REPO / "manage.py"),
                                   "worker", *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return host.popen


def stop_worker(host: Host, timeout: float = 40) -> int | None:
    """SIGTERM to the worker (it ends what it runs); SIGKILL to its whole tree if it does not go."""
    if host.popen is None:
        return None
    host.processes()
    if host.popen.poll() is None:
        host.popen.send_signal(signal.SIGTERM)
    try:
        return host.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        for pid in host.known_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return host.popen.wait(10)


def processes_of_model(model_path: Path, prefix: str) -> list[str]:
    """Anything still running for the model on any host: its llama-server (by the model's path) or an RPC server
    listening on one of the cluster's addresses."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not cmd:
            continue
        text = " ".join(cmd)
        rpc = any(Path(part).name in ("ggml-rpc-server", "rpc-server") for part in cmd[:1]) and f" {prefix}." in text
        if rpc or (str(model_path) in text and "manage.py" not in text and "pytest" not in text):
            found.append(f"{proc.info['pid']} {text}")
    return found
