"""Where a checkpoint's tensors are, and reading one of them.

A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`, or (a swarm shard)
one reduced `.safetensors` file. Only headers are read up front; each tensor is read by its byte range
when a stage asks for it, so a stage never reads the layers it does not hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from swarm.model.config import ModelError
from swarm.tensorfile import TensorFileError, TensorInfo, read_header

NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
    "BF16": np.uint16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
    "F64": np.float64,
}


def tensor_index(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint folder by name, from the safetensors headers alone."""
    folder = Path(model_dir)
    index_path = folder / "model.safetensors.index.json"
    try:
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelError(f"{index_path}: not a safetensors index ({e})") from None
            tensors: dict[str, TensorInfo] = {}
            for file in sorted(set(weight_map.values())):
                if not (folder / file).exists():
                    raise ModelError(f"{folder / file}: listed in {index_path.name} but missing")
                tensors.update(read_header(folder / file)[0])
            for name, file in weight_map.items():
                if name not in tensors or Path(tensors[name].file).name != file:
                    raise ModelError(f"{folder / file}: tensor {name!r} listed in {index_path.name} is not in the file")
            return tensors
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no .safetensors files")
        tensors = {}
        for file in files:
            tensors.update(read_header(file)[0])
        return tensors
    except TensorFileError as e:
        raise ModelError(str(e)) from None


def read_tensor(info: TensorInfo) -> mx.array:
    """One tensor's bytes, read from its file as an MLX array of the stored dtype."""
    if info.dtype not in NUMPY_DTYPES:
        raise ModelError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, which the engine does not load")
    try:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
    except OSError as e:
        raise ModelError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror})") from None
    if len(data) != info.nbytes:
        raise ModelError(f"{info.file}: tensor {info.name!r} is truncated ({len(data)} of {info.nbytes} bytes)")
    array = mx.array(np.frombuffer(data, dtype=NUMPY_DTYPES[info.dtype]).reshape(info.shape))
    return array.view(mx.bfloat16) if info.dtype == "BF16" else array


def stored_float_dtype(tensors: dict[str, TensorInfo]) -> mx.Dtype:
    """The checkpoint's float dtype (of its norms, scales and dense weights): the GPU compute dtype."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.dtype in ("F16", "BF16", "F32"):
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    if not counts:
        return mx.float32
    return {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32}[max(counts, key=counts.get)]
