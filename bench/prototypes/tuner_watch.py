"""Where the pass-size tuner takes a model's passes under a workload, over several fresh starts of `attrserve serve`
(each start probes again, so starts may begin at different sizes).

    .venv/bin/python bench/prototypes/tuner_watch.py --workload W2 --starts 3 --windows 4 --seconds 10

For each start and each window it prints the throughput, the mean rows per pass and the size the model's latest pass
of each kind was cut to (the `attrserve_pass_size_rows` gauge). The load client is bench/harness.py's, in this process.
"""

from __future__ import annotations

import argparse

import common
from common import W, harness


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="W2")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    w = W[a.workload]
    for start in range(a.starts):
        port, metrics_port = harness.free_port(), harness.free_port()
        server = common.start(f"tuner-watch-{start}", common.attrserve_argv(port, metrics_port), port)
        try:
            for window in range(a.windows):
                r = common.measure(server, a.workload, a.seconds, warmup=2.0 if window == 0 else 0.2, metrics_port=metrics_port)
                print(
                    f"start {start} window {window}: {r['req_s']:.0f} req/s, p50 {r['p50']:.1f} ms, "
                    f"{common.fmt(r.get('rows_per_pass'), 0)} rows/pass, sizes {harness.pass_sizes(metrics_port, w.model)}",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
