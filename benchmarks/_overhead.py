"""What ``--metrics-overhead`` of node_load.py and server_load.py share (torch-free).

Both drive the same load through interleaved arms (no metrics / metrics / metrics and a
concurrent scraper) and compare medians; results go to one file, each script under its key.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_overhead.json"
ARMS = ("no_metrics", "metrics", "metrics_scraped")


@contextlib.contextmanager
def scraper(url: str, interval: float) -> Iterator[list[float]]:
    """GET ``url``/metrics every ``interval`` seconds from a thread; yields the scrape times (ms)."""
    times: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                t = time.perf_counter()
                http.get(url + "/metrics").raise_for_status()
                times.append((time.perf_counter() - t) * 1000)
                stop.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield times
    finally:
        stop.set()
        thread.join(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def overhead_summary(values: dict[str, list[float]], baseline: str, *, higher_is_better: bool) -> dict:
    """Medians per arm and each arm's overhead against ``baseline`` in percent (positive = worse):
    of the medians, and the median of the per-round overheads (rounds are interleaved, so the
    arms of one round saw about the same background load)."""
    sign = 1.0 if higher_is_better else -1.0
    medians = {arm: statistics.median(v) for arm, v in values.items()}
    out: dict = {"median": {arm: round(m, 3) for arm, m in medians.items()}, "overhead_pct": {}}
    for arm, v in values.items():
        if arm == baseline:
            continue
        paired = [100.0 * sign * (b - x) / b for b, x in zip(values[baseline], v)]
        of_medians = 100.0 * sign * (medians[baseline] - medians[arm]) / medians[baseline]
        out["overhead_pct"][arm] = {"of_medians": round(of_medians, 2),
                                    "median_of_rounds": round(statistics.median(paired), 2)}
    return out


def run_arms(targets: dict[str, tuple[str, int]], drive: Callable[[str], tuple[float, int]], *, rounds: int,
             interval: float, label: str = "") -> dict:
    """Drive every arm once per round, in interleaved order; the ``metrics_scraped`` arm with a
    concurrent scraper.

    Args:
        targets: arm → (base URL, server process id).
        drive: runs one round's load against a URL; returns (throughput per s, units served).

    Returns:
        ``per_s`` (throughput per round and arm), ``server_cpu_ms_per_unit`` (the server process's
        user + system CPU per request or image, per round and arm: unlike wall-clock throughput
        it hardly depends on what else runs on the machine), and the scrape times.
    """
    per_s: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
    scrape_ms: list[float] = []
    for r in range(rounds):
        for arm in arm_order(r):
            url, pid = targets[arm]
            before = cpu_seconds(pid)
            if arm == "metrics_scraped":
                with scraper(url, interval) as times:
                    rate, units = drive(url)
                scrape_ms += times
            else:
                rate, units = drive(url)
            cpu[arm].append(1000.0 * (cpu_seconds(pid) - before) / units)
            per_s[arm].append(rate)
        print(f"{label}round {r + 1}/{rounds}: " + "  ".join(
            f"{a} {per_s[a][-1]:.1f}/s {cpu[a][-1]:.2f} cpu-ms" for a in ARMS), flush=True)
    return {"per_s": per_s, "server_cpu_ms_per_unit": cpu, "scrape_ms": scrape_ms}


def scrape_cost(cpu_ms_per_unit: dict[str, list[float]], units_per_round: int, scrapes: int,
                interval: float) -> dict:
    """Server CPU per scrape, estimated from the rounds: the scraped arm's extra CPU over the
    unscraped one (same process), summed over rounds, divided by the scrapes. Its share of one
    core at the scrape interval is what scraping costs a saturated single-process server, whatever
    its throughput (wall-clock overhead per request instead grows as the machine gets busier,
    since the same scrapes are spread over fewer requests)."""
    extra_ms = sum((x - y) * units_per_round
                   for x, y in zip(cpu_ms_per_unit["metrics_scraped"], cpu_ms_per_unit["metrics"]))
    per_scrape = extra_ms / scrapes if scrapes else float("nan")
    return {"server_cpu_ms_per_scrape": round(per_scrape, 2),
            "pct_of_one_core_at_interval": round(100.0 * per_scrape / (1000.0 * interval), 3),
            "pct_of_one_core_every_15_s": round(100.0 * per_scrape / 15000.0, 4)}


def summarize(measured: dict, units_per_round: int, interval: float) -> dict:
    """Medians and overheads (against ``no_metrics``) of what :func:`run_arms` measured."""
    scrapes = measured["scrape_ms"]
    return {
        "scrape_cost": scrape_cost(measured["server_cpu_ms_per_unit"], units_per_round, len(scrapes), interval),
        "throughput": overhead_summary(measured["per_s"], "no_metrics", higher_is_better=True),
        "server_cpu": overhead_summary(measured["server_cpu_ms_per_unit"], "no_metrics", higher_is_better=False),
        "per_round": {"per_s": measured["per_s"], "server_cpu_ms_per_unit": {
            a: [round(x, 4) for x in v] for a, v in measured["server_cpu_ms_per_unit"].items()}},
        "scrapes": {"count": len(scrapes), "median_ms": round(statistics.median(scrapes), 2) if scrapes else None},
    }


def arm_order(round_index: int) -> list[str]:
    """The arms of one round; every other round reversed, to cancel drift within a round."""
    return list(ARMS) if round_index % 2 == 0 else list(reversed(ARMS))


def record_overhead(out: Path | None, key: str, result: dict) -> Path:
    """Write ``result`` under ``key`` of the results file, keeping its other keys."""
    out = out or RESULTS
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out
