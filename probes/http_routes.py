"""http.route: a bounded template for a raw path (used by probes/http.py).

Configured patterns win, in order. Segments are matched one by one:
`{name}` or `:name` or `*` match one segment, a final `**` matches the rest.
    /users/{id}/orders   /static/**   /api/:version/items

Paths that match no pattern get a learned template: segments that look like
identifiers (numbers, UUIDs, hex, long tokens with digits) become `*`, so
/users/123/orders and /users/456/orders are one route. At most max_routes
distinct templates are handed out; past that, new ones map to OVERFLOW_ROUTE
and are counted. Raw paths never leave this module as attributes.
"""
from __future__ import annotations

import re
from typing import Optional

OVERFLOW_ROUTE = "/**"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX = re.compile(r"^[0-9a-fA-F]{8,}$")
_DIGITS = re.compile(r"\d")


def looks_like_id(segment: str) -> bool:
    if not segment:
        return False
    if segment.isdigit() or _UUID.match(segment):
        return True
    if _HEX.match(segment) and _DIGITS.search(segment):
        return True
    # tokens: long, and at least a quarter digits (slugs like "release-notes" stay)
    digits = len(_DIGITS.findall(segment))
    return len(segment) >= 16 and digits * 4 >= len(segment)


def _split(path: str) -> list:
    return path.split("/")[1:] if path.startswith("/") else [path]


class Pattern:
    def __init__(self, text: str):
        if not text.startswith("/"):
            raise ValueError("a route pattern starts with /")
        self.text = text
        self.segments = _split(text)
        self.rest = bool(self.segments) and self.segments[-1] == "**"
        if self.rest:
            self.segments = self.segments[:-1]
        if "**" in self.segments:
            raise ValueError("** may only end a pattern")

    @staticmethod
    def _wild(seg: str) -> bool:
        return seg == "*" or (seg.startswith("{") and seg.endswith("}")) or (seg.startswith(":") and len(seg) > 1)

    def matches(self, segments: list) -> bool:
        n = len(self.segments)
        if len(segments) < n or (not self.rest and len(segments) != n):
            return False
        return all(p == s or (self._wild(p) and s != "") for p, s in zip(self.segments, segments))


def check_patterns(patterns: list, key: str) -> list:
    """Config check: every pattern parses (the ConfigError names the entry)."""
    from collector.config import ConfigError
    for i, text in enumerate(patterns):
        try:
            Pattern(text)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", f"{text!r}: {e}", "write patterns like /users/{id} or /static/**")
    return patterns


class RouteTable:
    def __init__(self, patterns: list, max_routes: int, learn: bool = True):
        self.patterns = [Pattern(p) for p in patterns]
        self.max_routes = max_routes
        self.learn = learn
        self.learned: set = set()
        self.overflowed = 0        # paths sent to OVERFLOW_ROUTE because the table was full
        self._cache: dict = {}     # raw path -> route, bounded like the routes

    def route(self, path: Optional[str]) -> str:
        if not path:
            return OVERFLOW_ROUTE
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        route = self._resolve(path)
        if len(self._cache) >= 8 * self.max_routes:
            self._cache.clear()
        self._cache[path] = route
        return route

    def _resolve(self, path: str) -> str:
        segments = _split(path)
        for p in self.patterns:
            if p.matches(segments):
                return p.text
        if not self.learn:
            return OVERFLOW_ROUTE
        template = "/" + "/".join("*" if looks_like_id(s) else s for s in segments) if path.startswith("/") \
            else OVERFLOW_ROUTE
        if template in self.learned:
            return template
        if len(self.learned) >= self.max_routes:
            self.overflowed += 1
            return OVERFLOW_ROUTE
        self.learned.add(template)
        return template
