"""Shared hypothesis strategies."""

from __future__ import annotations

from hypothesis import strategies as st

# Block sizes the engine accepts (powers of two from 64 KiB); small ones keep tests fast.
block_sizes = st.sampled_from([64 * 1024, 128 * 1024])


@st.composite
def size_and_range(draw: st.DrawFn, max_size: int = 600_000) -> tuple[int, int, int]:
    """(object size, start, end) with start..end inside the object (size >= 1)."""
    size = draw(
        st.one_of(
            st.integers(min_value=1, max_value=max_size),
            st.sampled_from([1, 2, 65535, 65536, 65537, 131072, 196608]),
        )
    )
    start = draw(st.integers(min_value=0, max_value=size - 1))
    end = draw(st.integers(min_value=start, max_value=size - 1))
    return size, start, end


range_headers = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda specs: "bytes=" + ",".join(specs),
        st.lists(
            st.one_of(
                st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 10**6), st.integers(0, 10**6)),
                st.builds(lambda a: f"{a}-", st.integers(0, 10**6)),
                st.builds(lambda n: f"-{n}", st.integers(0, 10**6)),
                st.sampled_from(["", " ", "-", "a-b", "1-2-3", "1 - 2"]),
            ),
            min_size=1,
            max_size=40,
        ),
    ),
)
