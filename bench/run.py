"""Proxy benchmark: what does tokenferry cost on top of bare mitmproxy? (``make bench``)

A measurement, not a test: figures are printed and written to
``bench/results/<timestamp>.json`` (and ``latest.json``); the goals are reported, never
asserted. Three configurations are driven through one loopback HTTPS upstream:

- (a) bare ``mitmdump`` (no addons) intercepting TLS;
- (b) ``tokenferry proxy`` intercepting TLS and injecting a cached client_credentials
  token on every request (route: ``127.0.0.1:<port 1>``, ``tls: terminate``);
- (c) the same ``tokenferry proxy`` towards a port no route names: a raw tunnel.

Rounds alternate a, b, c, a, b, c, ... so slow drift of the machine hits all three.
Every round has a load phase (``-c N`` for ``--duration`` seconds: req/s, p50, p99) and,
unless ``--latency-duration 0``, a phase with one connection (p50/p99 without queueing;
the "p50 added" goal is judged on it). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import certs  # noqa: E402 - bench helpers live next to this script
import loadgen  # noqa: E402
import probe  # noqa: E402
from procs import ProcessSet, StartFailed, mitmdump_ready  # noqa: E402

from tokenferry.dev.processes import tokenferry_command  # noqa: E402

SPIFFE_ID = "spiffe://example.org/sandbox/bench"
AUDIENCE = "bench-upstream"
GOAL_INJECT_RATIO = 0.90
GOAL_P50_ADDED_MS = 1.0
GOAL_PASSTHROUGH_RATIO = 2.0


class SetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """One configuration: which proxy, which upstream port, what the probe must see."""

    key: str
    label: str
    proxy_url: str
    port: int
    expect_bearer: bool
    expect_intercept: bool

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


@dataclass
class Phase:
    """All rounds of one configuration in one phase (load or latency)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    duration_s: float = 0.0

    def add(self, round_no: int, result: loadgen.LoadResult, upstream: dict[str, int]) -> None:
        self.latencies_ms.extend(result.latencies_ms)
        self.ok += result.ok
        self.duration_s += result.duration_s
        lat = result.latencies_ms
        self.rounds.append(
            {
                "round": round_no,
                "ok": result.ok,
                "non_2xx": result.non_2xx,
                "transport_errors": result.errors,
                "duration_s": round(result.duration_s, 4),
                "requests_per_s": round(result.requests_per_s, 1),
                "p50_ms": _r(loadgen.percentile(lat, 50)),
                "p99_ms": _r(loadgen.percentile(lat, 99)),
                "upstream_requests": upstream["requests"],
                "upstream_bearer": upstream["bearer"],
            }
        )

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "requests": self.ok,
            "requests_per_s": round(self.ok / self.duration_s, 1) if self.duration_s else None,
            "p50_ms": _r(loadgen.percentile(lat, 50)),
            "p90_ms": _r(loadgen.percentile(lat, 90)),
            "p99_ms": _r(loadgen.percentile(lat, 99)),
            "rounds": self.rounds,
        }


