"""CPU burner for tests/test_python_frames.py, run by the interpreter under
test. The main thread calls a() and b() 3:1 (same work per call) through
outer() -> middle(); via_c() reaches key() through sorted(), a C function.
With "threads", two more threads run: spin() (pure Python, competes for the
GIL) and digest() (hashlib on a large buffer, without the GIL). Lines the
test checks are marked "# hot: NAME". Prints one JSON line of thread ids,
then runs for argv[1] seconds."""
import hashlib
import json
import sys
import threading
import time

N = 20000


def a(n):
    x = 0
    for i in range(n):  # hot: a
        x += i * i  # hot: a
    return x


def b(n):
    x = 0
    for i in range(n):  # hot: b
        x += i * i  # hot: b
    return x


def middle(f, n):
    return f(n)


def outer(f, n):
    return middle(f, n)


def key(v):
    x = 0
    for i in range(200):  # hot: key
        x += i  # hot: key
    return -v


def via_c():
    return sorted(range(50), key=key)


def spin(deadline):
    x = 0
    while time.monotonic() < deadline:  # hot: spin
        x += 1  # hot: spin
    return x


def digest(deadline):
    buf = b"x" * (1 << 20)
    while time.monotonic() < deadline:
        hashlib.sha256(buf).digest()  # hot: digest


def main_loop(deadline):
    while time.monotonic() < deadline:
        outer(a, N)
        outer(a, N)
        outer(a, N)
        outer(b, N)
        via_c()


if __name__ == "__main__":
    end = time.monotonic() + float(sys.argv[1])
    ids = {"main": threading.get_native_id()}
    if len(sys.argv) > 2 and sys.argv[2] == "threads":
        started = {}
        for name, fn in (("spin", spin), ("digest", digest)):
            t = threading.Thread(target=lambda fn=fn, name=name: (started.__setitem__(name, threading.get_native_id()),
                                                                 fn(end)), daemon=True)
            t.start()
        while len(started) < 2:
            time.sleep(0.001)
        ids.update(started)
    print(json.dumps(ids), flush=True)
    main_loop(end)
