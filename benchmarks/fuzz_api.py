"""Long schemathesis fuzzing of the registry API: benchmarks/results/fuzz.json.

The same registry, checks and admin token as ``tests/test_fuzz_api.py`` (imported from there:
a fresh registry with one publisher key and ``city-streets`` v1, called in-process through
``schemathesis.openapi.from_asgi``), with many more examples: for every operation of the served
``/openapi.json``, ``--max-examples`` positive and as many negative cases (Hypothesis, seeded).
Every response goes through all checks (a failing check is recorded, not raised, so one run
counts them all). Reported per operation and mode: requests sent, status codes seen, and the
distinct failures (must be none; the script exits 1 otherwise).

    python benchmarks/fuzz_api.py                      # 500 examples per operation and mode
    python benchmarks/fuzz_api.py --max-examples 50 --out /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import sys
import time
from pathlib import Path

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.generation import GenerationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_fuzz_api as fuzz  # noqa: E402  (tests/ is not a package: bundle_factory lives there too)


def fuzz_operation(operation, mode: GenerationMode, max_examples: int, seed_value: int) -> dict:
    statuses: collections.Counter[int] = collections.Counter()
    failures: dict[str, dict] = {}
    requests = 0

    @seed(seed_value)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are recorded, not raised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def run(case) -> None:
        nonlocal requests
        response = case.call(headers=fuzz.AUTH)
        requests += 1
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=fuzz.CHECKS, headers=fuzz.AUTH)
        except Exception as exc:  # noqa: BLE001 - every check failure is recorded
            key = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            entry = failures.setdefault(key, {"count": 0, "status": response.status_code, "example": None})
            entry["count"] += 1
            if entry["example"] is None:
                entry["example"] = case.as_curl_command()[:2000]

    error = None
    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        pass  # no negative form of an operation without parameters (GET /healthz, GET /v1/keys)
    except Exception as exc:  # noqa: BLE001 - reported, and counts as a failure
        error = repr(exc)[:500]
    out = {
        "requests": requests,
        "status_codes": {str(code): n for code, n in sorted(statuses.items())},
        "failures": sum(f["count"] for f in failures.values()) + (error is not None),
        "distinct_failures": failures,
    }
    if error is not None:
        out["error"] = error
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=500, help="per operation and generation mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # malformed-header chatter
    logging.getLogger("semla").setLevel(logging.CRITICAL)  # refusals are the expected answers

    t0 = time.perf_counter()
    operations: dict[str, dict] = {}
    for result in fuzz.schema.get_all_operations():
        operation = result.ok()
        per_mode = {}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            started = time.perf_counter()
            per_mode[mode.value] = fuzz_operation(operation, mode, args.max_examples, args.seed)
            per_mode[mode.value]["seconds"] = round(time.perf_counter() - started, 2)
            stats = per_mode[mode.value]
            print(f"{operation.label:55s} {mode.value:8s} {stats['requests']:5d} requests "
                  f"{stats['status_codes']} failures={stats['failures']}", flush=True)
        operations[operation.label] = per_mode

    total_requests = sum(m["requests"] for op in operations.values() for m in op.values())
    total_failures = sum(m["failures"] for op in operations.values() for m in op.values())
    results = {
        "command": ("python benchmarks/fuzz_api.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        "schemathesis": schemathesis.__version__,
        "hypothesis": hypothesis.__version__,
        "checks": [check.__name__ for check in fuzz.CHECKS],
        "max_examples_per_operation_and_mode": args.max_examples,
        "seed": args.seed,
        "summary": {"operations": len(operations), "requests": total_requests, "failures": total_failures},
        "operations": operations,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{total_requests} requests, {total_failures} failures -> {args.out}")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