def _r(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Treated like Ctrl-C so the same cleanup path stops every child process.
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark tokenferry proxy against bare mitmdump (loopback only).",
        epilog="Figures go to bench/results/<timestamp>.json and latest.json.",
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of a,b,c (default 6)")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds of load per round (default 3)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="connections in the load phase (default 8)"
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=2.0,
        help="seconds of single-connection load per round, 0 to skip (default 2)",
    )
    parser.add_argument(
        "--configs",
        default="abc",
        help="which configurations to run, e.g. 'a' or 'ab' (default abc)",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "hey", "python"),
        default="auto",
        help="load generator: hey, the Python fallback, or auto (hey when installed)",
    )
    parser.add_argument(
        "--proxy-log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="--log-level for tokenferry proxy (default: its own default, info, which"
        " writes one decision line per request); e.g. warning to see what that line costs",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with the logs"
    )
    args = parser.parse_args(argv)
    if set(args.configs) - set("abc") or not args.configs:
        parser.error("--configs takes letters from 'abc'")
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1 or args.latency_duration < 0:
        parser.error("--rounds, --duration and --concurrency must be positive")
    return args


def pick_generator(choice: str) -> str:
    if choice == "auto":
        return "hey" if loadgen.hey_path() else "python"
    if choice == "hey" and loadgen.hey_path() is None:
        raise SetupError("--loadgen hey: hey is not installed (apt-get install hey)")
    return choice


def start_mitmdump(procs: ProcessSet, tmp: Path, ca_file: Path) -> str:
    mitmdump = Path(sys.executable).with_name("mitmdump")
    command = [
        str(mitmdump),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--set",
        f"confdir={tmp / 'mitmdump-conf'}",
        # Verify the upstream like tokenferry does (--upstream-ca), so both pay the same.
        "--set",
        f"ssl_verify_upstream_trusted_ca={ca_file}",
        # What -q does to flows, but keeping the info line that names the bound port.
        "--set",
        "flow_detail=0",
    ]
    process = procs.start("mitmdump", command, ready=mitmdump_ready)
    return str(process.ready["proxy_url"])


def write_tokenferry_config(directory: Path, token_endpoint: str, port: int) -> tuple[Path, Path]:
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    profile = {
        "id": "bench-upstream",
        "description": "the bench's loopback upstream",
        "credentials": [
            {
                "name": "access_token",
                "token_grant": {
                    "grant_type": "client_credentials",
                    "token_endpoint": token_endpoint,
                    "audience": AUDIENCE,
                },
            }
        ],
        "endpoints": [{"host": "127.0.0.1", "port": port, "tls": "terminate"}],
    }
    (profiles / "bench-upstream.json").write_text(json.dumps(profile, indent=2))
    providers = directory / "providers.json"
    providers.write_text(
        json.dumps(
            {"sandbox": "bench", "providers": [{"name": "bench", "profile": "bench-upstream"}]}
        )
    )
    return profiles, providers


def start_tokenferry(
    procs: ProcessSet, tmp: Path, ca_file: Path, inject_port: int, log_level: str | None
) -> tuple[str, str]:
    """Dev SPIFFE agent, dev IdP and the proxy; returns (proxy_url, idp_issuer)."""
    socket_path = tmp / "spiffe.sock"
    agent = procs.start(
        "dev-spiffe",
        tokenferry_command(
            "dev",
            "spiffe",
            "--socket",
            str(socket_path),
            "--spiffe-id",
            SPIFFE_ID,
            "--key-file",
            str(tmp / "spiffe-key.pem"),
            "--jwks-listen",
            "127.0.0.1:0",
        ),
    )
    jwks_url = agent.ready.get("jwks_url")
    if not jwks_url:
        raise SetupError(f"dev spiffe ready line has no jwks_url: {agent.ready}")
    idp = procs.start(
        "dev-idp",
        tokenferry_command(
            "dev",
            "idp",
            "--listen",
            "127.0.0.1:0",
            "--spiffe-jwks",
            str(jwks_url),
            # Longer than the whole run, so no background refresh lands inside a round.
            "--token-ttl",
            "3600",
        ),
    )
    profiles, providers = write_tokenferry_config(
        tmp / "tokenferry", str(idp.ready["token_endpoint"]), inject_port
    )
    proxy = procs.start(
        "tokenferry-proxy",
        tokenferry_command(
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--confdir",
            str(tmp / "tokenferry-conf"),
            "--upstream-ca",
            str(ca_file),
            "--spiffe-socket",
            str(socket_path),
            "--profiles",
            str(profiles),
            "--providers",
            str(providers),
            *(["--log-level", log_level] if log_level else []),
        ),
    )
    return str(proxy.ready["proxy_url"]), str(idp.ready["issuer"])


def check_target(target: Target) -> dict[str, Any]:
    """One request through the proxy: status 200, token iff (b), interception iff (a)/(b)."""
    result = probe.probe(target.proxy_url, "127.0.0.1", target.port)
    intercepted = result.issuer != certs.CA_COMMON_NAME
    problems = []
    if result.status != 200:
        problems.append(f"status {result.status} (body {result.body})")
    if result.bearer != target.expect_bearer:
        problems.append(
            "a bearer token arrived upstream"
            if result.bearer
            else "no bearer token arrived upstream"
        )
    if intercepted != target.expect_intercept:
        problems.append(
            f"TLS was intercepted (certificate issued by {result.issuer!r})"
            if intercepted
            else "TLS was not intercepted (the upstream's own certificate arrived)"
        )
    if problems:
        raise SetupError(f"({target.key}) {target.label}: " + "; ".join(problems))
    return {"status": result.status, "bearer": result.bearer, "certificate_issuer": result.issuer}


def idp_token_requests(issuer: str) -> Any:
    """Best effort: how many token requests the dev IdP served (expect ~1 for the run)."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{issuer}/dev/stats", timeout=5
        ) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def run_phase(
    target: Target,
    *,
    generator: str,
    concurrency: int,
    duration: float,
    ca_file: Path,
    stats_port: int,
) -> tuple[loadgen.LoadResult, dict[str, int]]:
    before = probe.upstream_stats(stats_port, ca_file)[target.port]
    result = loadgen.run_load(
        generator,
        proxy_url=target.proxy_url,
        url=target.url,
        concurrency=concurrency,
        duration_s=duration,
    )
    after = probe.upstream_stats(stats_port, ca_file)[target.port]
    delta = {key: after[key] - before[key] for key in after}
    return result, delta


def verify_round(target: Target, result: loadgen.LoadResult, upstream: dict[str, int]) -> list[str]:
    """What makes a round's figures untrustworthy (printed, and recorded in the JSON)."""
    problems = []
    if result.ok == 0:
        problems.append("no successful request")
    if result.non_2xx:
        problems.append(f"{result.non_2xx} non-2xx responses")
    if upstream["requests"] < result.ok:
        problems.append(f"upstream saw {upstream['requests']} requests but {result.ok} succeeded")
    if target.expect_bearer and upstream["bearer"] != upstream["requests"]:
        problems.append(
            f"only {upstream['bearer']} of {upstream['requests']} upstream requests had a token"
        )
    if not target.expect_bearer and upstream["bearer"]:
        problems.append(f"{upstream['bearer']} upstream requests carried a token")
    return problems


def ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None or y == 0 else round(x / y, 3)


def diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else round(x - y, 3)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def verdict(value: float | None, goal: float, *, at_least: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if at_least else value <= goal
    return "met" if met else "NOT met"


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or None
    return None


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Progress lines must show up when piped (make bench | tee ...).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Even when started with SIGINT ignored (a background job), Ctrl-C/SIGINT stops cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        generator = pick_generator(args.loadgen)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if generator == "python" and args.loadgen == "auto":
        print("note: hey not found; using the Python load generator (bench/pyload.py)")

    phases = [("load", args.concurrency, args.duration)]
    if args.latency_duration > 0:
        phases.append(("latency", 1, args.latency_duration))
    per_round = sum(duration + 0.5 for _, _, duration in phases) * len(args.configs)
    estimate = per_round * args.rounds + 20
    print(
        f"tokenferry bench: configs {','.join(args.configs)}, {args.rounds} rounds,"
        f" load -c {args.concurrency} for {args.duration:g}s"
        + (f", latency -c 1 for {args.latency_duration:g}s" if args.latency_duration else "")
        + f", generator {generator}; about {estimate:.0f}s"
    )
    if estimate > 300:
        print("note: these settings take longer than the five minutes make bench aims for")

    tmp = Path(tempfile.mkdtemp(prefix="tfbench-"))
    procs = ProcessSet(tmp / "logs")
    started = time.monotonic()
    setup: dict[str, Any] = {}
    failures: list[str] = []
    results: dict[str, dict[str, Phase]] = {}
    targets: dict[str, Target] = {}
    issuer: str | None = None
    interrupted = False
    try:
        upstream_certs = certs.generate(tmp / "upstream-certs")
        upstream = procs.start(
            "upstream",
            [
                sys.executable,
                str(BENCH_DIR / "upstream.py"),
                "--cert",
                str(upstream_certs.cert_file),
                "--key",
                str(upstream_certs.key_file),
                "--listeners",
                "2",
            ],
        )
        inject_port, tunnel_port = (int(p) for p in upstream.ready["ports"])
        ca_file = upstream_certs.ca_file

        if "a" in args.configs:
            try:
                targets["a"] = Target(
                    "a",
                    "bare mitmdump",
                    start_mitmdump(procs, tmp, ca_file),
                    inject_port,
                    expect_bearer=False,
                    expect_intercept=True,
                )
            except StartFailed as exc:
                failures.append(f"(a) bare mitmdump could not start: {exc}")
        if {"b", "c"} & set(args.configs):
            try:
                proxy_url, issuer = start_tokenferry(
                    procs, tmp, ca_file, inject_port, args.proxy_log_level
                )
            except (StartFailed, SetupError, KeyError) as exc:
                failures.append(f"tokenferry proxy (b, c) could not start: {exc}")
            else:
                if "b" in args.configs:
                    targets["b"] = Target(
                        "b", "tokenferry inject", proxy_url, inject_port, True, True
                    )
                if "c" in args.configs:
                    targets["c"] = Target(
                        "c", "tokenferry passthrough", proxy_url, tunnel_port, False, False
                    )

        # Probe and warm every configuration (certificate generation, token cache).
        for key in list(targets):
            target = targets[key]
            try:
                setup[key] = check_target(target)
                loadgen.run_load(
                    generator,
                    proxy_url=target.proxy_url,
                    url=target.url,
                    concurrency=args.concurrency,
                    requests=args.concurrency * 25,
                )
            except (SetupError, probe.ProbeError, loadgen.LoadError, OSError) as exc:
                failures.append(f"({key}) {target.label} is not usable: {exc}")
                del targets[key]

        order = [key for key in args.configs if key in targets]
        for key in order:
            results[key] = {name: Phase() for name, _, _ in phases}
        for round_no in range(1, args.rounds + 1):
            for name, concurrency, duration in phases:
                line = []
                for key in order:
                    target = targets[key]
                    result, delta = run_phase(
                        target,
                        generator=generator,
                        concurrency=concurrency,
                        duration=duration,
                        ca_file=ca_file,
                        stats_port=inject_port,
                    )
                    results[key][name].add(round_no, result, delta)
                    for problem in verify_round(target, result, delta):
                        failures.append(f"round {round_no} {name} ({key}): {problem}")
                    line.append(f"{key} {result.requests_per_s:7.0f} req/s")
                print(f"  round {round_no}/{args.rounds} {name:7s}: " + "   ".join(line))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process", file=sys.stderr)
    except (StartFailed, SetupError, loadgen.LoadError, probe.ProbeError, OSError) as exc:
        failures.append(str(exc))
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave children running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        idp_stats = idp_token_requests(issuer) if issuer and not interrupted else None
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep_tmp or failures:
            print(f"logs kept in {tmp / 'logs'}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130

    report = build_report(args, generator, results, setup, failures, idp_stats, started)
    print_report(report)
    path = write_report(report, args.results_dir)
    print(f"\nwritten: {path}")
    missing = [key for key in args.configs if key not in results]
    if failures or missing:
        print("\nproblems:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0


def build_report(
    args: argparse.Namespace,
    generator: str,
    results: dict[str, dict[str, Phase]],
    setup: dict[str, Any],
    failures: list[str],
    idp_stats: Any,
    started: float,
) -> dict[str, Any]:
    labels = {"a": "bare mitmdump", "b": "tokenferry inject", "c": "tokenferry passthrough"}
    configs = {
        key: {"label": labels[key], "probe": setup.get(key)}
        | {name: phase.summary() for name, phase in phases.items()}
        for key, phases in results.items()
    }

    def value(key: str, phase: str, field_name: str) -> float | None:
        config = configs.get(key, {}).get(phase)
        return None if config is None else config.get(field_name)

    phases_run = {name for phases in results.values() for name in phases}
    # "p50 added" is judged on the one-connection phase when there is one: under load
    # the p50 is mostly queueing behind the throughput difference.
    p50_phase = "latency" if "latency" in phases_run else "load"

    def metric(
        x: str,
        phase: str,
        field_name: str,
        combine: Callable[[float | None, float | None], float | None],
        goal: float | None,
        *,
        at_least: bool,
    ) -> dict[str, Any]:
        """x against (a): pooled over all rounds, and per round (each b or c paired with
        the a of the same round, so a burst of noise from elsewhere spoils one pair, not
        all of them). The goal is judged on the median of the per-round values."""
        rounds = per_round(results, x, "a", phase, field_name, combine)
        entry: dict[str, Any] = {
            "phase": phase,
            "pooled": combine(value(x, phase, field_name), value("a", phase, field_name)),
            "per_round": rounds,
        }
        if goal is not None:
            entry["goal"] = f"{'>=' if at_least else '<='} {goal:g}"
            entry["verdict"] = verdict(
                rounds["median"] if rounds else None, goal, at_least=at_least
            )
        return entry

    comparison: dict[str, Any] = {
        "b_over_a_requests_per_s": metric(
            "b", "load", "requests_per_s", ratio, GOAL_INJECT_RATIO, at_least=True
        ),
        "p50_added_by_b_ms": metric(
            "b", p50_phase, "p50_ms", diff, GOAL_P50_ADDED_MS, at_least=False
        ),
        "c_over_a_requests_per_s": metric(
            "c", "load", "requests_per_s", ratio, GOAL_PASSTHROUGH_RATIO, at_least=True
        ),
        # Context, no goal:
        "p50_added_by_b_under_load_ms": metric("b", "load", "p50_ms", diff, None, at_least=False),
        "p99_added_by_b_ms": metric("b", p50_phase, "p99_ms", diff, None, at_least=False),
    }
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "complete": not failures and set(results) == set(args.configs),
        "settings": {
            "configs": args.configs,
            "rounds": args.rounds,
            "load": {"concurrency": args.concurrency, "duration_s": args.duration},
            "latency": {"concurrency": 1, "duration_s": args.latency_duration},
            "generator": generator,
            "proxy_log_level": args.proxy_log_level,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "mitmproxy": package_version("mitmproxy"),
            "tokenferry_commit": git_commit(),
        },
        "configs": configs,
        "comparison": comparison,
        "idp_stats": idp_stats,
        "problems": failures,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def per_round(
    results: dict[str, dict[str, Phase]],
    x: str,
    y: str,
    phase: str,
    field_name: str,
    combine: Callable[[float | None, float | None], float | None],
) -> dict[str, Any] | None:
    """``combine(x, y)`` for each round, and the median and range of those values."""
    if x not in results or y not in results or phase not in results[x]:
        return None
    # Pair by round number: an interrupted run can leave x one round short of y.
    y_rounds = {r["round"]: r for r in results[y][phase].rounds}
    values = [
        combine(rx.get(field_name), y_rounds[rx["round"]].get(field_name))
        for rx in results[x][phase].rounds
        if rx["round"] in y_rounds
    ]
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "values": values,
        "median": round(statistics.median(present), 3),
        "min": min(present),
        "max": max(present),
    }


def print_report(report: dict[str, Any]) -> None:
    configs: dict[str, Any] = report["configs"]
    has_latency = report["settings"]["latency"]["duration_s"] > 0
    load_c = report["settings"]["load"]["concurrency"]
    header = f"\n{'configuration':28s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}"
    if has_latency:
        header += f"   {'c=1 p50':>8s} {'c=1 p99':>8s}"
    print(header + f"   (load: {load_c} connections)")
    for key in "abc":
        if key not in configs:
            print(f"({key}) {'not measured':24s}")
            continue
        config = configs[key]
        load = config["load"]
        row = (
            f"({key}) {config['label']:24s} {fmt(load['requests_per_s']):>8s}"
            f" {fmt(load['p50_ms'], 2):>8s} {fmt(load['p99_ms'], 2):>8s}"
        )
        if has_latency:
            latency = config["latency"]
            row += f"   {fmt(latency['p50_ms'], 2):>8s} {fmt(latency['p99_ms'], 2):>8s}"
        print(row)
    comparison = report["comparison"]
    print(
        f"\n{'vs (a)':30s} {'rounds: median':>14s} {'(min..max)':>18s} {'pooled':>9s}"
        f"   goal (on the median)"
    )
    rows = [
        ("b/a req/s", "b_over_a_requests_per_s"),
        ("p50 added by b, ms", "p50_added_by_b_ms"),
        ("c/a req/s", "c_over_a_requests_per_s"),
        ("p50 added by b under load, ms", "p50_added_by_b_under_load_ms"),
    ]
    for label, key in rows:
        entry = comparison[key]
        if entry["phase"] == "latency":
            label += " (c=1)"
        spread = entry["per_round"]
        median = fmt(spread["median"], 3) if spread else "-"
        span = f"({spread['min']:.3f}..{spread['max']:.3f})" if spread else ""
        goal = f"   {entry['goal']:7s} {entry['verdict']}" if "goal" in entry else ""
        print(f"{label:30s} {median:>14s} {span:>18s} {fmt(entry['pooled'], 3):>9s}{goal}")
    print(
        "(pooled: all rounds together; under load the p50 difference is mostly queueing"
        " behind the throughput difference)"
    )
    print("(goals are reported, not asserted)")


def write_report(report: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = report["timestamp"].replace(":", "").replace("-", "")
    path = results_dir / f"{stamp}.json"
    text = json.dumps(report, indent=2) + "\n"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path


if __name__ == "__main__":
    sys.exit(main())
