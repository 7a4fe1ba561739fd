"""The `otelbpf top` screen (textual): one table per view, refreshed every
second from a source (collector/top/source.py) through the model
(collector/top/model.py). Drawing only: no numbers are computed here."""
from __future__ import annotations

import asyncio
import signal
import time

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Input, Static

from .model import Table, TopModel, sort_rows
from .source import SourceError

MIN_WIDTH, MIN_HEIGHT = 60, 10
MAX_ROWS = 500      # a table this long is scrolled, not read
POLL_S = 1.0


class TopApp(App):
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #title { height: 1; background: $primary; color: $text; text-style: bold; }
    #note { height: auto; color: $text-muted; }
    #status { height: 1; background: $panel; }
    #filter { display: none; height: 3; }
    #toosmall { display: none; width: 100%; height: 100%; content-align: center middle; text-style: bold; }
    DataTable { height: 1fr; }
    """
    BINDINGS = [
        Binding("1", "view('http')", "HTTP"),
        Binding("2", "view('syscalls')", "Syscalls"),
        Binding("3", "view('flows')", "Flows"),
        Binding("4", "view('cpu')", "CPU"),
        Binding("5", "view('routes')", "CPU by route"),
        Binding("tab", "next_view", "Next view", show=False),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, source):
        super().__init__()
        self.source = source
        self.model = TopModel()
        self.view_name = "http"
        self.sort_col: dict = {}        # view -> column index
        self.reverse: dict = {}         # view -> ascending instead
        self.needle = ""
        self.error = ""
        self.last_poll = None
        self._shown_columns = None

    def compose(self) -> ComposeResult:
        with Vertical(id="main"):
            yield Static(id="title")
            yield Static(id="note")
            yield DataTable(id="table", zebra_stripes=True, cursor_type="row")
            yield Input(placeholder="process, pid, container or pod (Enter applies, Esc clears)", id="filter")
            yield Static(id="status")
        yield Static(id="toosmall")
        yield Footer()

    def on_mount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):   # leave through quit: the probes get detached
            loop.add_signal_handler(sig, self.exit)
        self._fit(self.size.width, self.size.height)
        self.set_interval(POLL_S, self.poll)
        self.call_later(self.poll)

    # ------------------------------------------------------------ data
    async def poll(self) -> None:
        try:
            snap = await asyncio.to_thread(self.source.fetch)
            self.error = ""
            self.model.update(snap)
        except SourceError as e:
            self.error = str(e)
        self.last_poll = time.time()
        self.redraw()

    def current_table(self) -> Table:
        return self.model.table(self.view_name, self.needle)

    def redraw(self) -> None:
        table = self.current_table()
        sortable = [i for i, c in enumerate(table.columns) if c.sortable]
        col = self.sort_col.get(self.view_name, sortable[0] if sortable else 0)
        rows = sort_rows(table, col, reverse=not self.reverse.get(self.view_name, False))[:MAX_ROWS]
        widget = self.query_one("#table", DataTable)
        arrow = "↑" if self.reverse.get(self.view_name) else "↓"
        titles = tuple(Text(c.title + (arrow if i == col else ""), justify="right" if c.sortable else "left")
                       for i, c in enumerate(table.columns))
        cursor = widget.cursor_row
        if titles != self._shown_columns:
            widget.clear(columns=True)
            widget.add_columns(*titles)
            self._shown_columns = titles
        else:
            widget.clear()
        # Text, not str: a cell such as "[unknown]" is data, not markup
        justify = ["right" if c.sortable else "left" for c in table.columns]
        widget.add_rows([tuple(Text(v, justify=j) for v, j in zip(cells, justify))
                         for cells in Table(table.columns, rows).cells()])
        if rows:
            widget.move_cursor(row=min(cursor, len(rows) - 1))
        self._draw_title(len(table.rows), len(rows))
        self.query_one("#note", Static).update(table.note)
        self._draw_status()

    def _draw_title(self, n: int, shown: int) -> None:
        tabs = "  ".join(f"[reverse] {i}:{TopModel.TITLES[v]} [/]" if v == self.view_name
                         else f" {i}:{TopModel.TITLES[v]} " for i, v in enumerate(TopModel.VIEWS, 1))
        win = self.model.window
        cur = self.model.current
        when = time.strftime("%H:%M:%S", time.localtime(cur["time_ns"] / 1e9)) if cur else "waiting"
        rows = f"{n} rows" + (f", first {shown}" if shown < n else "")
        span = f"window {win:.1f}s" if win else "since start"
        self.query_one("#title", Static).update(f"otelbpf top  {tabs}  {rows}  {span}  collected {when}")

    def _draw_status(self) -> None:
        mode = ("[b]standalone[/b]: top loaded the probes (no agent running)" if self.source.standalone
                else f"[b]agent[/b] {self.source.url}")
        filt = f"  filter: [b]{self.needle}[/b]" if self.needle else ""
        err = f"  [red]{self.error}[/red]" if self.error else ""
        trunc = (self.model.current or {}).get("truncated") or {}
        cut = "  [yellow]truncated by the agent[/yellow]" if any(trunc.values()) else ""
        self.query_one("#status", Static).update(f"{mode}{filt}{cut}{err}")

    # ------------------------------------------------------------ size
    def on_resize(self, event) -> None:
        self._fit(event.size.width, event.size.height)

    def _fit(self, width: int, height: int) -> None:
        small = width < MIN_WIDTH or height < MIN_HEIGHT
        self.query_one("#main").display = not small
        self.query_one(Footer).display = not small
        msg = self.query_one("#toosmall", Static)
        msg.display = small
        msg.update(f"terminal too small ({width}x{height}): otelbpf top needs {MIN_WIDTH}x{MIN_HEIGHT}; "
                   f"q quits")

    # ------------------------------------------------------------ keys
    def action_view(self, name: str) -> None:
        self.view_name = name
        self.redraw()

    def action_next_view(self) -> None:
        views = TopModel.VIEWS
        self.action_view(views[(views.index(self.view_name) + 1) % len(views)])

    def action_sort(self) -> None:
        sortable = [i for i, c in enumerate(self.current_table().columns) if c.sortable]
        if sortable:
            cur = self.sort_col.get(self.view_name, sortable[0])
            self.sort_col[self.view_name] = sortable[(sortable.index(cur) + 1) % len(sortable)] \
                if cur in sortable else sortable[0]
        self.redraw()

    def action_reverse(self) -> None:
        self.reverse[self.view_name] = not self.reverse.get(self.view_name, False)
        self.redraw()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = self.needle
        box.display = True
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.needle = event.value.strip()
        event.input.display = False
        self.query_one("#table", DataTable).focus()
        self.redraw()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = False
        self.needle = ""
        self.query_one("#table", DataTable).focus()
        self.redraw()
