"""otelbpf run | check | probes | profile | top"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import traceback

from . import __version__, config, features
from .probe import default_bpf_dir, discover
from .probe_trial import try_probe

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("otelbpf")


def _setup_logging(level: str = "info") -> None:
    root = logging.getLogger("otelbpf")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("otelbpf: %(levelname)s: %(message)s"))
        root.addHandler(h)
        root.propagate = False
        # The SDK's exporters log retries and failures: same stream, same prefix.
        sdk = logging.getLogger("opentelemetry")
        sdk_handler = logging.StreamHandler(sys.stderr)
        sdk_handler.setFormatter(logging.Formatter("otelbpf: %(levelname)s: %(name)s: %(message)s"))
        sdk.addHandler(sdk_handler)
        sdk.propagate = False
    root.setLevel(level.upper())
    logging.getLogger("opentelemetry").setLevel(max(logging.WARNING, root.level))


def _probe_schemas(entries: dict) -> dict:
    return {name: (e.cls.config_schema if e.cls else {}) for name, e in entries.items()}


def load_config(path, entries: dict) -> config.AgentConfig:
    if path:
        raw = config.load_file(path)
        return config.build(raw, _probe_schemas(entries), source=path)
    return config.build(None, _probe_schemas(entries))


def cmd_probes(args) -> int:
    entries = discover()
    if not entries:
        print("no probes installed (entry-point group otelbpf.probes is empty)")
        return EXIT_FAILED
    width = max(len(n) for n in entries)
    for name, e in sorted(entries.items()):
        if e.cls is None:
            print(f"{name:<{width}}  BROKEN  {e.error}  [{e.origin}]")
        else:
            print(f"{name:<{width}}  {e.cls.description}  [{e.origin}]")
    return EXIT_OK


def cmd_check(args) -> int:
    entries = discover()
    cfg = load_config(args.config, entries)
    print(f"config: {cfg.source}: valid")
    print(f"kernel: {platform.release()} {platform.machine()}")
    feats = features.detect(default_bpf_dir(), cfg.kernel["btf"])
    width = max(len(n) for n in feats)
    for f in feats.values():
        print(f"  [{'ok' if f.available else 'no'}] {f.name:<{width}}  {f.detail}")
    print("probes (each enabled one started with this config, then stopped):")
    tracefs = features.tracefs_mount_point()
    for name, e in sorted(entries.items()):
        pcfg = cfg.probes.get(name)
        if e.cls is None:
            verdict = f"cannot load: {e.error}"
        elif not (pcfg and pcfg["enabled"]):
            verdict = "disabled"
        else:
            verdict = try_probe(e, pcfg, feats, default_bpf_dir(), cfg.kernel["btf"], tracefs).verdict()
        print(f"  {name}: {verdict}")
    print("exporters: " + (", ".join(cfg.exporters) or "none"))
    return EXIT_OK


def cmd_run(args) -> int:
    from . import heap
    heap.limit_arenas()   # before any thread: exporters, gRPC, the unwind thread
    from .agent import Agent

    from .instance_lock import AlreadyRunning, InstanceLock

    entries = discover()
    cfg = load_config(args.config, entries)
    _setup_logging(cfg.log_level)
    lock = InstanceLock(cfg.lock_file)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        log.error("%s", e)
        return EXIT_FAILED
    except OSError as e:
        log.error("cannot take the instance lock %s: %s (set lock_file to a writable path)", cfg.lock_file,
                  e.strerror)
        return EXIT_FAILED
    agent = Agent(cfg, entries, reload_config=lambda: load_config(args.config, discover()))
    enabled = [n for n, p in cfg.probes.items() if p["enabled"]]
    running = agent.start()
    if enabled and not running:
        agent.shutdown()
        log.error("no probe could start (%s); see the lines above, or run `otelbpf check`", ", ".join(enabled))
        return EXIT_FAILED
    log.info("collecting every %gs; probes: %s; exporters: %s", cfg.interval, ", ".join(agent.probes) or "none",
             ", ".join(agent.workers) or "none")
    agent.notifier.ready(f"probes: {', '.join(agent.probes) or 'none'}; exporters: "
                         f"{', '.join(agent.workers) or 'none'}")
    try:
        agent.run(duration=args.duration)
    finally:
        agent.shutdown()
    log.info("stopped; all programs detached")
    return EXIT_OK


def cmd_profile(args) -> int:
    """Profile the host (or one pid) for a while; write pprof, folded stacks and an HTML flame graph."""
    import signal
    import threading
    import time

    from .export.flamegraph import FlameGraphUnavailable, check_renderer, render_html
    from .export.pprof import to_folded, to_pprof
    from .probe import ProbeContext
    from .records import Profile
    from .shared import SharedState

    for path in (args.output, args.html):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"otelbpf: cannot write {path}: its directory does not exist", file=sys.stderr)
            return EXIT_CONFIG
    entries = discover()
    entry = entries.get("cpu_profile")
    if entry is None or entry.cls is None:
        print(f"otelbpf: the cpu_profile probe is not installed ({entry.error if entry else 'missing'})",
              file=sys.stderr)
        return EXIT_FAILED
    if not args.requests and (args.route or args.trace_id):
        print("otelbpf: --route and --trace-id need the requests: drop --no-requests", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config, entries)
    _setup_logging(cfg.log_level)
    pcfg = cfg.probes.get("cpu_profile") or config.parse_section(
        {}, {**config.PROBE_COMMON, **entry.cls.config_schema}, "probes.cpu_profile")
    if args.frequency:
        pcfg = {**pcfg, "frequency": args.frequency}
    feats = features.detect(default_bpf_dir(), cfg.kernel["btf"])
    missing = features.missing(entry.cls.requires, feats)
    if missing:
        log.error("cannot profile here: %s", "; ".join(missing))
        return EXIT_FAILED
    # The HTML page needs the vendored renderer: said before profiling, not after.
    html_path = args.html or args.output + ".html"
    try:
        check_renderer()
    except FlameGraphUnavailable as e:
        if args.html:
            log.error("cannot write %s: %s", args.html, e)
            return EXIT_FAILED
        log.warning("no HTML flame graph: %s", e)
        html_path = None
    shared = SharedState()
    ctx = ProbeContext(bpf_dir=default_bpf_dir(), btf_path=cfg.kernel["btf"], tracefs=None, agent_pid=os.getpid(),
                       start_time_ns=time.time_ns(), log=log, shared=shared)
    probe = entry.cls(pcfg, ctx)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    profiles = []
    started = time.time()
    requests = None
    try:
        probe.start()
        end = time.monotonic() + args.duration
        # after the profiler, which samples meanwhile: the http probe takes
        # seconds to load (its verifier work is this process's, left out of
        # the profile below). A profile of one route or trace counts its
        # time from when requests can be seen.
        if args.requests:
            needed = bool(args.route or args.trace_id)
            requests = _start_request_probe(cfg, entries, feats, ctx, needed=needed)
            if requests is False:
                return EXIT_FAILED
            if requests:
                log.info("HTTP requests are seen from now on: samples taken in them carry their request")
            if needed:
                end = time.monotonic() + args.duration
        while True:   # at least one collection, even if the http probe's load took the whole duration
            stop.wait(min(cfg.interval, max(0.0, end - time.monotonic())))
            profiles += [r for r in probe.collect() if isinstance(r, Profile)]
            if requests:
                requests.collect()   # its spans are not written; drained so its ring never fills
            if stop.is_set() or time.monotonic() >= end:
                break
    finally:
        probe.stop()
        if requests:
            requests.stop()
        shared.close()
    for p in profiles:
        p.samples = [s for s in p.samples if _sample_wanted(s, args)]
    folded_path = args.output + ".folded"
    with open(args.output, "wb") as f:
        f.write(to_pprof(profiles))
    with open(folded_path, "w") as f:
        f.write(to_folded(profiles))
    n = sum(s.count for p in profiles for s in p.samples)
    written = f"{n} samples: pprof {args.output}, folded stacks {folded_path}"
    if html_path:
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(render_html(profiles, title=f"otelbpf CPU profile: {platform.node()}, "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
                                + (f", pid {args.pid}" if args.pid else "")
                                + (f", route {args.route}" if args.route else "")
                                + (f", trace {args.trace_id:032x}" if args.trace_id else "")))
        written += f", flame graph {html_path}"
    print(written)
    return EXIT_OK


def _start_request_probe(cfg, entries: dict, feats: dict, ctx, needed: bool):
    """The http probe, run beside the profiler so that samples carry the
    request their thread was serving. None where it cannot run (the
    profile is written without requests), False if the filter asked for
    needs it (said why)."""
    entry = entries.get("http")
    why = None
    if entry is None or entry.cls is None:
        why = f"the http probe is not installed ({entry.error if entry else 'missing'})"
    elif features.missing(entry.cls.requires, feats):
        why = "this kernel lacks " + "; ".join(features.missing(entry.cls.requires, feats))
    elif "http" in cfg.probes and not cfg.probes["http"]["enabled"]:
        why = "probes.http is disabled in the config"
    if why is None:
        hcfg = cfg.probes.get("http") or config.parse_section(
            {}, {**config.PROBE_COMMON, **entry.cls.config_schema}, "probes.http")
        probe = entry.cls(hcfg, ctx)
        try:
            probe.start()
            return probe
        except Exception as e:
            probe.stop()
            why = f"the http probe did not start: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if needed:
        log.error("--route/--trace-id need the HTTP requests: %s", why)
        return False
    log.warning("samples are not tied to HTTP requests: %s", why)
    return None


def _sample_wanted(sample, args) -> bool:
    a = sample.attributes
    if a.get("process.pid") == os.getpid():
        return False   # this command loading its probes: not the workload asked about
    if args.pid and a.get("process.pid") != args.pid:
        return False
    if args.route is not None and a.get("http.route") != args.route:
        return False
    if args.trace_id is not None and (sample.link is None or sample.link[0] != args.trace_id):
        return False
    return True


def _trace_id(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        value = 0
    if len(text) != 32 or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a trace id (32 hex digits, not all zero)")
    return value


def cmd_top(args) -> int:
    """The live terminal view: the running agent's data, or the probes loaded here when none runs."""
    from .top.source import SourceError, open_source

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("otelbpf: top needs a terminal; for logs and pipes run the agent with the console exporter "
              "(`otelbpf run`)", file=sys.stderr)
        return EXIT_FAILED
    entries = discover()
    cfg = load_config(args.config, entries)
    _setup_logging(cfg.log_level)
    try:
        source = open_source(cfg, entries, args.agent)
    except SourceError as e:
        log.error("%s", e)
        return EXIT_FAILED
    held = []
    try:
        if source.standalone:
            log.info("no agent runs on this host: top loads the probes itself (all detached when it quits)")
            enabled = [n for n, p in cfg.probes.items() if p["enabled"]]
            if enabled and not source.start():
                log.error("no probe could start (%s); see the lines above, or run `otelbpf check`",
                          ", ".join(enabled))
                return EXIT_FAILED
        from .top.app import TopApp
        held = _hold_log_lines()   # a log line written over the full-screen view would garble it
        TopApp(source).run()
    finally:
        source.close()
        _release_log_lines(held)
    return EXIT_OK


