"""Tensors on the wire: the protobuf `Tensor` / `BatchedTensor` and the JSON `TensorData`, as numpy.

Sparse CSR tensors (the SDK sparsifies 2-D targets and weights when that is smaller) are
densified here, with unlisted cells 0 (or the caller's `fill`). Errors name the field they were
decoding.
"""

from __future__ import annotations

import numpy as np

from tinkerd.protocol.types import BadRequest
from tinkerd.protocol.wire_pb import pb

_PB_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_JSON_DTYPES = {"float32": np.float32, "int64": np.int64}


def _shaped(values: np.ndarray, shape: list[int], field: str) -> np.ndarray:
    if not shape:
        return values
    if int(np.prod(shape)) != values.size:
        raise BadRequest(f"{field}: {values.size} values do not fill shape {tuple(shape)}")
    return values.reshape(shape)


def _densify(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str,
             fill: int = 0) -> np.ndarray:
    if len(shape) != 2:
        raise BadRequest(f"{field}: a sparse CSR tensor needs a 2-D shape, got {tuple(shape)}")
    rows, cols = shape
    if len(crow) != rows + 1 or len(col) != len(values) or (len(col) and (col.min() < 0 or col.max() >= cols)):
        raise BadRequest(f"{field}: inconsistent sparse CSR indices for shape {tuple(shape)}")
    dense = np.full(shape, fill, dtype=values.dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense


def tensor_from_pb(msg, field: str) -> np.ndarray:
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
            return _densify(values, crow, col, shape, field)
        return _shaped(np.frombuffer(msg.dense, dtype=dtype).copy(), shape, field)
    except ValueError as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"{field}: {exc}") from exc


def tensor_from_json(obj, field: str, fill: int = 0) -> np.ndarray:
    if not isinstance(obj, dict) or "data" not in obj:
        raise BadRequest(f"{field}: expected a TensorData object with 'data' and 'dtype'")
    dtype = _JSON_DTYPES.get(obj.get("dtype", "float32"))
    if dtype is None:
        raise BadRequest(f"{field}.dtype must be 'float32' or 'int64', got {obj.get('dtype')!r}")
    try:
        values = np.asarray(obj["data"], dtype=dtype).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{field}.data: {exc}") from exc
    shape = list(obj.get("shape") or [])
    if obj.get("sparse_crow_indices") is not None:
        crow = np.asarray(obj["sparse_crow_indices"], dtype=np.int64)
        col = np.asarray(obj.get("sparse_col_indices") or [], dtype=np.int64)
        return _densify(values, crow, col, shape, field, fill)
    return _shaped(values, shape, field)


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
