"""Range arithmetic (RFC 9110 s14) against a brute-force model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from mcc.engine.blocks import block_bounds, block_count, blocks_for_range
from mcc.http.ranges import UNSATISFIABLE, ByteRange, if_range_matches, parse_range
from tests.strategies import range_headers


def _model(specs: list[tuple[int | None, int | None]], size: int) -> set[int] | None:
    """The set of byte offsets a list of (first, last) specs selects."""
    selected: set[int] = set()
    for a, b in specs:
        if a is None:
            assert b is not None
            selected |= set(range(max(0, size - b), size)) if b else set()
        else:
            selected |= set(range(a, min(size, (b if b is not None else size - 1) + 1)))
    return selected


@given(
    st.integers(0, 300),
    st.lists(
        st.tuples(st.integers(0, 400), st.one_of(st.none(), st.integers(0, 400))).map(
            lambda t: t if t[1] is None or t[1] >= t[0] else (t[1], t[0])
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(0, 400), max_size=2),
)
def test_parse_range_selects_what_the_model_selects(
    size: int, specs: list[tuple[int, int | None]], suffixes: list[int]
) -> None:
    parts = [f"{a}-{'' if b is None else b}" for a, b in specs] + [f"-{n}" for n in suffixes]
    result = parse_range("bytes=" + ", ".join(parts), size)
    model = _model([*specs, *((None, n) for n in suffixes)], size)
    if not model:
        assert result is UNSATISFIABLE
        return
    assert isinstance(result, list)
    got: set[int] = set()
    for r in result:
        assert 0 <= r.start <= r.end < size
        got |= set(range(r.start, r.end + 1))
    assert got == model
    # merged: sorted, neither overlapping nor adjacent
    for x, y in itertools.pairwise(result):
        assert x.end + 1 < y.start


@given(range_headers, st.integers(0, 10**7))
def test_any_range_header_never_raises(header: str, size: int) -> None:
    result = parse_range(header, size)
    assert result is None or result is UNSATISFIABLE or isinstance(result, list)


def test_range_examples() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-", 0) is UNSATISFIABLE
    assert parse_range("bytes=999999999-", 100) is UNSATISFIABLE
    assert parse_range("bytes=-0", 100) is UNSATISFIABLE
    assert parse_range("bytes=5-1", 100) is None  # invalid: ignored
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=0-1,", 100) == [ByteRange(0, 1)]
    assert parse_range("BYTES=0-1", 100) == [ByteRange(0, 1)]
    assert parse_range("bytes=0-1,2-3", 100) == [ByteRange(0, 3)]  # adjacent merge
    assert parse_range("bytes=" + ",".join(["0-0"] * 33), 100) is None  # too many
    assert parse_range("bytes=-500", 100) == [ByteRange(0, 99)]


def test_if_range() -> None:
    assert if_range_matches('"a"', '"a"', None)
    assert not if_range_matches('W/"a"', 'W/"a"', None)  # weak never matches
    assert not if_range_matches('"a"', 'W/"a"', None)
    assert if_range_matches("Sat, 21 Nov 2026 10:00:00 GMT", None, "Sat, 21 Nov 2026 10:00:00 GMT")
    assert not if_range_matches(
        "Sat, 21 Nov 2026 10:00:01 GMT", '"a"', "Sat, 21 Nov 2026 10:00:00 GMT"
    )


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from([65536, 131072, 1 << 20]))
def test_blocks_cover_exactly_the_range(a: int, b: int, bs: int) -> None:
    start, end = min(a, b), max(a, b)
    size = end + 1
    blocks = blocks_for_range(start, end, bs)
    covered = [block_bounds(i, bs, size) for i in blocks]
    assert covered[0][0] <= start < covered[0][1]
    assert covered[-1][0] <= end < covered[-1][1]
    for (_, e1), (s2, _) in itertools.pairwise(covered):
        assert e1 == s2
    assert blocks.stop <= block_count(size, bs)
