"""Whether the CPU back-end runs its linears on kernels.cpu_matmul, and how: numba present, a start-up
self-check against mx.quantized_matmul per weight format, the thread count, and the call from MLX arrays.

numba (with llvmlite) is the `cpu` extra: nothing here imports it until `enabled()` runs, and without it,
or when a check fails, the layers keep mx.quantized_matmul. Activations other than float32 (a CPU stage
loaded in the checkpoint's half precision) also keep MLX's kernels, which compute in that dtype.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

TOLERANCE = 1e-5    # max |kernel - mx.quantized_matmul| / max |mx.quantized_matmul| in the self-check
CHECK_ROWS = (1, 2, 5)  # activation rows the self-check runs: both drivers, and a row count the tiles split

# numba's thread pool (GNU OpenMP) spins after each parallel region, 300,000 pauses by default (~20 ms on the
# 2-core VM). The spinning threads take the cores from whatever runs next: the prompt's BLAS threads (prefill
# 159 against 262 tok/s), the node's event loop, and on a machine shared by several daemons the next
# stage (3 nodes on one VM: 0.73x one node's decode). Not spinning at all makes every region wait for a
# sleeping thread. 20,000 pauses (~1 ms) bridge the gaps between the regions of one forward and no more:
# 3 nodes 0.85-0.87x. A node whose peers all run on its own machine (bound to loopback) shares the cores
# with the next stage, which starts a hop (~0.3 ms here) after this one ends: 2,000 pauses (~0.1 ms) end
# the spinning before that (3 nodes 0.88-0.93x in A/B runs; one process's decode 3% slower, so only
# there). Read when libgomp loads, which is when numba starts its threads: set by then (share_cores).
SPIN_ALONE, SPIN_SHARED = "20000", "2000"
_SPIN_GIVEN = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
if not _SPIN_GIVEN:
    os.environ["GOMP_SPINCOUNT"] = SPIN_ALONE

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

_state: dict = {"enabled": None, "why": "", "target": "", "threads": CORES, "formats": {}}


def target() -> str:
    """What numba compiles for: 'avx512' (the kernels' AVX-512 code, cpu_simd.PERMUTE), 'avx2' or the CPU
    name it was told (NUMBA_CPU_NAME)."""
    import numba
    from llvmlite import binding

    from kernels import cpu_simd

    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return numba.config.CPU_NAME
    if cpu_simd.PERMUTE:
        return "avx512"
    return "avx2" if binding.get_host_cpu_features().get("avx2") else binding.get_host_cpu_name()


def enabled() -> bool:
    """True once numba imported and the 4-bit and float32 kernels passed their self-check (run once)."""
    if _state["enabled"] is None:
        try:
            import numba  # noqa: F401
        except ImportError:
            _state.update(enabled=False, why="numba is not installed (pip install 'cake-swarm[cpu]')")
            return False
        _state["target"] = target()
        set_threads(_state["threads"])
        checks = [check_format(4), check_format(32)]
        _state["enabled"] = all(ok for ok, _ in checks)
        _state["why"] = "; ".join(why for _, why in checks)
    return _state["enabled"]


def check_format(bits: int) -> tuple[bool, str]:
    """(passed, what was measured) for one weight format (32: float32), checked once per process."""
    if bits not in _state["formats"]:
        try:
            _state["formats"][bits] = _self_check(bits)
        except Exception as e:  # a kernel that does not compile or run leaves MLX's in place
            _state["formats"][bits] = (False, f"{_format_name(bits)}: self-check failed: {type(e).__name__}: {e}")
    return _state["formats"][bits]


def _format_name(bits: int) -> str:
    return "float32" if bits == 32 else f"{bits}-bit"


def _self_check(bits: int) -> tuple[bool, str]:
    from kernels import cpu_matmul

    rng = np.random.default_rng(bits)
    out_dim, in_dim, group_size = 37, 256, 64
    w = mx.array(rng.standard_normal((out_dim, in_dim), np.float32) * 0.05)
    if bits == 32:
        plan = cpu_matmul.dense_plan(np.asarray(w))
    else:
        q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
        plan = cpu_matmul.quantized_plan(np.asarray(q), np.asarray(s), np.asarray(b), group_size, bits)
    worst, row_independent = 0.0, True
    for rows in CHECK_ROWS:
        x = mx.array(rng.standard_normal((rows, in_dim), np.float32))
        ref = np.asarray(x @ w.T if bits == 32 else
                         mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits))
        y = plan(np.asarray(x), _state["threads"])
        worst = max(worst, float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))))
        row_independent &= np.array_equal(y[-1:], plan(np.asarray(x)[-1:], 1))
    ok = worst <= TOLERANCE and row_independent
    verdict = "passed" if ok else "FAILED" + ("" if row_independent else " (a row's result depends on the rows beside it)")
    return ok, f"{_format_name(bits)} {verdict} against MLX (rel. error {worst:.1e})"


def share_cores(shared: bool) -> None:
    """Whether this process shares the machine's cores with the other stages of its pipeline (every peer
    on this machine): the kernel threads then spin SPIN_SHARED pauses after a region. Call it before the
    first kernel runs; a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if not _SPIN_GIVEN:
        os.environ["GOMP_SPINCOUNT"] = SPIN_SHARED if shared else SPIN_ALONE


def set_threads(n: int) -> None:
    """Run the kernels on n threads (at most the cores numba was started with)."""
    _state["threads"] = max(1, int(n))
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(_state["threads"], numba.config.NUMBA_NUM_THREADS))


def threads() -> int:
    return _state["threads"]


def _spin() -> str:
    if "OMP_WAIT_POLICY" in os.environ:
        return f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    return f", spinning {os.environ.get('GOMP_SPINCOUNT')} pauses after a region"


def describe() -> dict:
    """{"linear": "cpu-numba-<target>" or "mlx", "why": ...}: which kernels the CPU linears run, and why."""
    if not enabled():
        return {"linear": "mlx", "why": _state["why"]}
    return {"linear": f"cpu-numba-{_state['target']}", "why": f"{_state['why']}; {_state['threads']} threads{_spin()}"}


def plan(weight: mx.array, scales: mx.array | None, biases: mx.array | None, group_size: int, bits: int):
    """A cpu_matmul.Plan over a layer's evaluated tensors (numpy views, no copy), or None to keep MLX's kernel."""
    if not enabled():
        return None
    from kernels import cpu_matmul

    if (scales if scales is not None else weight).dtype != mx.float32:  # a stage computing in half precision
        return None
    if scales is None:
        return cpu_matmul.dense_plan(np.asarray(weight))
    if not check_format(bits)[0]:
        return None
    return cpu_matmul.quantized_plan(np.asarray(weight), np.asarray(scales), np.asarray(biases), group_size, bits)


def matmul(plan, x: mx.array) -> mx.array | None:
    """x (..., in) @ W.T through the plan, or None where it does not apply (x not float32)."""
    if x.dtype != mx.float32:
        return None
    mx.eval(x)
    y = plan(np.asarray(x).reshape(-1, plan.in_dim), _state["threads"])
    return mx.array(y).reshape(*x.shape[:-1], plan.out_dim)


if __name__ == "__main__":  # python -m kernels.cpu_path: compile (or load) every kernel once, say what runs
    print(describe())
    print({bits: check_format(bits)[1] for bits in (2, 3, 5, 6, 8)})
