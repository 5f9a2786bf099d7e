"""The `cake-swarm` command: argument parsing and one call per subcommand.

Errors a user can act on (no node at the address, a refused API key, a bad file) are one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

API_KEY_ENV = "CAKE_SWARM_API_KEY"


class CliError(Exception):
    """A failure to report in one line (exit code 2)."""


def _cmd_generate(args) -> int:
    from swarm.model.decoder import load_stage
    from swarm.model.generate import Completion, generate_text
    from swarm.model.sampling import SamplingParams
    from swarm.model.source import resolve_model
    from swarm.model.tokenizer import Tokenizer

    folder = resolve_model(args.model)
    tokenizer = Tokenizer.load(folder) if (folder / "tokenizer.json").exists() else None
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer.json: give the prompt as --prompt-ids")
    elif args.raw or not tokenizer.has_chat_template:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                            stop=tuple(args.stop)).check()
    stage = load_stage(folder)
    done = Completion()
    for piece in generate_text(stage, tokenizer, prompt, params, args.max_context, done):
        if args.output == "text":
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.output == "ids":
        sys.stdout.write(",".join(map(str, done.token_ids)))
    sys.stdout.write("\n")
    t = done.timings
    print(f"prompt: {t.prompt_tokens} tokens, {t.prefill_tps:.1f} tok/s, first token after {t.prefill_s * 1000:.1f} ms; "
          f"generated: {t.generated_tokens} tokens, {t.decode_tps:.1f} tok/s; finish: {done.finish_reason}", file=sys.stderr)
    return 0


def _cmd_convert(args) -> int:
    from swarm.model.convert import convert_llama2c

    out = convert_llama2c(args.src, args.out, bits=args.bits, group_size=args.group_size)
    print(out)
    return 0


def _cmd_split(args) -> int:
    from swarm.model.source import resolve_model
    from swarm.shards import split_model

    for folder in split_model(resolve_model(args.model), args.topology, args.out, source=args.source):
        print(folder)
    return 0


def _cmd_up(args) -> int:
    import asyncio
    import contextlib
    import signal

    from swarm.node import Node, NodeConfig
    from topology import parse_size

    config = NodeConfig(model=args.model, name=args.name or NodeConfig().name, host=args.host, port=args.port,
                        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
                        max_context=args.max_context, cluster_key=args.cluster_key or os.environ.get("CAKE_SWARM_KEY"),
                        topology=args.topology, strategy=args.strategy, wire_dtype=args.wire_dtype,
                        peers=tuple(args.peer), mdns=not args.no_mdns, speed=args.speed, cache_dir=args.cache_dir,
                        api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_moves=args.max_moves, replan_timeout=args.replan_timeout, peer_port=args.peer_port,
                        config_dir=args.config_dir, tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")

    from web.app import make_app

    from kernels.linear import set_threads, share_cores

    share_cores(_is_loopback(args.host))  # a node on loopback has every peer on this machine
    if args.threads:
        set_threads(args.threads)

    async def serve() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.exit_requested.set)
        try:
            await node.start(make_app(node))
            scheme = "https" if config.tls_cert else "http"
            print(f"cake-swarm: node {node.name} ({node.id}) serving on {scheme}://{config.host}:{config.port}/",
                  file=sys.stderr, flush=True)
            await node.exit_requested.wait()
            # a second signal while handing over stops at once
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: leaving.cancel())
            leaving = asyncio.ensure_future(node.leave())
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
        finally:
            await node.stop()

    try:
        import uvloop
        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _node_url(node: str) -> str:
    """http://HOST:PORT from HOST:PORT or a URL as the dashboard shows it (a trailing / is dropped)."""
    node = node.rstrip("/")
    return node if node.startswith("http") else f"http://{node}"


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _refusal(url: str, status: int, body: bytes) -> CliError:
    """A node's error answer as one line: its message, and what to do about a missing API key."""
    import json

    text = body.decode(errors="replace").strip()
    try:
        text = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if status == 401:
        text += f" (give it with --api-key KEY or ${API_KEY_ENV})"
    return CliError(f"{url}: {status}: {' '.join(text.split())}")


def _http(args, path: str, data: bytes | None = None, method: str = "GET", content_type: str | None = None) -> bytes:
    """The body of a node's answer; CliError when no node answers or it refuses."""
    import urllib.error
    import urllib.request

    base = _node_url(args.node)
    headers = {"Content-Type": content_type} if content_type else {}
    if key := _api_key(args):
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data, headers, method=method), timeout=30) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise _refusal(base + path, e.code, e.read()) from None
    except (urllib.error.URLError, OSError) as e:
        raise _no_node(base, e) from None


def _no_node(base: str, e: Exception) -> CliError:
    why = getattr(e, "reason", e)  # urllib wraps the OSError; aiohttp keeps it as os_error
    why = getattr(why, "os_error", why)
    return CliError(f"no cake-swarm node answers at {base} ({getattr(why, 'strerror', None) or why}): "
                    f"start one with `cake-swarm up`, or give --node HOST:PORT")


