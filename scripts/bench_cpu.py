"""CPU benchmark: the CPU kernels beside MLX's and numpy's BLAS per linear, and the Qwen2.5-0.5B shape end
to end beside mlx-lm and llama.cpp, every comparison interleaved in one run so that ratios survive noise.

    python scripts/bench_cpu.py [--phase kernels|model|all] [--threads N] [--rounds 3] [--work DIR]

kernels: each linear of the 0.5B shape at 1, 4 and 16 rows (decode: GB/s of weights read) and 512 rows
(prefill: GFLOP/s), cake-swarm's CPU kernels (kernels.cpu_matmul: the row-exact tiles, and for prefill also
the prompt-chunk path on BLAS) against mx.quantized_matmul and numpy's BLAS on the same weights dequantized
to float32 ahead of time (a tuned sgemm, with no dequantization to do).

model: a Qwen2.5-0.5B-shaped 4-bit checkpoint written by mlx-lm's own classes from a fixed seed (group 64,
bfloat16, as mlx-community publishes them), and the same weights requantized to GGUF Q4_0 with the gguf
package; prefill of --prompt-tokens and greedy decode of --tokens, by the engine (float32 on the CPU),
mlx-lm (float32) and llama.cpp (llama-cpp-python, built from PyPI: the `bench` extra), each engine once a
round. Needs: pip install -e '.[cpu,bench]' (llama-cpp-python compiles llama.cpp for this CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

USER_OPENMP = {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # before kernels/ sets its own

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768)
LINEARS = {"q_proj": (896, 896), "k_proj": (128, 896), "gate_proj": (4864, 896), "down_proj": (896, 4864),
           "lm_head": (151936, 896)}
DECODE_ROWS, PREFILL_ROWS, GROUP_SIZE = (1, 4, 16), 512, 64


def best_of(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# --- kernels ---------------------------------------------------------------------------------------------

def bench_kernels(threads: int, rounds: int) -> None:
    from threadpoolctl import threadpool_limits

    from kernels import cpu_matmul

    print(f"\nper linear, best of {rounds} interleaved rounds; decode GB/s counts the packed weights and the scales "
          f"and biases as a checkpoint has them (bfloat16); prefill: our row-exact tiles, then our prompt-chunk "
          f"path (Plan.on_blas); BLAS f32 on {threads} threads")
    print(f"{'linear':<10} {'rows':>4} {'cake-swarm':>16} {'MLX':>8} {'BLAS f32':>9} {'unit':<8} {'vs MLX':>7} "
          f"{'vs BLAS':>8}")
    rng = np.random.default_rng(0)
    for name, (out_dim, in_dim) in LINEARS.items():
        w = mx.array(rng.standard_normal((out_dim, in_dim), np.float32) * in_dim ** -0.5)
        q, s, b = mx.quantize(w, group_size=GROUP_SIZE, bits=4)
        s, b = (a.astype(mx.bfloat16).astype(mx.float32) for a in (s, b))  # as saved, widened as a CPU stage does
        mx.eval(q, s, b)
        plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), GROUP_SIZE, 4)
        dense = np.asarray(mx.dequantize(q, s, b, group_size=GROUP_SIZE, bits=4))
        weight_bytes = q.nbytes + (s.nbytes + b.nbytes) // 2
        for rows in DECODE_ROWS + (() if name == "lm_head" else (PREFILL_ROWS,)):
            x = rng.standard_normal((rows, in_dim), np.float32)
            xm = mx.array(x)
            candidates = {"ours": lambda: plan(x, threads),
                          "mlx": lambda: mx.eval(mx.quantized_matmul(xm, q, s, b, transpose=True,
                                                                     group_size=GROUP_SIZE, bits=4))}
            if rows == PREFILL_ROWS:
                candidates["chunk"] = lambda: plan.on_blas(x, threads)
                candidates["blas"] = lambda: _on_threads(threadpool_limits, threads, lambda: x @ dense.T)
            reps = 3 if rows == PREFILL_ROWS or name == "lm_head" else 20
            times = {k: [] for k in candidates}
            for _ in range(rounds):
                for k, fn in candidates.items():
                    times[k] += best_of(fn, reps)
            work, unit = (2 * rows * out_dim * in_dim, "GFLOP/s") if rows == PREFILL_ROWS else (weight_bytes, "GB/s")
            rate = {k: work / min(v) / 1e9 for k, v in times.items()}
            ours = f"{rate['ours']:.1f}" + (f" / {rate['chunk']:.1f}" if "chunk" in rate else "")
            blas = f"{rate['blas']:.1f}" if "blas" in rate else ""
            vs_blas = f"{max(rate['ours'], rate['chunk']) / rate['blas']:.2f}x" if "blas" in rate else ""
            print(f"{name:<10} {rows:>4} {ours:>16} {rate['mlx']:>8.1f} {blas:>9} {unit:<8} "
                  f"{max(rate['ours'], rate.get('chunk', 0)) / rate['mlx']:>6.1f}x {vs_blas:>8}", flush=True)


def _on_threads(limits, threads: int, fn):
    with limits(limits=threads, user_api="blas"):  # Plan.on_blas leaves BLAS on one thread
        return fn()


# --- model -----------------------------------------------------------------------------------------------

def write_model(folder: Path) -> Path:
    """The 0.5B-shaped checkpoint, written by mlx-lm's classes (once; kept in the work folder)."""
    from tests.mlxlm_reference import write_checkpoint

    if not (folder / "config.json").exists():
        write_checkpoint(folder, QWEN_05B, group_size=GROUP_SIZE, bits=4, dtype=mx.bfloat16, seed=0, scaled=True)
    return folder


