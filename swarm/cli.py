"""The `cake-swarm` command: argument parsing and one call per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _cmd_generate(args) -> int:
    from swarm.model.decoder import load_stage
    from swarm.model.generate import Completion, generate_text
    from swarm.model.sampling import SamplingParams
    from swarm.model.source import resolve_model
    from swarm.model.tokenizer import Tokenizer

    folder = resolve_model(args.model)
    tokenizer = Tokenizer.load(folder)
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
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
