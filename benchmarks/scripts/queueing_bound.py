"""What p99 latency any one-at-a-time server can reach under Poisson arrivals (an M/D/1 queue).

    python benchmarks/scripts/queueing_bound.py > queueing-bound.json   # results/2026-12-02-cpu/serve-queueing-bound.json

Service time is 1 (one image); arrivals are Poisson at ``rho`` of the server's capacity. Prints,
for each load, the steady-state p99 response time in service times, and the median p99 of runs of
16 requests (the bench's open-loop run). The issue's open-loop target (p99 at most 3x the single
request at 80% load) is above what queueing allows unless batching raises capacity under load.
"""

import json

import numpy as np


def responses(rho: float, n: int, rng: np.random.Generator) -> np.ndarray:
    arrivals = np.cumsum(rng.exponential(1.0 / rho, n))
    out, free = np.empty(n), 0.0
    for i, t in enumerate(arrivals):
        free = max(t, free) + 1.0
        out[i] = free - t
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for rho in (0.3, 0.35, 0.5, 0.7, 0.8, 0.9):
        r = responses(rho, 200_000, rng)
        runs = r[: len(r) // 16 * 16].reshape(-1, 16)
        rows.append({"load": rho, "p99_over_service": round(float(np.percentile(r, 99)), 2),
                     "mean_over_service": round(float(r.mean()), 2),
                     "median_p99_of_16_request_runs": round(float(np.median(np.percentile(runs, 99, axis=1))), 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
