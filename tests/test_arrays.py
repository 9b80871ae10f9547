"""Arrow arrays built from buffers (llmsql.arrays) equal what pyarrow's converters build."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from llmsql.arrays import from_values, int64s, ints, large_binary_scalar, large_strings

WORDS = ["", "a", "é", "😀 x", "line\nbreak", "nul\x00byte", "long " * 40]


@pytest.mark.parametrize("seed", range(20))
def test_strings_and_values_equal_pa_array(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    texts = [rng.choice([*WORDS, None]) for _ in range(n)]
    assert large_strings(texts).equals(
        pa.array([t or "" for t in texts], type=pa.large_string()))
    assert from_values(texts, pa.string()).equals(pa.array(texts, type=pa.string()))
    flags = [rng.choice([True, False, None]) for _ in range(n)]
    assert from_values(flags, pa.bool_()).equals(pa.array(flags, type=pa.bool_()))
    numbers = [rng.randrange(-2**40, 2**40) for _ in range(n)]
    assert int64s(numbers).equals(pa.array(numbers, type=pa.int64()))


@pytest.mark.parametrize("kind", [pa.int8(), pa.int32(), pa.int64(), pa.uint32(), pa.uint64()])
def test_ints_reads_every_integer_width_and_slices(kind: pa.DataType) -> None:
    values = pa.array([0, 1, 7, 100, 3], type=kind)
    assert ints(values).tolist() == [0, 1, 7, 100, 3]
    assert ints(values.slice(2, 2)).tolist() == [7, 100]
    assert ints(values.slice(5)).tolist() == []
    assert ints(values).dtype == np.int64


def test_ints_refuses_nulls_and_other_types() -> None:
    with pytest.raises(TypeError, match="without nulls"):
        ints(pa.array([1, None]))
    with pytest.raises(TypeError, match="integer arrays"):
        ints(pa.array([1.5]))


def test_other_types_go_through_pa_array() -> None:
    assert from_values([{"a": 1}, None], pa.struct([("a", pa.int64())])).to_pylist() == [
        {"a": 1}, None]
    with pytest.raises(pa.ArrowInvalid):  # not bools: pa.array's own error
        from_values([1, None], pa.bool_())
    assert large_binary_scalar(b"\n\x00").as_py() == b"\n\x00"
