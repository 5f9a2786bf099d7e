"""mDNS discovery (swarm/discovery.py): in one process and across processes on 127.0.0.1, and across
network namespaces on a bridge with real multicast. Cluster ids are random per test, so other swarms
running on this machine's loopback are ignored like any foreign cluster."""
import asyncio
import json
import queue
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from netns import netns_hosts
from swarm.discovery import Discovery, PeerAd, parse_ad

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 30  # bound on waiting for an event, only so that a broken test fails instead of hanging

# One node in a child process: JSON lines out (events), JSON lines in (commands).
CHILD = r"""
import asyncio, dataclasses, json, sys
from swarm.discovery import Discovery

def out(*event):
    print(json.dumps(event), flush=True)

async def main(info, host, port):
    d = Discovery(info, host, port, lambda ad: out("added", dataclasses.asdict(ad)),
                  lambda node_id: out("removed", node_id))
    await d.start()
    out("ready")
    seen = set()
    async def report_ignored():
        while True:
            for node_id in d.ignored - seen:
                seen.add(node_id)
                out("ignored", node_id)
            await asyncio.sleep(0.1)
    task = asyncio.ensure_future(report_ignored())
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd = json.loads(line)
        if cmd[0] == "update":
            await d.update(**cmd[1])
        elif cmd[0] == "stop":
            break
    task.cancel()
    await d.stop()
    out("stopped")

asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


def node_info(i, cluster):
    return {"id": f"node{i}{secrets.token_hex(3)}", "name": f"box{i}", "backend": "cpu",
            "budget": 1_000_000 * (i + 1), "speed": 0.5 + i, "cluster": cluster, "version": "0.1.0",
            "model": "abc123" if i == 0 else "", "shard_port": 10200 + i}


class Child:
    """A discovery node in a subprocess, with its events read on a thread."""

    def __init__(self, popen):
        self.p, self.events, self._q = popen, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self._q.put(json.loads(line))

    def send(self, *cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def expect(self, kind, pred=lambda *args: True):
        for e in self.events:
            if e[0] == kind and pred(*e[1:]):
                return e[1] if len(e) > 1 else None
        while True:
            try:
                e = self._q.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event; saw {self.events}") from None
            self.events.append(e)
            if e[0] == kind and pred(*e[1:]):
                return e[1] if len(e) > 1 else None


def child_args(info, host, port):
    return [sys.executable, "-c", CHILD, json.dumps(info), host, str(port)]


def run_scenario(a, b, c, ia, ib, ic, addr_b):
    """a and b share a cluster, c does not: a and b find each other, both ignore c, b's update reaches a,
    b's goodbye reaches a."""
    for ch in (a, b, c):
        ch.expect("ready")
    ad_b = a.expect("added", lambda ad: ad["node_id"] == ib["id"])
    assert (ad_b["name"], ad_b["backend"], ad_b["budget"], ad_b["speed"]) == ("box1", "cpu", 2_000_000, 1.5)
    assert (ad_b["cluster"], ad_b["version"], ad_b["model"]) == (ia["cluster"], "0.1.0", "")
    assert ad_b["addr"] == addr_b and ad_b["addresses"] == [addr_b] and ad_b["port"] == 10001
    assert ad_b["props"]["shard_port"] == "10201"
    assert b.expect("added", lambda ad: ad["node_id"] == ia["id"])["model"] == "abc123"
    assert a.expect("ignored", lambda n: n == ic["id"]) == ic["id"]
    assert c.expect("ignored", lambda n: n == ia["id"]) == ia["id"]

    b.send("update", {"budget": 5})
    assert a.expect("added", lambda ad: ad["node_id"] == ib["id"] and ad["budget"] == 5)["port"] == 10001

    b.send("stop")
    b.expect("stopped")
    assert a.expect("removed", lambda n: n == ib["id"]) == ib["id"]
    assert not [e for e in a.events + b.events if e[0] == "added" and e[1]["node_id"] == ic["id"]]
    assert not [e for e in c.events if e[0] == "added"]


def test_three_processes_on_loopback():
    cluster = secrets.token_hex(8)
    infos = [node_info(0, cluster), node_info(1, cluster), node_info(2, "another" + cluster)]
    procs = []
    try:
        for i, info in enumerate(infos):
            procs.append(subprocess.Popen(child_args(info, "127.0.0.1", 10000 + i), cwd=REPO, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        a, b, c = (Child(p) for p in procs)
        run_scenario(a, b, c, *infos, addr_b="127.0.0.1")
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()


@pytest.mark.netns
def test_three_namespaces_on_a_bridge():
    with netns_hosts(3) as hosts:
        cluster = secrets.token_hex(8)
        infos = [node_info(0, cluster), node_info(1, cluster), node_info(2, "another" + cluster)]
        a, b, c = (Child(h.popen(child_args(info, h.addr, 10000 + i), cwd=REPO, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE))
                   for i, (h, info) in enumerate(zip(hosts, infos)))
        run_scenario(a, b, c, *infos, addr_b=hosts[1].addr)


async def _until(cond):
    for _ in range(WAIT_S * 20):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


async def test_two_nodes_in_one_process_with_async_callbacks():
    cluster = secrets.token_hex(8)
    seen: dict[str, list] = {"a": [], "b": []}

    def make(key, info):
        async def added(ad):
            seen[key].append(("added", ad))

        def removed(node_id):
            seen[key].append(("removed", node_id))

        return Discovery(info, "127.0.0.1", 10100, added, removed)

    ia, ib = node_info(0, cluster), node_info(1, cluster)
    a, b = make("a", ia), make("b", ib)
    await a.start()
    await b.start()
    try:
        await _until(lambda: ib["id"] in a.peers and ia["id"] in b.peers)
        assert isinstance(a.peers[ib["id"]], PeerAd) and a.peers[ib["id"]].budget == 2_000_000
        assert ia["id"] not in a.peers  # never itself
        await b.stop()
        await _until(lambda: ("removed", ib["id"]) in seen["a"])
        assert ib["id"] not in a.peers
    finally:
        await a.stop()
        await b.stop()


def test_parse_ad():
    props = {"id": "n1", "port": "10128", "addr": "10.0.0.9", "budget": "123", "speed": "2.5", "cluster": "k"}
    ad = parse_ad(props, ["10.0.0.9"])
    assert (ad.node_id, ad.name, ad.addr, ad.port) == ("n1", "n1", "10.0.0.9", 10128)
    assert (ad.budget, ad.speed, ad.cluster, ad.backend, ad.model) == (123, 2.5, "k", "cpu", "")
    # the TXT address is not one the peer answers on: use its A record
    assert parse_ad({**props, "addr": "0.0.0.0"}, ["192.168.1.4", "10.0.0.1"]).addr == "192.168.1.4"
    no_id = {k: v for k, v in props.items() if k != "id"}
    for bad in ({**props, "port": "x"}, {**props, "port": "0"}, no_id):
        with pytest.raises(ValueError):
            parse_ad(bad)


def test_constructor_refuses_bad_ids_and_hosts():
    assert Discovery({"id": "x" * 58}, "127.0.0.1", 1, print, print).service_name.startswith("x" * 58 + ".")
    with pytest.raises(ValueError):
        Discovery({"id": "a.b"}, "127.0.0.1", 1, print, print)
    with pytest.raises(ValueError):
        Discovery({"id": "x" * 59}, "127.0.0.1", 1, print, print)
    with pytest.raises(ValueError):
        Discovery({"id": "a"}, "localhost", 1, print, print)
