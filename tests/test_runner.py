"""The model runner's shape buckets."""
from __future__ import annotations


def test_shape_buckets_are_few_and_tight():
    # Forwards are padded to shape_bucket token counts and bf16 attention to width_bucket
    # widths, so the GEMM shapes oneDNN keeps state for stay a small, fixed set.
    from baton.attention import width_bucket
    from baton.runner import shape_bucket

    for bucket, worst in ((shape_bucket, 1.07), (width_bucket, 1.25)):
        sizes = [bucket(n) for n in range(1, 2049)]
        assert all(n <= s <= max(n * worst, n + 15) for n, s in zip(range(1, 2049), sizes))
        assert all(bucket(s) == s for s in sizes)  # a bucket is its own bucket
    assert len(set(shape_bucket(n) for n in range(1, 2049))) <= 100
    assert len(set(width_bucket(n) for n in range(1, 2049))) <= 30
