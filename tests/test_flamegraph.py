"""The HTML flame graph `otelbpf profile` writes, opened in a real browser
(headless Chromium): the page's own script must draw the frames of a profile
taken on the real kernel, mark what a search matches, narrow to one process,
and zoom; hostile function names must reach the page as text."""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest
from conftest import build_c, needs_root, run_cli
from test_cpu_profile import share_tolerance

from collector.export.flamegraph import render_html, script_json
from collector.records import Frame, Profile, ProfileSample

HIGHLIGHT = "#E600E6"  # d3-flame-graph's colour for search matches
VOID = {"input", "br", "img", "meta", "link", "hr", "source", "wbr"}  # elements without an end tag


def browser_dom(page, tmp_path, **query) -> "Dom":
    """The DOM after the page's scripts ran: Chromium loads the file and runs
    its timers for 10 s of virtual time, with every request but file:// sent
    to a dead proxy (the page must not need the network)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is not installed (make setup installs it)"
    url = page.as_uri() + ("?" + urlencode(query) if query else "")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--force-prefers-reduced-motion",  # the page then draws without animation: final at once
         "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not errors, errors
    dom = Dom()
    dom.feed(proc.stdout)
    return dom


class Dom(HTMLParser):
    """What the tests read from a dumped page: the flame graph's frames (the
    <g class="frame"> elements d3-flame-graph creates, with their rect fill
    and <title> tooltip), element texts by id, options, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.frames: list = []   # dicts: name, cls, fill, title
        self.by_id: dict = {}    # id -> text
        self.options: list = []  # (value, text)
        self.tags: list = []
        self.fetches: list = []  # src/href/data of any element: what a browser would load
        self._open: list = []    # (tag, sink) for text capture

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.fetches += [a[k] for k in ("src", "href", "data") if a.get(k)]
        if tag == "g" and "frame" in (a.get("class") or "").split():
            self.frames.append({"name": a.get("name"), "cls": a.get("class"), "fill": None, "title": ""})
        elif tag == "rect" and self.frames and self.frames[-1]["fill"] is None:
            self.frames[-1]["fill"] = a.get("fill")
        if tag == "title" and self.frames:
            self._open.append((tag, ("frame", self.frames[-1])))
        elif tag == "option":
            self.options.append([a.get("value"), ""])
            self._open.append((tag, ("option", self.options[-1])))
        elif "id" in a and tag not in VOID:
            self.by_id[a["id"]] = ""
            self._open.append((tag, ("id", a["id"])))

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        for _tag, (kind, sink) in self._open:
            if kind == "frame":
                sink["title"] += data
            elif kind == "option":
                sink[1] += data
            else:
                self.by_id[sink] += data

    def named(self, name) -> list:
        return [f for f in self.frames if f["name"] == name]

    def samples(self, name) -> int:
        """Samples in every frame of this name, read from their tooltips."""
        return sum(int(re.search(r"(\d+) samples", f["title"]).group(1)) for f in self.named(name))


def folded_samples(folded: str, function: str) -> int:
    """Samples whose stack holds `function`, from the folded-stacks file (another writer)."""
    total = 0
    for line in folded.splitlines():
        stack, count = line.rsplit(" ", 1)
        if function in stack.split(";")[1:]:
            total += int(count)
    return total


