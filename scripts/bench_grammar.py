"""Per-token cost of constrained decoding on this CPU: llguidance (what the engine uses), outlines-core and
xgrammar, on one JSON schema, with the demo's vocabulary (512 SentencePiece pieces with byte fallback) and
a 32k byte-level BPE trained here on fixed local text (this Python's standard library sources).

Each library compiles the schema, then follows a fixed valid answer token by token: at each step every
session computes its mask of allowed tokens, then takes the answer's next token. Batch 16 is 16 sessions
stepping together, their masks computed one after another as the sampling stage does. The figures are
CPU time of the mask computations per decode step (median of --runs, after a warm-up run). Every library
gets the same token bytes (llguidance's view of the vocabulary) and the same answer tokens; a library not
installed is skipped (xgrammar needs torch: run this script again from a venv that has it).

    python scripts/bench_grammar.py [--demo-tokenizer PATH] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "mood", "friends", "address"],
          "properties": {
              "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
              "mood": {"enum": ["happy", "sad", "sleepy"]},
              "friends": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
              "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                          "properties": {"city": {"type": "string", "maxLength": 20},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
ANSWER = json.dumps({"name": "Lily Brown", "age": 7, "mood": "happy", "friends": ["Tom", "Sue", "Ben"],
                     "address": {"city": "Paris", "zip": "75001"}}, separators=(",", ":"))
BATCHES = (1, 16)


# --- vocabularies ---------------------------------------------------------------------------------------

def demo_tokenizer() -> Path:
    from swarm.model.source import resolve_model
    return resolve_model("demo") / "tokenizer.json"


def trained_bpe(out: Path, vocab_size: int = 32000, megabytes: int = 12) -> Path:
    """A byte-level BPE trained on this Python's standard library sources, in sorted order (fixed text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size > megabytes << 20:
            break
        texts.append(f.read_bytes().decode("utf-8", errors="replace"))
        size += len(texts[-1])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out))
    return out


class Vocab:
    """A tokenizer.json as every library gets it: token bytes, EOS, and the answer's tokens."""

    def __init__(self, path: Path, name: str):
        import llguidance as ll
        from tokenizers import Tokenizer

        self.name, self.path = name, path
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        self.ll = ll.LLTokenizer(str(path), n_vocab=size)
        self.size, self.eos = self.ll.vocab_size, self.ll.eos_token
        self.token_bytes = [b"" if self.ll.is_special_token(i) else self.ll.decode_bytes([i]) for i in range(self.size)]
        self.answer = self.ll.tokenize_bytes(ANSWER.encode())


# --- libraries ------------------------------------------------------------------------------------------

class Llguidance:
    name = "llguidance 1.x"

    def __init__(self, vocab: Vocab):
        import llguidance as ll

        self.ll, self.vocab = ll, vocab
        self.words = np.zeros((vocab.size + 31) // 32, dtype=np.int32)

    def compile(self):
        options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        self.grammar = self.ll.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options)
        self.matcher(self.grammar)

    def matcher(self, _=None):
        return self.ll.LLMatcher(self.vocab.ll, self.grammar)

    def mask(self, m) -> None:
        m.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)

    def advance(self, m, token: int) -> None:
        assert m.consume_token(token), m.get_error()


class EngineConstraint(Llguidance):
    """llguidance as the sampling stage calls it: swarm.model.grammar.Constraint, mask as a bool array."""
    name = "llguidance, engine's Constraint"

    def compile(self):
        from swarm.model.grammar import Vocabulary
        self.engine = Vocabulary(self.vocab.path, self.vocab.size, [self.vocab.eos])
        self.matcher()

    def matcher(self, _=None):
        return self.engine.constraint({"type": "json_schema", "schema": SCHEMA})

    def mask(self, m) -> None:
        m.allowed()

    def advance(self, m, token: int) -> None:
        m.accept(token)


