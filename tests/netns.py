"""Network namespaces for multi-host tests: n hosts on one bridge, real addresses, real multicast.

    with netns_hosts(3) as hosts:            # or, in a test module: hosts3 = netns_fixture(3)
        p = hosts[0].popen([sys.executable, "-m", "swarm.cli", "up", "--host", hosts[0].addr])

The bridge lives in a namespace of its own (the "hub"), so nothing is added to the machine's own network
and no traffic leaves these namespaces. Each host is a namespace with lo up and one veth `eth0` on the
bridge, addressed 10.X.Y.(i+1)/24 (X, Y random), with a multicast route on eth0. Teardown kills every
process inside the namespaces and deletes them, also when the test fails. Needs root and iproute2; the
only reasons to skip are their absence.
"""
from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

PREFIX = "cakens"


def _ip(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Host:
    name: str            # h0, h1, ...
    ns: str              # namespace name
    addr: str            # IPv4 address of eth0
    hub: str = ""        # namespace holding the bridge
    hub_port: str = ""   # this host's veth end on the bridge
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        """Start a process inside this host's namespace; it is killed at teardown."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kw)
        self.procs.append(p)
        return p

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside this host's namespace to completion."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], **kw)

    def set_link(self, up: bool) -> None:
        """Plug or unplug this host's cable: its interface stays configured, the bridge port goes down."""
        _ip("link", "set", self.hub_port, "up" if up else "down", ns=self.hub)

    def stop_processes(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the ip command)"
    return None


def _delete_namespace(ns: str) -> None:
    # processes nobody tracked (children of tracked ones) live only in our namespace: kill them by pid
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _sweep_stale(prefix: str) -> None:
    """Delete namespaces left by a test run that was itself killed (its pid is in the name)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(rf"({re.escape(prefix)}-(\d+)-\S+)", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            _delete_namespace(m.group(1))


@contextmanager
def netns_hosts(n: int, prefix: str = PREFIX):
    """n hosts on one bridge; yields a list of Host. Skips the test without root or iproute2."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    _sweep_stale(prefix)
    tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    x, y = random.randint(1, 254), random.randint(0, 255)
    hub = f"{tag}-hub"
    made: list[str] = []
    hosts: list[Host] = []
    try:
        _ip("netns", "add", hub)
        made.append(hub)
        _ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", ns=hub)
        _ip("link", "set", "br0", "up", ns=hub)
        for i in range(n):
            ns, port, addr = f"{tag}-h{i}", f"v{i}", f"10.{x}.{y}.{i + 1}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns, ns=hub)
            _ip("link", "set", port, "master", "br0", "up", ns=hub)
            _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=ns)
            hosts.append(Host(f"h{i}", ns, addr, hub, port))
        yield hosts
    finally:
        for h in hosts:
            h.stop_processes()
        for ns in reversed(made):
            _delete_namespace(ns)


def netns_fixture(n: int):
    """A pytest fixture giving n hosts: `hosts3 = netns_fixture(3)` at module level."""
    @pytest.fixture
    def hosts():
        with netns_hosts(n) as hs:
            yield hs
    return hosts
