"""Tensors on the wire: the protobuf `Tensor` / `BatchedTensor` and the JSON `TensorData`, as numpy.

Sparse CSR tensors (the SDK sparsifies 2-D targets and weights when that is smaller) are
densified here, with unlisted cells 0 (or the caller's `fill`). Errors name the field they were
decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinkerd.protocol.numbers import INT64_MAX, int_list
from tinkerd.protocol.types import BadRequest
from tinkerd.protocol.wire_pb import pb

_PB_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_JSON_DTYPES = {"float32": np.float32, "int64": np.int64}
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024  # the default --max-decompressed-bytes


@dataclass(frozen=True)
class Bounds:
    """What a decoded tensor may declare, checked before anything is allocated: its number of rows (a loss
    input has one per token of its datum), its width (at most the vocabulary), and its size once dense
    (a sparse tensor must not become more than a dense body could have carried). None: not checked."""

    rows: int | None = None
    max_cols: int | None = None
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES


def _check_shape(shape: list[int], itemsize: int, bounds: Bounds, field: str) -> None:
    if any(d < 0 for d in shape):
        raise BadRequest(f"{field}: negative dimension in shape {tuple(shape)}")
    if bounds.rows is not None and shape and shape[0] != bounds.rows:
        raise BadRequest(f"{field}: shape {tuple(shape)} has {shape[0]} rows; the datum has {bounds.rows} tokens")
    if bounds.max_cols is not None and len(shape) == 2 and shape[1] > bounds.max_cols:
        raise BadRequest(f"{field}: shape {tuple(shape)} is wider than the vocabulary ({bounds.max_cols})")
    if math.prod(shape) * itemsize > bounds.max_bytes:
        raise BadRequest(f"{field}: shape {tuple(shape)} would take {math.prod(shape) * itemsize} bytes, over the "
                         f"server's limit of {bounds.max_bytes} (--max-decompressed-bytes)")


def _shaped(values: np.ndarray, shape: list[int], field: str, bounds: Bounds) -> np.ndarray:
    if not shape:
        return values
    _check_shape(shape, values.itemsize, bounds, field)
    if math.prod(shape) != values.size:
        raise BadRequest(f"{field}: {values.size} values do not fill shape {tuple(shape)}")
    return values.reshape(shape)


def _densify(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str,
             bounds: Bounds, fill: int = 0) -> np.ndarray:
    if len(shape) != 2:
        raise BadRequest(f"{field}: a sparse CSR tensor needs a 2-D shape, got {tuple(shape)}")
    _check_shape(shape, values.itemsize, bounds, field)
    rows, cols = shape
    if (len(crow) != rows + 1 or len(col) != len(values) or (len(col) and (col.min() < 0 or col.max() >= cols))
            or crow[0] != 0 or crow[-1] != len(col) or (np.diff(crow) < 0).any()):
        raise BadRequest(f"{field}: inconsistent sparse CSR indices for shape {tuple(shape)}")
    dense = np.full(shape, fill, dtype=values.dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense


def tensor_from_pb(msg, field: str, bounds: Bounds = Bounds()) -> np.ndarray:
    dtype = _PB_DTYPES.get(msg.dtype)
    if dtype is None:
        raise BadRequest(f"{field}: unsupported dtype enum {msg.dtype}")
    shape = list(msg.shape)
    try:
        if msg.HasField("sparse_csr"):
            csr = msg.sparse_csr
            values = np.frombuffer(csr.values, dtype=dtype)
            crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(csr.col_indices, dtype=np.int64)
            return _densify(values, crow, col, shape, field, bounds)
        return _shaped(np.frombuffer(msg.dense, dtype=dtype).copy(), shape, field, bounds)
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"{field}: {exc}") from exc


def tensor_from_json(obj, field: str, fill: int = 0, bounds: Bounds = Bounds()) -> np.ndarray:
    if not isinstance(obj, dict) or "data" not in obj:
        raise BadRequest(f"{field}: expected a TensorData object with 'data' and 'dtype'")
    dtype = _JSON_DTYPES.get(obj.get("dtype", "float32"))
    if dtype is None:
        raise BadRequest(f"{field}.dtype must be 'float32' or 'int64', got {obj.get('dtype')!r}")
    values = _json_array(obj["data"], dtype, f"{field}.data")
    shape = int_list(obj.get("shape") or [], f"{field}.shape", 0, INT64_MAX)
    if obj.get("sparse_crow_indices") is not None:
        crow = _json_array(obj["sparse_crow_indices"], np.int64, f"{field}.sparse_crow_indices")
        col = _json_array(obj.get("sparse_col_indices") or [], np.int64, f"{field}.sparse_col_indices")
        return _densify(values, crow, col, shape, field, bounds, fill)
    return _shaped(values, shape, field, bounds)


def _json_array(data, dtype, field: str) -> np.ndarray:
    """A flat numpy array of a JSON list of numbers (nested lists are flattened); strings, booleans and
    numbers the dtype cannot hold are refused, naming the field."""
    if not isinstance(data, list):
        raise BadRequest(f"{field}: expected a list of numbers")
    try:
        values = np.asarray(data)
        if values.dtype.kind not in "iuf" and values.size:
            raise ValueError(f"expected numbers, got {values.dtype.kind!r} values")
        if dtype == np.int64 and values.dtype.kind == "f" and values.size and not np.all(np.mod(values, 1) == 0):
            raise ValueError("expected integers")
        return values.astype(dtype, casting="unsafe" if values.dtype.kind == "f" else "same_kind").reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"{field}: {exc}") from exc


def csr_layout(obj) -> tuple[np.ndarray, np.ndarray] | None:
    """The (crow, col) indices of a sparse JSON TensorData, to answer in the same layout; None if dense."""
    if not isinstance(obj, dict) or obj.get("sparse_crow_indices") is None:
        return None
    return np.asarray(obj["sparse_crow_indices"], dtype=np.int64), np.asarray(obj.get("sparse_col_indices") or [], dtype=np.int64)


def tensor_to_pb(array: np.ndarray, out, csr: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Fill a `Tensor`: dense, or the cells `csr` lists (crow, col) of a 2-D array."""
    dtype = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.int64): pb.DTYPE_INT64,
             np.dtype(np.int32): pb.DTYPE_INT32}[array.dtype]
    out.dtype = dtype
    out.shape.extend(array.shape)
    if csr is None:
        out.dense = np.ascontiguousarray(array).tobytes()
        return
    crow, col = csr
    rows = np.repeat(np.arange(array.shape[0]), np.diff(crow))
    out.sparse_csr.values = np.ascontiguousarray(array[rows, col]).tobytes()
    out.sparse_csr.crow_indices = crow.astype("<i8").tobytes()
    out.sparse_csr.col_indices = col.astype("<i8").tobytes()


def batched_tensor_to_pb(arrays: list[np.ndarray], out) -> None:
    """Fill a `BatchedTensor`: datums concatenated, int64 byte offsets, shared trailing shape."""
    dtype = {np.dtype(np.float32): pb.DTYPE_FLOAT32, np.dtype(np.int64): pb.DTYPE_INT64}[arrays[0].dtype]
    chunks = [np.ascontiguousarray(a).tobytes() for a in arrays]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    out.data = b"".join(chunks)
    out.offsets = offsets.tobytes()
    out.dtype = dtype
    out.trailing_shape.extend(arrays[0].shape[1:])
