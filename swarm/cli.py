"""The `cake-swarm` command: argument parsing and one call per subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


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
                            stop=tuple(args.stop))
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

    for folder in split_model(resolve_model(args.model), args.topology, args.out):
        print(folder)
    return 0


def _cmd_up(args) -> int:
    import asyncio
    import signal

    from swarm.node import Node, NodeConfig
    from topology import parse_size

    config = NodeConfig(model=args.model, name=args.name or NodeConfig().name, host=args.host, port=args.port,
                        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
                        max_context=args.max_context, cluster_key=args.cluster_key or os.environ.get("CAKE_SWARM_KEY"),
                        topology=args.topology, strategy=args.strategy, wire_dtype=args.wire_dtype,
                        peers=tuple(args.peer), mdns=not args.no_mdns, speed=args.speed, cache_dir=args.cache_dir,
                        api_key=args.api_key, max_sessions=args.max_sessions)

    async def serve() -> None:
        node = Node(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await node.start()
            print(f"cake-swarm: node {node.name} ({node.id}) serving on http://{config.host}:{config.port}/",
                  file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await node.stop()

    try:
        import uvloop
        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    return 0


def _node_url(node: str) -> str:
    """http://HOST:PORT from HOST:PORT or a URL as the dashboard shows it (a trailing / is dropped)."""
    node = node.rstrip("/")
    return node if node.startswith("http") else f"http://{node}"


def _cmd_status(args) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(_node_url(args.node) + "/api/swarm", timeout=10) as r:
        state = json.loads(r.read())
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    from topology import format_size

    print(f"swarm {state['cluster']['id']}{' (OPEN: no cluster key)' if state['cluster']['open'] else ''}: "
          f"{'ready' if state['ready'] else 'not ready'}, epoch {state['epoch']}")
    if state.get("plan_error"):
        print(f"  plan: {state['plan_error']}")
    for n in state["nodes"]:
        layers = f"layers [{n['layers'][0]}, {n['layers'][1]})" if n.get("layers") else "no layers"
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
    import urllib.error
    import urllib.request

    url = _node_url(args.node) + "/api/topology"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.apply:
        request = urllib.request.Request(url, data=args.apply.read_bytes(), method="PUT",
                                         headers={**headers, "Content-Type": "application/yaml"})
    else:
        request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        print(f"cake-swarm: error: {e.code}: {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    if args.apply:
        import json
        print(json.loads(body).get("yaml", body), end="")
    else:
        print(body, end="")
    return 0


def _cmd_chat(args) -> int:
    import asyncio
    import json

    import aiohttp

    async def chat() -> int:
        body = {"messages": [{"role": "user", "content": args.message}], "max_tokens": args.max_tokens,
                "temperature": args.temperature}
        async with aiohttp.ClientSession() as http, http.ws_connect(_node_url(args.node) + "/ws/chat") as ws:
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
                    print(f"cake-swarm: error: {frame.get('message')}", file=sys.stderr)
                    return 1
        return 1

    return asyncio.run(chat())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cake-swarm", description="Run one language model across your devices.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate on this machine alone (no daemon)")
    g.add_argument("--model", required=True, help="checkpoint folder, Hugging Face repo id, or 'demo'")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (chat-templated when the model has a template, unless --raw)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--max-context", type=int, help="context length (default: the model's)")
    g.add_argument("--output", choices=("text", "ids"), default="text")
    g.set_defaults(run=_cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint into an MLX checkpoint folder")
    c.add_argument("format", choices=("llama2c",))
    c.add_argument("src", help="folder with the llama2.c .bin checkpoint and its tokenizer")
    c.add_argument("out", help="output folder")
    c.add_argument("--bits", type=int, help="quantize to this many bits (default: float32)")
    c.add_argument("--group-size", type=int, default=32)
    c.set_defaults(run=_cmd_convert)

    u = sub.add_parser("up", help="start this machine's daemon and join the swarm")
    u.add_argument("--model", help="checkpoint folder, Hugging Face repo id or 'demo' (this node becomes a source)")
    u.add_argument("--name", help="node name (default: the hostname)")
    u.add_argument("--host", default="0.0.0.0", help="address to serve and advertise on (mDNS runs on its interface)")
    u.add_argument("--port", type=int, default=10128)
    u.add_argument("--memory-budget", help="memory this node offers, e.g. 6GiB, 800MB (default: 60%% of free memory)")
    u.add_argument("--max-context", type=int, default=4096, help="tokens of KV cache to reserve per layer")
    u.add_argument("--cluster-key", help="shared secret of the swarm (or $CAKE_SWARM_KEY); without it the swarm is open")
    u.add_argument("--topology", type=Path, help="topology YAML pinning layers to nodes (edits are applied live)")
    u.add_argument("--strategy", choices=("fastest", "proportional"), default="fastest")
    u.add_argument("--wire-dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    u.add_argument("--peer", action="append", default=[], help="HOST:PORT of a peer (where multicast is blocked)")
    u.add_argument("--no-mdns", action="store_true", help="do not advertise or browse over mDNS")
    u.add_argument("--speed", type=float, help="GB/s to advertise instead of measuring (pins placement order)")
    u.add_argument("--cache-dir", type=Path, help="shard cache (default: $XDG_CACHE_HOME/cake-swarm)")
    u.add_argument("--api-key", help="require this Bearer token for the API and dashboard")
    u.add_argument("--max-sessions", type=int, default=16, help="concurrent generations this node takes")
    u.set_defaults(run=_cmd_up)

    st = sub.add_parser("status", help="the swarm as a node sees it")
    st.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    st.add_argument("--json", action="store_true")
    st.set_defaults(run=_cmd_status)

    ch = sub.add_parser("chat", help="send one message to the swarm and stream the answer")
    ch.add_argument("message")
    ch.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.set_defaults(run=_cmd_chat)

    tp = sub.add_parser("topology", help="print the plan in force as topology YAML (or apply a file)")
    tp.add_argument("--node", default="127.0.0.1:10128", help="HOST:PORT of any node")
    tp.add_argument("--apply", type=Path, help="a topology YAML to apply (validated first; a bad file changes nothing)")
    tp.add_argument("--api-key", help="the swarm's --api-key, if it has one")
    tp.set_defaults(run=_cmd_topology)

    s = sub.add_parser("split", help="write the shards of a topology offline, one folder per node")
    s.add_argument("--model", required=True)
    s.add_argument("--topology", required=True, type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.set_defaults(run=_cmd_split)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from swarm.model.config import ModelError

    try:
        return args.run(args)
    except (ModelError, ValueError, FileNotFoundError) as e:
        print(f"cake-swarm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
