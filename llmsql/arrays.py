"""Arrow arrays from Python and numpy values, and back, without importing pandas.

pyarrow imports pandas, when it is installed, the first time it converts Python or numpy
values (``pa.array``, ``pa.scalar``, ``Array.to_numpy``): it probes them for pandas types.
That import took 0.21 s of ``llmsql explain`` on a 2-core machine (a tenth of its target,
issue 12 item 3) for no use, since llmsql never hands pyarrow a pandas object on those
paths. The helpers here build arrays from their buffers (the Arrow columnar layout) and
read integer arrays as numpy views, so the optimizer and the LLM step never trigger it;
values they do not cover go through ``pa.array`` as before.

>>> int64s([3, 1, 2]).to_pylist(), large_strings(["a", None, "é"]).to_pylist()
([3, 1, 2], ['a', '', 'é'])
>>> ints(int64s([5, 6]).slice(1)).tolist()
[6]
>>> from_values([True, None, False], pa.bool_()).to_pylist()
[True, None, False]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray


def int64s(values: Sequence[int] | NDArray[Any], /) -> pa.Array:
    """An ``int64`` array of ``values`` (Python ints or a numpy array; no nulls)."""
    data = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])


def ints(array: pa.Array, /) -> NDArray[np.int64]:
    """An integer array without nulls as int64 numpy (read from its data buffer)."""
    kind = array.type
    if not pa.types.is_integer(kind) or array.null_count:
        msg = f"ints() reads integer arrays without nulls, got {kind} with {array.null_count}"
        raise TypeError(msg)
    width = kind.bit_width // 8
    dtype = np.dtype(f"<{'i' if pa.types.is_signed_integer(kind) else 'u'}{width}")
    data = array.buffers()[1]
    if data is None or not len(array):
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(data, dtype=dtype, count=len(array),
                         offset=array.offset * width).astype(np.int64)


def large_strings(values: Sequence[str | None], /) -> pa.Array:
    """A ``large_string`` array of ``values`` (None becomes the empty string)."""
    texts = values if None not in values else ["" if v is None else v for v in values]
    data = list(map(str.encode, texts))  # UTF-8
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=len(data)), out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(data),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def large_binary_scalar(value: bytes, /) -> pa.Scalar:
    """A ``large_binary`` scalar (``pa.scalar`` would probe for pandas)."""
    offsets = np.array([0, len(value)], dtype=np.int64)
    array = pa.Array.from_buffers(pa.large_binary(), 1,
                                  [None, pa.py_buffer(offsets), pa.py_buffer(value)])
    return array[0]


def _validity(values: Sequence[Any]) -> tuple[pa.Buffer | None, int]:
    """The validity bitmap of ``values`` (None: null) and the null count."""
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    if not nulls:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def from_values(values: Sequence[Any], kind: pa.DataType, /) -> pa.Array:
    """``pa.array(values, type=kind)`` for booleans and strings (None is null), built from
    buffers; other types go through ``pa.array``.
    """
    if pa.types.is_boolean(kind) and all(v is None or isinstance(v, bool) for v in values):
        validity, nulls = _validity(values)
        bits = np.fromiter((v is True for v in values), dtype=bool, count=len(values))
        data = pa.py_buffer(np.packbits(bits, bitorder="little"))
        return pa.Array.from_buffers(kind, len(values), [validity, data], null_count=nulls)
    if pa.types.is_string(kind) and all(v is None or isinstance(v, str) for v in values):
        validity, nulls = _validity(values)
        encoded = [b"" if v is None else v.encode("utf-8") for v in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        if offsets[-1] < 2**31:
            return pa.Array.from_buffers(
                kind, len(values),
                [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
                null_count=nulls)
    return pa.array(values, type=kind)