class OutlinesCore:
    name = "outlines-core 0.2"

    def __init__(self, vocab: Vocab):
        import outlines_core
        self.oc, self.vocab = outlines_core, vocab
        self.words = np.zeros((vocab.size + 31) // 32, dtype=np.int32)

    def compile(self):
        from outlines_core.json_schema import build_regex_from_schema

        tokens: dict[bytes, list[int]] = {}
        for i, raw in enumerate(self.vocab.token_bytes):
            if raw and i != self.vocab.eos:
                tokens.setdefault(raw, []).append(i)
        regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
        self.index = self.oc.Index(regex, self.oc.Vocabulary(self.vocab.eos, tokens))

    def matcher(self):
        return self.oc.Guide(self.index)

    def mask(self, m) -> None:
        m.write_mask_into(self.words.ctypes.data, self.words.size, self.words.itemsize)

    def advance(self, m, token: int) -> None:
        m.advance(token)


class Xgrammar:
    name = "xgrammar 0.2"

    def __init__(self, vocab: Vocab):
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab
        self.bitmask = xgr.allocate_token_bitmask(1, vocab.size)

    def compile(self):
        info = self.xgr.TokenizerInfo(self.vocab.token_bytes, vocab_type=self.xgr.VocabType.RAW,
                                      vocab_size=self.vocab.size, stop_token_ids=[self.vocab.eos])
        self.compiled = self.xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def matcher(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def mask(self, m) -> None:
        m.fill_next_token_bitmask(self.bitmask)

    def advance(self, m, token: int) -> None:
        assert m.accept_token(token)


LIBRARIES = (Llguidance, EngineConstraint, OutlinesCore, Xgrammar)


# --- the measurement ----------------------------------------------------------------------------------------

def follow(lib, batch: int) -> float:
    """CPU seconds spent computing masks while `batch` sessions follow the answer together (CPU time, not
    wall time: the machines this runs on are shared)."""
    sessions = [lib.matcher() for _ in range(batch)]
    spent = 0.0
    for token in lib.vocab.answer:
        t0 = time.process_time()
        for m in sessions:
            lib.mask(m)
        spent += time.process_time() - t0
        for m in sessions:
            lib.advance(m, token)
    return spent


def measure(cls, vocab: Vocab, runs: int) -> dict | None:
    try:
        lib = cls(vocab)
    except ImportError as e:
        return {"library": cls.name, "vocabulary": vocab.name, "skipped": f"not installed ({e.name})"}
    t0 = time.perf_counter()
    lib.compile()
    out = {"library": cls.name, "vocabulary": vocab.name, "compile_s": round(time.perf_counter() - t0, 3),
           "answer_tokens": len(vocab.answer)}
    for batch in BATCHES:
        follow(lib, batch)  # warm-up
        best = statistics.median(follow(lib, batch) for _ in range(runs))
        out[f"step_us_batch{batch}"] = round(best / len(vocab.answer) * 1e6, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-tokenizer", type=Path, help="the demo's tokenizer.json (default: found as cake-swarm finds it)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bpe = trained_bpe(Path(tmp) / "bpe32k.json")
        print(f"# trained the 32k BPE in {time.perf_counter() - t0:.1f} s")
        vocabs = [Vocab(args.demo_tokenizer or demo_tokenizer(), "demo (512, SentencePiece)"),
                  Vocab(bpe, "32k byte-level BPE")]
        rows = [measure(cls, vocab, args.runs) for vocab in vocabs for cls in LIBRARIES]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print("| library | vocabulary | compile s | answer tokens | per step, batch 1 (us) | per step, batch 16 (us) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['library']} | {r['vocabulary']} | {r['skipped']} | | | |")
        else:
            print(f"| {r['library']} | {r['vocabulary']} | {r['compile_s']} | {r['answer_tokens']} | "
                  f"{r['step_us_batch1']} | {r['step_us_batch16']} |")


if __name__ == "__main__":
    main()