def _hold_log_lines() -> list:
    """Send the agent's log lines to a list while the screen is taken."""
    root = logging.getLogger("otelbpf")
    lines: list = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec)
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    return [saved, lines]


def _release_log_lines(held: list) -> None:
    if not held:
        return
    saved, lines = held
    root = logging.getLogger("otelbpf")
    root.handlers[:] = saved
    for rec in lines:
        if rec.levelno >= logging.WARNING:
            root.handle(rec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otelbpf", description="eBPF telemetry agent exporting OpenTelemetry over OTLP")
    p.add_argument("--version", action="version", version=f"otelbpf {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGINT/SIGTERM (SIGHUP reloads the config)")
    run.add_argument("--config", help="YAML config file (default: the embedded default)")
    run.add_argument("--duration", type=_positive_seconds, help="stop after this many seconds")
    run.set_defaults(fn=cmd_run)
    chk = sub.add_parser("check", help="validate the config and show what this kernel supports")
    chk.add_argument("--config", help="YAML config file")
    chk.set_defaults(fn=cmd_check)
    prof = sub.add_parser("profile", help="profile the CPU for a while; write pprof, folded stacks and an "
                          "HTML flame graph")
    prof.add_argument("--duration", type=_positive_seconds, default=10.0, help="how long (default 10s)")
    prof.add_argument("--output", required=True, help="pprof file (gzipped profile.proto); folded stacks go "
                      "to OUTPUT.folded")
    prof.add_argument("--html", help="interactive flame graph, one self-contained HTML file (default: OUTPUT.html)")
    prof.add_argument("--pid", type=int, help="keep only this process")
    prof.add_argument("--route", help="keep only samples taken while a thread served a request of this "
                      "http.route (as the HTTP metrics name it, e.g. /users/{id})")
    prof.add_argument("--trace-id", type=_trace_id, help="keep only samples of requests of this trace (32 hex digits)")
    prof.add_argument("--no-requests", dest="requests", action="store_false",
                      help="do not run the http probe beside the profiler (samples then carry no request)")
    prof.add_argument("--frequency", type=int, help="samples per second per CPU (default: the config's, 99)")
    prof.add_argument("--config", help="YAML config file (probes.cpu_profile settings)")
    prof.set_defaults(fn=cmd_profile)
    top = sub.add_parser("top", help="live full-screen view: HTTP, syscalls, flows, on-CPU functions")
    top.add_argument("--config", help="YAML config file: where the agent's health server listens (health:), "
                     "its lock file, and the probes top runs itself when no agent runs")
    top.add_argument("--agent", metavar="URL", help="another agent's health address (http://HOST:PORT); "
                     "default: this config's health: address")
    top.set_defaults(fn=cmd_top)
    prb = sub.add_parser("probes", help="list installed probes")
    prb.set_defaults(fn=cmd_probes)
    return p


def _positive_seconds(s: str) -> float:
    try:
        return config.parse_duration(s, "--duration")
    except config.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.fn(args)
    except config.ConfigError as e:
        print(f"otelbpf: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("OTELBPF_DEBUG"):
            traceback.print_exc()
        print(f"otelbpf: error: {type(e).__name__}: {e} (set OTELBPF_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
