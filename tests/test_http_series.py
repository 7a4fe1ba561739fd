"""How the http probe turns kernel histogram reads into series, on values
staged as the kernel writes them (no kernel needed for the arithmetic)."""
from __future__ import annotations

from probes.http import _HIST, _KEY, NBUCKETS, OVERFLOW_TGID, ROLE_SERVER, SEM_BOUNDS, HttpProbe


def _probe() -> HttpProbe:
    p = HttpProbe.__new__(HttpProbe)
    p.config = {"max_series": 10, "per_pid": False}
    p._series, p._series_overflow, p._last_tick_ns = {}, 0, 0
    return p


def _hist(count: int, sum_ns: int, bucket: int = -1) -> bytes:
    log2 = [0] * NBUCKETS
    sem = [0] * (len(SEM_BOUNDS) + 1)
    if bucket >= 0:
        log2[bucket] = count
        sem[0] = count
    return _HIST.pack(count, sum_ns, *log2, *sem, b"nginx")


def test_a_sum_read_before_its_bucket_is_kept():
    """The kernel adds count, then sum, then the buckets: a read between the
    sum and the bucket must not lose that request's duration."""
    p = _probe()
    kb = _KEY.pack(OVERFLOW_TGID, 200, 80, ROLE_SERVER, 1, 0, 2, b"\0" * 16, 0, 0)
    first = _hist(1, 1_000_000, bucket=21)
    seen = p._add_delta(kb, first, None)
    assert seen == first
    mid = _HIST.pack(2, 3_000_000, *_HIST.unpack(first)[2:])      # count and sum moved, no bucket yet
    seen = p._add_delta(kb, mid, seen)
    assert seen == first                                          # nothing taken from that read
    done = _hist(2, 3_000_000, bucket=21)
    assert p._add_delta(kb, done, seen) == done
    (series,) = p._series.values()
    assert sum(series.log2) == 2 and series.sum_ns == 3_000_000
