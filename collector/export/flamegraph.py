"""Profile records -> one self-contained interactive HTML flame graph.

The page inlines everything it needs (no network when opened): the profile as
JSON, the page's own script and style (flamegraph_assets/flamegraph.html), and
the renderer, d3-flame-graph with d3, vendored into flamegraph_assets/vendor/
by `make flamegraph-assets` from the versions pinned in
tools/flamegraph-vendor/package-lock.json (never committed).
"""
from __future__ import annotations

import html
import json
import re
from importlib import resources

from .pprof import frame_label

# Vendored files, in the order the page loads them, and the license texts it carries.
VENDOR_SCRIPTS = ("d3.min.js", "d3-flamegraph.min.js")
VENDOR_LICENSES = (("d3 (ISC)", "LICENSE.d3"), ("d3-flame-graph (Apache-2.0)", "LICENSE.d3-flame-graph"))
_SLOT = re.compile(r"/\*@(\w+)@\*/")


class FlameGraphUnavailable(RuntimeError):
    """The renderer's files are not installed in this copy of otelbpf."""


def profile_tree(profiles: list) -> dict:
    """The page's data: per process, a tree of frames (root first) whose
    `value` is the samples in that frame and below it."""
    procs: dict = {}
    for prof in profiles:
        for smp in prof.samples:
            pid = smp.attributes.get("process.pid")
            name = str(smp.attributes.get("process.executable.name", "?"))
            proc = procs.get(pid)
            if proc is None:
                label = f"{name} (pid {pid})" if pid is not None else name
                proc = procs[pid] = {"pid": pid, "name": name, "threads": set(),
                                     "tree": {"name": label, "value": 0, "children": {}}}
            if "thread.name" in smp.attributes:
                proc["threads"].add(str(smp.attributes["thread.name"]))
            node = proc["tree"]
            node["value"] += smp.count
            for f in reversed(smp.frames):  # frames are leaf first
                key = (frame_label(f), f.kernel)
                child = node["children"].get(key)
                if child is None:
                    child = node["children"][key] = {"name": key[0], "value": 0, "children": {}}
                    if f.kernel:
                        child["libtype"] = "kernel"
                child["value"] += smp.count
                node = child
    out = []
    for proc in sorted(procs.values(), key=lambda p: -p["tree"]["value"]):
        out.append({"pid": proc["pid"], "name": proc["name"], "threads": sorted(proc["threads"]),
                    "samples": proc["tree"]["value"], "tree": _lists(proc["tree"])})
    first = profiles[0] if profiles else None
    return {
        "samples": sum(p["samples"] for p in out),
        "duration_s": round(sum(p.duration_ns for p in profiles) / 1e9, 3),
        "period_ns": first.period_ns if first else 0,
        "processes": out,
    }


def _lists(node: dict) -> dict:
    """Children dicts -> lists sorted by name (a stable, alphabetical layout, as flamegraph.pl draws)."""
    kids = sorted(node["children"].values(), key=lambda c: c["name"])
    return {**node, "children": [_lists(c) for c in kids]}


def script_json(obj) -> str:
    """JSON that is safe inside <script>: '<', '>' and '&' become \\u escapes, so
    a function named `</script>` or `operator<<` cannot end the element or
    start a comment; JSON.parse gives the original text back."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(*parts: str) -> str:
    path = resources.files(__package__) / "flamegraph_assets"
    for part in parts:
        path = path / part
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlameGraphUnavailable(
            f"the flame graph renderer is not installed ({'/'.join(parts)} missing): "
            "run `make flamegraph-assets` in the otelbpf checkout") from None


def check_renderer() -> None:
    """Raise FlameGraphUnavailable unless every file the page inlines is installed."""
    _asset("flamegraph.html")
    for name in VENDOR_SCRIPTS + tuple(f for _, f in VENDOR_LICENSES):
        _asset("vendor", name)


def _inline_script(code: str, name: str) -> str:
    # A vendored file that held "</script" or "<!--" would end or confuse the
    # element it is inlined into; the pinned versions hold neither.
    if re.search(r"</script|<!--", code, re.IGNORECASE):
        raise FlameGraphUnavailable(f"{name} cannot be inlined: it contains '</script' or '<!--'")
    return code


def render_html(profiles: list, title: str = "otelbpf CPU profile") -> str:
    """The whole page as one string."""
    slots = {
        "TITLE": html.escape(title),
        "VENDOR": "\n".join(f"<script>{_inline_script(_asset('vendor', n), n)}</script>" for n in VENDOR_SCRIPTS),
        "DATA": script_json({"title": title, **profile_tree(profiles)}),
        "LICENSES": "\n".join(f"<h3>{html.escape(label)}</h3><pre>{html.escape(_asset('vendor', f))}</pre>"
                              for label, f in VENDOR_LICENSES),
    }
    # One pass, so text put into one slot is never scanned for another slot.
    return _SLOT.sub(lambda m: slots[m.group(1)], _asset("flamegraph.html"))
