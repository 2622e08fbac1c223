"""Time per fuzzed input on the spec side: load + validate + resolve + plan of each mutant that
tests/test_fuzz.py checks for its outcome. The unit test asserts what each input ends in; the CPU
time each takes is measured here, where a loaded machine cannot fail a build.

Run: python bench/fuzz_speed.py [--inputs 3000] [--bound-ms 1000]  (writes bench/results/fuzz_speed.json)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_fuzz import _mutant  # noqa: E402

from planner import SpecError, make_plan  # noqa: E402
from planner.spec.document import load_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inputs", type=int, default=3000)
    ap.add_argument("--bound-ms", type=float, default=1000.0, help="CPU time per input that fails the run")
    args = ap.parse_args()
    times = []
    for i in range(args.inputs):
        file, data = _mutant(i)
        t0 = time.process_time()
        try:
            make_plan(load_text(data, file))
        except SpecError:
            pass
        times.append((time.process_time() - t0, i))
    slowest = sorted(times, reverse=True)[:5]
    result = {"machine": platform.node(), "python": platform.python_version(), "inputs": args.inputs,
              "median_ms": statistics.median(t for t, _ in times) * 1e3,
              "slowest_ms": [[round(t * 1e3, 1), i] for t, i in slowest], "bound_ms": args.bound_ms}
    out = ROOT / "bench" / "results" / "fuzz_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if slowest[0][0] * 1e3 < args.bound_ms else 1


if __name__ == "__main__":
    sys.exit(main())