@needs_root
def test_profile_html_in_chromium_shows_the_hot_frames_search_filter_and_zoom(tmp_path):
    binary = str(build_c("two_hot", opt="-O0"))
    # Two instances, so the process filter has something to leave out; they
    # run until the profile is written, however long the agent takes to start.
    workloads = [subprocess.Popen([binary, "60"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        pid, other = (int(w.stdout.readline()) for w in workloads)
        out, page = tmp_path / "cpu.pb.gz", tmp_path / "flame.html"
        proc = run_cli("profile", "--duration", "3", "--output", str(out), "--html", str(page))
    finally:
        for w in workloads:
            w.kill()
            w.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert f"flame graph {page}" in proc.stdout

    # Every process: both workloads, their known frames drawn with the samples
    # the folded-stacks file has for them.
    dom = browser_dom(page, tmp_path)
    roots = {f["name"] for f in dom.frames}
    assert {"all processes", f"two_hot (pid {pid})", f"two_hot (pid {other})"} <= roots
    folded = (tmp_path / "cpu.pb.gz.folded").read_text()
    for name in ("hot_a", "hot_b", "main"):
        assert dom.named(name), f"no {name} frame drawn"
        assert dom.samples(name) == folded_samples(folded, name) > 0, name
    assert any(v == str(pid) for v, _ in dom.options) and any(v == str(other) for v, _ in dom.options)

    # One process, searched: only its frames; hot_a marked, hot_b not; the
    # share the page states is the share of that process's samples.
    dom = browser_dom(page, tmp_path, pid=pid, search="hot_a")
    names = [f["name"] for f in dom.frames]
    assert names[0] == f"two_hot (pid {pid})"
    assert f"two_hot (pid {other})" not in names and "all processes" not in names
    assert all(f["fill"] == HIGHLIGHT for f in dom.named("hot_a")) and dom.named("hot_a")
    assert all(f["fill"] != HIGHLIGHT for f in dom.named("hot_b")) and dom.named("hot_b")
    total = int(re.search(r"(\d+) samples", dom.named(f"two_hot (pid {pid})")[0]["title"]).group(1))
    hot_a, hot_b = dom.samples("hot_a"), dom.samples("hot_b")
    result = dom.by_id["search-result"]
    m = re.fullmatch(r'"hot_a": (\d+) frames?, (\d+) of (\d+) samples \((\d+\.\d\d)%\)', result)
    assert m, result
    assert int(m.group(1)) == len(dom.named("hot_a"))
    assert (int(m.group(2)), int(m.group(3))) == (hot_a, total)
    assert m.group(4) == f"{100 * hot_a / total:.2f}"
    # the workload's truth: hot_a runs 3x the iterations of hot_b
    assert hot_a + hot_b >= 20, (hot_a, hot_b)
    assert abs(100 * hot_a / (hot_a + hot_b) - 75) <= share_tolerance(hot_a + hot_b), (hot_a, hot_b)

    # Zoomed into hot_a: its siblings are gone, its callers faded.
    dom = browser_dom(page, tmp_path, pid=pid, zoom="hot_a")
    assert dom.named("hot_a") and not dom.named("hot_b")
    assert all("fade" in f["cls"].split() for f in dom.named("main"))
    assert all("fade" not in f["cls"].split() for f in dom.named("hot_a"))


HOSTILE = ["</script><img src=x onerror=alert(1)>", "operator<<", 'say "hi" & \'bye\'', "<!-- x", "]]>"]


def hostile_profile() -> list:
    frames = [Frame(name, 0x1000 + i) for i, name in enumerate(HOSTILE)]  # leaf first
    samples = [
        ProfileSample({"process.pid": 7, "process.executable.name": "</script>", "thread.name": "t&t"},
                      frames + [Frame("main", 0x10)], 30),
        ProfileSample({"process.pid": 8, "process.executable.name": "plain", "thread.name": "plain"},
                      [Frame("do_syscall_64", 0xffffffff81000000, kernel=True), Frame("main", 0x10)], 10),
    ]
    return [Profile(samples, start_time_ns=0, duration_ns=2_000_000_000, period_ns=10_101_010)]


def test_hostile_names_reach_the_page_as_text(tmp_path):
    text = render_html(hostile_profile(), title="t </script> & <b>")
    # Structure: the data cannot close its element; each script closes once.
    assert "<" not in script_json({"n": HOSTILE})
    assert text.count("<script") == text.count("</script>")
    page = tmp_path / "hostile.html"
    page.write_text(text, encoding="utf-8")

    dom = browser_dom(page, tmp_path)
    names = {f["name"] for f in dom.frames}
    assert set(HOSTILE) | {"main", "do_syscall_64", "</script> (pid 7)", "plain (pid 8)"} <= names
    assert "img" not in dom.tags and "b" not in dom.tags  # nothing became markup
    # self-contained: nothing to load, before or after the scripts ran
    assert not dom.fetches and not re.search(r"<(link|iframe)\b|@import|url\(", text), dom.fetches
    assert dom.by_id["title"] == "t </script> & <b>"
    assert [t for _, t in dom.options][1].startswith("</script>, pid 7 (30 samples")
    kernel = dom.named("do_syscall_64")[0]["title"]
    assert kernel.startswith("do_syscall_64 [kernel]") and "10 samples, 25.00%" in kernel

    # A search for "<<" is a substring match, not a regular expression.
    dom = browser_dom(page, tmp_path, search="<<", pid=7)
    assert [f["name"] for f in dom.frames if f["fill"] == HIGHLIGHT] == ["operator<<"]
    assert dom.by_id["search-result"] == '"<<": 1 frame, 30 of 30 samples (100.00%)'
    assert "plain (pid 8)" not in {f["name"] for f in dom.frames}


def test_empty_profile_says_so(tmp_path):
    page = tmp_path / "empty.html"
    page.write_text(render_html([]), encoding="utf-8")
    dom = browser_dom(page, tmp_path)
    assert not dom.frames and dom.by_id["empty"].startswith("No samples")


def test_profile_rejects_an_html_path_in_a_missing_directory(tmp_path):
    proc = run_cli("profile", "--duration", "1", "--output", str(tmp_path / "p.pb.gz"),
                   "--html", str(tmp_path / "nope" / "f.html"))
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(autouse=True)
def _renderer_installed():
    from collector.export.flamegraph import FlameGraphUnavailable, check_renderer
    try:
        check_renderer()
    except FlameGraphUnavailable as e:
        pytest.fail(str(e))