def _layers_text(layers) -> str:
    """A node's layers as the dashboard and topology files write them: [0, 4] -> '0-3'; blocks joined by ', '."""
    blocks = [layers] if layers and isinstance(layers[0], int) else list(layers or [])
    return ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in blocks)


def _cmd_status(args) -> int:
    import json

    state = json.loads(_http(args, "/api/swarm"))
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    from topology import format_size

    print(f"swarm {state['cluster']['id']}{' (OPEN: no cluster key)' if state['cluster']['open'] else ''}: "
          f"{'ready' if state['ready'] else 'not ready'}, epoch {state['epoch']}")
    if state.get("plan_error"):
        print(f"  plan: {state['plan_error']}")
    for n in state["nodes"]:
        layers = f"layers {_layers_text(n['layers'])}" if n.get("layers") else "no layers"
        print(f"  {n['name']:<16} {n['addr']}:{n['port']:<6} {n['backend']:<5} budget {format_size(int(n['budget'])):>9} "
              f"used {format_size(int(n.get('used') or 0)):>9}  {layers:<18} {n.get('state', '?'):<8} "
              f"{float(n['speed']):.2f} GB/s{'  (model source)' if n.get('model') else ''}")
        for layers, d in (n.get("downloads") or {}).items():
            done, total = int(d["done"]), max(int(d["total"]), 1)
            bar = "#" * (30 * done // total)
            print(f"    shard {layers}: [{bar:<30}] {100 * done // total:3d}% {format_size(done)} of {format_size(total)}, "
                  f"{float(d['rate']) / 1e6:.1f} MB/s")
    return 0


def _cmd_topology(args) -> int:
    import json

    if args.apply:
        try:
            text = args.apply.read_bytes()
        except OSError as e:
            raise CliError(f"{args.apply}: cannot read ({e.strerror})") from None
        body = _http(args, "/api/topology", text, "PUT", "application/yaml").decode()
        print(json.loads(body).get("yaml", body), end="")
    else:
        print(_http(args, "/api/topology" + ("?format=cake" if args.cake else "")).decode(), end="")
    return 0


def _cmd_chat(args) -> int:
    import asyncio
    import json

    import aiohttp

    url = _node_url(args.node) + "/ws/chat"
    headers = {"Authorization": f"Bearer {key}"} if (key := _api_key(args)) else {}

    async def chat() -> int:
        body = {"messages": [{"role": "user", "content": args.message}], "max_tokens": args.max_tokens,
                "temperature": args.temperature}
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            await ws.send_json(body)
            async for msg in ws:
                frame = json.loads(msg.data)
                if frame["type"] == "token":
                    sys.stdout.write(frame["text"])
                    sys.stdout.flush()
                elif frame["type"] == "done":
                    t = frame.get("timings", {})
                    print(f"\n[{frame['usage']['completion_tokens']} tokens, {t.get('decode_tps', 0):.1f} tok/s, "
                          f"first token after {t.get('ttft_s', 0) * 1000:.0f} ms]", file=sys.stderr)
                    return 0
                else:
                    raise CliError(f"{url}: {frame.get('message')}")
        raise CliError(f"{url}: the node closed the chat before the answer was done")

    try:
        return asyncio.run(chat())
    except aiohttp.WSServerHandshakeError as e:
        raise _refusal(url, e.status, (e.message or "").encode()) from None
    except (aiohttp.ClientError, OSError) as e:
        raise _no_node(_node_url(args.node), e) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help followed by its default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default:" in text or default is None or isinstance(default, bool) \
                or default == [] or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cake-swarm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_down(args) -> int:
    """Ask a node to leave: it hands its layers and sessions over to the rest of the swarm, then exits."""
    import json

    answer = json.loads(_http(args, "/api/leave", b"", "POST"))
    print(f"{answer['node']} is leaving: its part moves to the other nodes, then it exits")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cake-swarm", description="Run one language model across your devices.",
                                formatter_class=_HelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"cake-swarm {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate on this machine alone (no daemon)")
    g.add_argument("--model", required=True, help="checkpoint folder, Hugging Face repo id, or 'demo'")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (chat-templated when the model has a template, unless --raw)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest tokens up to this probability mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the likeliest")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is none")
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--max-context", type=int, help="context length (default: the model's)")
    g.add_argument("--output", choices=("text", "ids"), default="text", help="print the text or the token ids")
    g.set_defaults(run=_cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint into an MLX checkpoint folder")
    c.add_argument("format", choices=("llama2c",), help="the checkpoint's format")
    c.add_argument("src", help="folder with the llama2.c .bin checkpoint and its tokenizer")
    c.add_argument("out", help="output folder")
    c.add_argument("--bits", type=int, help="quantize to this many bits (default: float32)")
    c.add_argument("--group-size", type=int, default=32, help="weights per quantization group")
    c.set_defaults(run=_cmd_convert)

    u = sub.add_parser("up", help="start this machine's daemon and join the swarm")
    u.add_argument("--model", help="checkpoint folder, Hugging Face repo id or 'demo' (this node becomes a source)")
    u.add_argument("--name", help="node name (default: the hostname)")
    u.add_argument("--host", default="0.0.0.0", help="address to serve and advertise on (mDNS runs on its interface)")
    u.add_argument("--port", type=int, default=10128, help="port of the dashboard and API (peers use --peer-port)")
    u.add_argument("--memory-budget", help="memory this node offers, e.g. 6GiB, 800MB (default: 60%% of free memory)")
    u.add_argument("--max-context", type=int, default=4096, help="tokens of KV cache to reserve per layer")
    u.add_argument("--cluster-key", help="shared secret of the swarm (or $CAKE_SWARM_KEY); without it the swarm is open")
    u.add_argument("--topology", type=Path, help="topology YAML pinning layers to nodes (edits are applied live)")
    u.add_argument("--strategy", choices=("fastest", "proportional"), default="fastest",
                   help="placement: fewest and fastest nodes first, or split by memory as exo does")
    u.add_argument("--wire-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="dtype of hidden states between stages (auto: the compute dtype, lossless)")
    u.add_argument("--peer", action="append", default=[], help="HOST:PORT of a peer (where multicast is blocked)")
    u.add_argument("--no-mdns", action="store_true", help="do not advertise or browse over mDNS")
    u.add_argument("--speed", type=float, help="GB/s to advertise instead of measuring (pins placement order)")
    u.add_argument("--cache-dir", type=Path, help="shard cache (default: $XDG_CACHE_HOME/cake-swarm)")
    u.add_argument("--api-key", help="require this Bearer token for the API and dashboard")
    u.add_argument("--max-batch", type=int, default=16,
                   help="sessions decoded together: requests this node generates at once, rows a stage runs per step")
    u.add_argument("--max-queue", type=int, default=64,
                   help="requests that wait for a place in the batch before this node answers busy (503)")
    u.add_argument("--threads", type=int, help="CPU threads the CPU kernels use (default: every core)")
    u.add_argument("--max-moves", type=int, default=4,
                   help="times a request may move to a new plan (a node lost or joining) before it fails")
    u.add_argument("--replan-timeout", type=float, default=30.0,
                   help="seconds a moved request waits for the swarm's next plan before it fails")
    u.add_argument("--peer-port", type=int, help="TLS port peers connect to (default: --port + 1; 0: any free port)")
    u.add_argument("--config-dir", type=Path,
                   help="where the node keeps its TLS key and certificate (default: $XDG_CONFIG_HOME/cake-swarm)")
    u.add_argument("--tls-cert", type=Path, help="serve the dashboard and API over HTTPS with this certificate (PEM)")
    u.add_argument("--tls-key", type=Path, help="the key of --tls-cert (default: in the --tls-cert file)")
    u.set_defaults(run=_cmd_up)

    api_key_help = f"the node's --api-key, if it has one (default: ${API_KEY_ENV})"
    st = sub.add_parser("status", help="the swarm as a node sees it")
    st.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    st.add_argument("--api-key", help=api_key_help)
    st.add_argument("--json", action="store_true", help="print all of the node's state as JSON")
    st.set_defaults(run=_cmd_status)

    ch = sub.add_parser("chat", help="send one message to the swarm and stream the answer")
    ch.add_argument("message", help="what to say")
    ch.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    ch.add_argument("--api-key", help=api_key_help)
    ch.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ch.set_defaults(run=_cmd_chat)

    tp = sub.add_parser("topology", help="print the plan in force as topology YAML (or apply a file)")
    tp.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    tp.add_argument("--apply", type=Path, help="a topology YAML to apply (validated first; a bad file changes nothing)")
    tp.add_argument("--cake", action="store_true",
                    help="print it in cake's layout: the workers only, the model's node runs the layers no one names")
    tp.add_argument("--api-key", help=api_key_help)
    tp.set_defaults(run=_cmd_topology)

    s = sub.add_parser("split", help="write the shards of a topology offline, one folder per stage")
    s.add_argument("--model", required=True, help="checkpoint folder, Hugging Face repo id, or 'demo'")
    s.add_argument("--topology", required=True, type=Path, help="topology YAML (ours or cake's)")
    s.add_argument("--out", required=True, type=Path, help="folder to write DIR/<node name>/ into")
    s.add_argument("--source", help="name of the node that runs --model: also write the layers the file names for "
                                    "no one, as its shards (default: not written; that node has the whole model)")
    s.set_defaults(run=_cmd_split)

    dn = sub.add_parser("down", help="stop a node gracefully: its layers and sessions move to the others first")
    dn.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of the node to stop")
    dn.add_argument("--api-key", help="the node's --api-key, if it has one (default: $CAKE_SWARM_API_KEY)")
    dn.set_defaults(run=_cmd_down)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from swarm.model.config import ModelError

    try:
        return args.run(args)
    except (CliError, ModelError, ValueError, FileNotFoundError) as e:
        print(f"cake-swarm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
