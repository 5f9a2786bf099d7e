"""The `cake-swarm` command as a user runs it (a subprocess): one-line errors with exit code 2 and no
traceback, --api-key on the client commands, help text with defaults, --version, inclusive layer ranges."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version

import pytest

from swarm.cli import build_parser
from tests.swarm_harness import REPO, Daemon, free_port, wait_for

CLIENT_COMMANDS = ["status", "chat", "topology"]
KEY = "let me in"


def cake_swarm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "CAKE_SWARM_API_KEY"}
    return subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**environ, **(env or {})}, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cake-swarm: error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_no_node_at_the_address_is_one_line(command):
    port = free_port()  # nothing listens there
    args = [command, "hello"] if command == "chat" else [command]
    line = one_line_error(cake_swarm(*args, "--node", f"127.0.0.1:{port}"))
    assert f"no cake-swarm node answers at http://127.0.0.1:{port}" in line and "--node" in line


def test_convert_of_a_missing_folder_says_so(tmp_path):
    line = one_line_error(cake_swarm("convert", "llama2c", str(tmp_path / "missing"), str(tmp_path / "out")))
    assert line == f"cake-swarm: error: {tmp_path / 'missing'}: no such folder"
    assert not (tmp_path / "out").exists()


def test_version():
    out = cake_swarm("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"cake-swarm {version('cake-swarm')}"


def _options(command: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return [a for a in sub._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["generate", "convert", "status", "chat", "topology", "split"])
def test_every_option_has_help_and_its_default(command):
    text = " ".join(cake_swarm(command, "--help").stdout.split())
    for action in _options(command):
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        default = action.default
        if default is not None and not isinstance(default, bool) and default != []:
            assert re.search(rf"{re.escape(action.option_strings[-1])}\b.*?\(default: {re.escape(str(default))}\)",
                             text), f"{command} {action.option_strings[-1]}: default {default!r} not shown"


@pytest.fixture(scope="module")
def keyed_node(tmp_path_factory):
    """A one-node swarm on the demo model that wants an API key."""
    tmp = tmp_path_factory.mktemp("cli-node")
    daemon = Daemon("solo", "127.0.0.1", free_port(), ["--model", "demo", "--no-mdns", "--max-context", "256",
                                                       "--speed", "1", "--api-key", KEY, "--cache-dir", str(tmp / "c")],
                    tmp, {"XDG_CACHE_HOME": str(tmp / "xdg")})
    try:
        node = f"127.0.0.1:{daemon.port}"
        wait_for(lambda: ": ready," in cake_swarm("status", "--node", node, "--api-key", KEY).stdout, 90, "the node",
                 [daemon])
        yield node
    finally:
        daemon.stop()


def test_status_with_and_without_the_api_key(keyed_node):
    line = one_line_error(cake_swarm("status", "--node", keyed_node))
    assert "/api/swarm: 401: " in line and "--api-key KEY or $CAKE_SWARM_API_KEY" in line
    for out in (cake_swarm("status", "--node", keyed_node, "--api-key", KEY),
                cake_swarm("status", "--node", keyed_node, env={"CAKE_SWARM_API_KEY": KEY})):
        assert out.returncode == 0, out.stderr
        solo = next(line for line in out.stdout.splitlines() if line.strip().startswith("solo"))
        assert " layers 0-4 " in solo  # inclusive, as the dashboard and topology files write them
    line = one_line_error(cake_swarm("status", "--node", keyed_node, "--api-key", "wrong"))
    assert "401" in line


def test_chat_with_and_without_the_api_key(keyed_node):
    line = one_line_error(cake_swarm("chat", "Once upon a time", "--node", keyed_node, "--max-tokens", "8"))
    assert "/ws/chat: 401" in line and "--api-key" in line
    out = cake_swarm("chat", "Once upon a time", "--node", keyed_node, "--max-tokens", "8",
                     env={"CAKE_SWARM_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "[8 tokens" in out.stderr


def test_topology_refused_without_the_key(keyed_node):
    line = one_line_error(cake_swarm("topology", "--node", keyed_node, "--cake"))
    assert "/api/topology?format=cake: 401" in line
    out = cake_swarm("topology", "--node", keyed_node, "--cake", "--api-key", KEY)
    assert out.returncode == 0 and out.stdout.strip() == "{}"  # the model's node runs it all: no worker to name


def test_the_demo_stops_at_the_end_of_its_story(stories260k, tmp_path):
    out = cake_swarm("generate", "--model", "demo", "--prompt", "Once upon a time", "--raw", "--max-tokens", "1000",
                     "--output", "ids", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    ids = [int(t) for t in out.stdout.split(",")]
    assert ids[-1] == 1 and 1 not in ids[:-1] and len(ids) < 400  # run.c stops at BOS too
    assert "finish: stop" in out.stderr


@pytest.mark.parametrize("flag, value, param", [("--temperature", "nan", "temperature"), ("--top-p", "1.5", "top_p"),
                                                ("--seed", str(2**70), "seed"), ("--max-tokens", "0", "max_tokens"),
                                                ("--temperature", "inf", "temperature")])
def test_generate_refuses_a_sampling_value_out_of_range_in_one_line(tiny_llama, flag, value, param):
    line = one_line_error(cake_swarm("generate", "--model", str(tiny_llama.folder), "--prompt-ids", "1,2,3", flag, value))
    assert line.startswith(f"cake-swarm: error: {param}: "), line
