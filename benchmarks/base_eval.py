"""How well the bundled base segments, and what adapters add: benchmarks/results/base.json.

For the street domains (clear and five appearance shifts), through the real product path
on loopback (train, sign, publish, pull, verify, retrieve, fuse): the base model's mIoU, the
domain's own adapter's mIoU, SemLA's fused mIoU (top-k 5, T 0.05, every domain published) and
how often the domain's own adapter is the top contribution on its held-out images.

    python benchmarks/base_eval.py            # all domains, ~6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402
import torch  # noqa: E402

STREET_DOMAINS = ("clear", "fog", "night", "rain", "sepia", "snow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "base.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/semla-base-eval"))
    parser.add_argument("--domains", default=",".join(STREET_DOMAINS),
                        help="street domains (the demo's class list); the 20-domain study is semla_benchmark.py")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = demo.run(args.workdir, args.domains.split(","), [], n_train=args.n_train, n_test=args.n_test,
                       steps=args.steps, top_k=5, temperature=0.05)
    doms = results["domains"]
    shifted = [d for d in doms if d != "clear"]
    results["summary"] = {
        "base_miou_clear": doms.get("clear", {}).get("base_miou"),
        "mean_base_miou_shifted": round(sum(doms[d]["base_miou"] for d in shifted) / len(shifted), 4),
        "mean_own_adapter_miou_shifted": round(sum(doms[d]["own_adapter_miou"] for d in shifted) / len(shifted), 4),
        "mean_fused_miou_shifted": round(sum(doms[d]["fused_miou"] for d in shifted) / len(shifted), 4),
        "fused_beats_base_on_every_shifted_domain": all(doms[d]["fused_miou"] > doms[d]["base_miou"] for d in shifted),
        "min_top1_own_adapter_rate": min(doms[d]["top1_own_adapter_rate"] for d in doms),
    }
    results["command"] = ("python benchmarks/base_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results["machine"] = {"device": "cpu", "threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
