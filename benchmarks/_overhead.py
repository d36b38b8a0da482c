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
from collections.abc import Iterator
from pathlib import Path

import httpx

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


def overhead_summary(rates: dict[str, list[float]], baseline: str) -> dict:
    """Medians per arm and the overhead of each arm against ``baseline``, in percent: of the
    medians, and the median of the per-round overheads (rounds are interleaved, so a round's
    arms saw about the same background load)."""
    medians = {arm: statistics.median(r) for arm, r in rates.items()}
    out: dict = {"median_per_s": {arm: round(m, 2) for arm, m in medians.items()}, "overhead_pct": {}}
    for arm, r in rates.items():
        if arm == baseline:
            continue
        paired = [100.0 * (b - x) / b for b, x in zip(rates[baseline], r)]
        of_medians = 100.0 * (medians[baseline] - medians[arm]) / medians[baseline]
        out["overhead_pct"][arm] = {"of_medians": round(of_medians, 2),
                                    "median_of_rounds": round(statistics.median(paired), 2)}
    return out


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