def write_gguf(folder: Path, path: Path) -> Path:
    """The same weights as GGUF for llama.cpp: matrices requantized to Q4_0, norms and biases float32."""
    import gguf

    if path.exists():
        return path
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(mx.load(str(f)))

    def matrix(prefix: str) -> np.ndarray:
        if f"{prefix}.scales" in tensors:
            w = mx.dequantize(tensors[f"{prefix}.weight"], tensors[f"{prefix}.scales"], tensors[f"{prefix}.biases"],
                              group_size=GROUP_SIZE, bits=4)
        else:
            w = tensors[f"{prefix}.weight"]
        return gguf.quants.quantize(np.asarray(w.astype(mx.float32)), gguf.GGMLQuantizationType.Q4_0)

    def vector(name: str) -> np.ndarray:
        return np.asarray(tensors[name].astype(mx.float32))

    cfg = QWEN_05B
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "qwen2")
    writer.add_context_length(4096)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # placeholder vocabulary: the benchmark feeds token ids, and llama.cpp only needs a well-formed one
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    writer.add_token_scores([0.0] * cfg["vocab_size"])
    writer.add_token_types([gguf.TokenType.NORMAL] * cfg["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    q4 = gguf.GGMLQuantizationType.Q4_0
    writer.add_tensor("token_embd.weight", matrix("model.embed_tokens"), raw_dtype=q4)
    for i in range(cfg["num_hidden_layers"]):
        p, blk = f"model.layers.{i}", f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", vector(f"{p}.input_layernorm.weight"))
        writer.add_tensor(f"{blk}.ffn_norm.weight", vector(f"{p}.post_attention_layernorm.weight"))
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            writer.add_tensor(f"{blk}.{theirs}.weight", matrix(f"{p}.self_attn.{ours}"), raw_dtype=q4)
            writer.add_tensor(f"{blk}.{theirs}.bias", vector(f"{p}.self_attn.{ours}.bias"))
        writer.add_tensor(f"{blk}.attn_output.weight", matrix(f"{p}.self_attn.o_proj"), raw_dtype=q4)
        for ours, theirs in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            writer.add_tensor(f"{blk}.{theirs}.weight", matrix(f"{p}.mlp.{ours}"), raw_dtype=q4)
    writer.add_tensor("output_norm.weight", vector("model.norm.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


class CakeSwarm:
    name = "cake-swarm"

    def __init__(self, folder: Path):
        from swarm.model.decoder import load_stage

        self.stage = load_stage(folder)

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        from swarm.model.generate import Timings, generate_ids
        from swarm.model.sampling import SamplingParams

        timings = Timings()
        out = list(generate_ids(self.stage, prompt, SamplingParams(max_tokens=tokens + 1), frozenset(),
                                timings=timings))
        return timings.prefill_s, timings.decode_s, out


class CpuBlock:
    """The same checkpoint through kernels.cpu_block.StageRunner: the forward the decoder takes on the CPU
    once it delegates to it (the whole layer in numpy, no MLX op between the linears)."""

    name = "cpu_block"

    def __init__(self, folder: Path):
        from kernels.cpu_block import StageRunner
        from swarm.model.decoder import load_stage

        self.runner = StageRunner(load_stage(folder))

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        caches = [self.runner.make_cache()]
        t0 = time.perf_counter()
        out = [int(np.argmax(self.runner.forward(np.array(prompt), caches, [len(prompt)])[0]))]
        t1 = time.perf_counter()
        for _ in range(tokens):
            out.append(int(np.argmax(self.runner.forward(np.array(out[-1:]), caches, [1])[0])))
        return t1 - t0, time.perf_counter() - t1, out


class MlxLm:
    name = "mlx-lm"

    def __init__(self, folder: Path):
        from mlx.utils import tree_map
        from mlx_lm.utils import load_model

        self.model, _ = load_model(folder)
        self.model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                                   self.model.parameters()))
        mx.eval(self.model.parameters())

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        t0 = time.perf_counter()
        out = [int(mx.argmax(self.model(mx.array([prompt]), cache=cache)[0, -1]))]
        t1 = time.perf_counter()
        for _ in range(tokens):
            out.append(int(mx.argmax(self.model(mx.array([[out[-1]]]), cache=cache)[0, -1])))
        return t1 - t0, time.perf_counter() - t1, out


class LlamaCpp:
    """llama.cpp in a process of its own: it and numba share GNU OpenMP, whose settings are read once a process
    (kernels.cpu_path sets ours), so llama.cpp keeps its defaults there. Timed inside that process."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, context: int):
        import multiprocessing

        self.conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve_llama_cpp, args=(child, path, threads, context, USER_OPENMP), daemon=True)
        self.proc.start()

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        self.conn.send((prompt, tokens))
        return self.conn.recv()


def _serve_llama_cpp(conn, path: Path, threads: int, context: int, openmp: dict) -> None:
    for name, value in openmp.items():  # the user's, not what our kernels set in the parent
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    runner = _LlamaCppHere(path, threads, context)
    while True:
        try:
            prompt, tokens = conn.recv()
        except EOFError:  # the bench is done
            return
        conn.send(runner.run(prompt, tokens))


class _LlamaCppHere:
    def __init__(self, path: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _next(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))))

    def run(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        t0 = time.perf_counter()
        out = [self._next(prompt)]
        t1 = time.perf_counter()
        for _ in range(tokens):
            out.append(self._next([out[-1]]))
        return t1 - t0, time.perf_counter() - t1, out


def bench_model(work: Path, threads: int, rounds: int, prompt_tokens: int, tokens: int, engines: list[str],
                mlx_lm_prompt: int, mlx_lm_tokens: int) -> None:
    folder = write_model(work / "qwen2.5-0.5b-mlxlm-q4g64")
    runners = []
    for name in engines:
        if name == "cake-swarm":
            runners.append(CakeSwarm(folder))
        elif name == "cpu_block":
            runners.append(CpuBlock(folder))
        elif name == "mlx-lm":
            runners.append(MlxLm(folder))
        elif name == "llama.cpp":
            runners.append(LlamaCpp(write_gguf(folder, work / "qwen2.5-0.5b-q4_0.gguf"), threads,
                                    prompt_tokens + tokens + 16))
    if any(r.name in ("cake-swarm", "cpu_block") for r in runners):
        from kernels.linear import kernel_path
        print(f"\ncake-swarm's linears: {kernel_path()}")
    prompt = [(i * 7919 + 13) % 150000 + 3 for i in range(prompt_tokens)]
    # mlx-lm's CPU prefill runs about 1 tok/s: it gets a shorter prompt and fewer tokens (its rate per token
    # hardly depends on them)
    lengths = {r.name: (mlx_lm_prompt, mlx_lm_tokens) if r.name == "mlx-lm" else (prompt_tokens, tokens) for r in runners}
    results = {r.name: {"prefill": [], "decode": []} for r in runners}
    for _ in range(rounds):
        for r in runners:
            n, t = lengths[r.name]
            prefill_s, decode_s, _ = r.run(prompt[:n], t)
            results[r.name]["prefill"].append(n / prefill_s)
            results[r.name]["decode"].append(t / decode_s)
    print(f"\nQwen2.5-0.5B shape, 4-bit; prompt {prompt_tokens} tokens, {tokens} decoded (mlx-lm: {mlx_lm_prompt}, "
          f"{mlx_lm_tokens}); {rounds} interleaved rounds (best / median tok/s); load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'engine':<11} {'prefill tok/s':>16} {'decode tok/s':>16}")
    for name, r in results.items():
        print(f"{name:<11} {max(r['prefill']):>7.1f} / {statistics.median(r['prefill']):>6.1f} "
              f"{max(r['decode']):>7.1f} / {statistics.median(r['decode']):>6.1f}")
    for ours in ("cake-swarm", "cpu_block"):
        for ref in ("mlx-lm", "llama.cpp"):
            if ours in results and ref in results:
                a, b = results[ours], results[ref]
                print(f"{ours} / {ref}: prefill {max(a['prefill']) / max(b['prefill']):.2f}x, "
                      f"decode {max(a['decode']) / max(b['decode']):.2f}x (best against best)")
    reference = next((r for r in runners if r.name == "mlx-lm"), None)
    if reference is not None:
        expected = reference.run(prompt[:mlx_lm_prompt], mlx_lm_tokens)[2]
        for r in runners:
            if r.name in ("cake-swarm", "cpu_block"):
                out = r.run(prompt[:mlx_lm_prompt], mlx_lm_tokens)[2]
                same = next((i for i, (x, y) in enumerate(zip(out, expected)) if x != y), len(out))
                print(f"{r.name}: greedy tokens equal to mlx-lm's float32 tokens: the first {same} of {len(out)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("kernels", "model", "all"), default="all")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--engines", default="cake-swarm,cpu_block,mlx-lm,llama.cpp")
    p.add_argument("--mlx-lm-prompt-tokens", type=int, default=32)
    p.add_argument("--mlx-lm-tokens", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/cake-swarm-bench-cpu"))
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    from kernels.linear import set_threads

    set_threads(args.threads)
    print(f"{platform.node()} {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}, MLX {mx.__version__}")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase in ("kernels", "all"):
        bench_kernels(args.threads, args.rounds)
    if args.phase in ("model", "all"):
        bench_model(args.work, args.threads, args.rounds, args.prompt_tokens, args.tokens, args.engines.split(","),
                    args.mlx_lm_prompt_tokens, args.mlx_lm_tokens)


if __name__ == "__main__":
    main()
