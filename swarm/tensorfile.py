"""Safetensors headers, read without touching tensor data.

The one place that parses the safetensors container: the engine loads tensors through the byte ranges
found here, and shards are cut from the same ranges. Every malformed header is a `TensorFileError`
that names the file (and the tensor), refused before anything large is read into memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


class TensorFileError(ValueError):
    """A checkpoint or shard file that is missing, truncated, corrupt or lacks what is asked of it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str          # absolute path of the .safetensors file
    dtype: str         # safetensors dtype code: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    start: int         # absolute byte offset of the data in `file`
    end: int           # exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_header(raw: bytes, file: str, data_start: int, file_size: int | None = None) -> tuple[dict[str, TensorInfo], dict]:
    """Validate a header's JSON bytes; returns tensors by name (file order) and the metadata."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also: nesting too deep, an int of over 4300 digits
        raise TensorFileError(f"{file}: header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{file}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{file}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise TensorFileError(f"{where}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise TensorFileError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise TensorFileError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise TensorFileError(f"{where}: bad data_offsets {offsets!r}")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[dtype]:
            raise TensorFileError(f"{where}: {offsets[1] - offsets[0]} bytes stored for shape {shape} of {dtype}")
        start, end = data_start + offsets[0], data_start + offsets[1]
        if file_size is not None and end > file_size:
            raise TensorFileError(f"{where}: data ends at byte {end} but the file has {file_size} (truncated?)")
        tensors[name] = TensorInfo(name, file, dtype, tuple(shape), start, end)
    return tensors, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Tensors of one .safetensors file by name, and its __metadata__; reads only the header."""
    file = os.path.abspath(os.fspath(path))
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TensorFileError(f"{file}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise TensorFileError(f"{file}: header length {n} is impossible for a file of {size} bytes "
                                      "(truncated, or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise TensorFileError(f"{file}: cannot read ({e.strerror})") from None
    return parse_header(raw, file, 8 + n, size)
