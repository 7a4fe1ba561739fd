"""Self-telemetry helpers."""
from __future__ import annotations


def test_drop_warnings_are_rate_limited():
    import logging

    from collector.records import Counter
    from collector.selftelemetry import DropWarner, dropped

    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    log = logging.getLogger("test.dropwarner")
    log.addHandler(Capture())
    w = DropWarner(log, every=60)
    w.check([dropped("p", "ring_full", 0, 0)], now=0)
    assert lines == []                       # nothing dropped: nothing said
    w.check([dropped("p", "ring_full", 5, 0)], now=1)
    w.check([dropped("p", "ring_full", 9, 0)], now=30)
    assert len(lines) == 1 and "5 events dropped (ring_full)" in lines[0]
    w.check([dropped("p", "ring_full", 12, 0)], now=62)
    assert len(lines) == 2 and "7 events dropped" in lines[1] and "total 12" in lines[1]
    w.check([Counter(dropped("p", "x", 1, 0).instrument, {"otelbpf.probe": "q", "reason": "y"}, 3, 0)], now=63)
    assert len(lines) == 3                   # another reason has its own clock
