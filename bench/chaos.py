"""Chaos: every kind of failure the engine process survives, one after another on one server under load; how long
each took to serve again, and whether anything was wrong on the way.

    .venv/bin/python bench/chaos.py                       # 3 rounds of the 11 events: ~3 minutes
    .venv/bin/python bench/chaos.py --rounds 10 --seed 7 --callers 8

tests/service/test_chaos.py's harness (one round there): a server in this process (its engine process a child) serves
the tests' `good` MLP, `crashy` model and `early` MLP under explicit model control. `--callers` threads call `good`
with IntegratedGradients in a closed loop, and one more on a single AttributeStream for the whole run; every answer is
checked against Captum's. The events run in a seeded random order, each once per round: SIGKILL; a second SIGKILL
while the restarted engine process loads; a request that ends the interpreter, at once and after a second with
requests queued behind it; the same sent by a client that retries; a forward stuck with the GIL free and held; an
engine process that hangs up and stops itself; a pause (SIGSTOP for a quarter of stuck_pass_seconds); a reload of
`good` under load; an unload and load of `crashy`. After each event: until health says SERVING (a new engine process
where one died), then one request to each model, checked. The restart back-off, which doubles while deaths come
within a minute of each other, is capped at `--max-restart-delay` (30 s in production) so that a run stays short.

Prints a row per event (FAILED and why where the server did not serve both models' right answers again), then per
kind of event the median and worst seconds to serve again, and what the callers got against what the metrics
counted. Any wrong answer, a call that outlived its deadline, or counts that differ is
printed as such; nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "service"), str(ROOT / "tests")]

import grpc  # noqa: E402
from query_of_death import print_rows  # noqa: E402
from test_chaos import Chaos, schedule  # noqa: E402

from attrserve_service import engine_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--limit", type=float, default=2.0, help="stuck_pass_seconds (the watchdog and the heartbeat)")
    parser.add_argument("--max-restart-delay", type=float, default=2.0)
    args = parser.parse_args()
    engine_process._MAX_RESTART_DELAY_S = args.max_restart_delay
    tmp = Path(tempfile.mkdtemp())
    os.environ["CRASHY_RELEASE"] = str(tmp / "never")  # the stuck forward is never released
    events = schedule(args.seed, args.rounds)
    chaos = Chaos(tmp, args.callers, args.seed, args.limit)
    started = time.monotonic()
    rows = []
    try:
        for event in events:
            try:
                rows.append(chaos.run(event))
            except (AssertionError, grpc.RpcError) as e:  # the server did not serve right again: say so, go on
                failed = e.details() if isinstance(e, grpc.RpcError) else str(e).splitlines()[0]
                rows.append({"event": event.name, "outcome": f"FAILED: {failed[:120]}", "serving again after s": None})
            print(rows[-1], file=sys.stderr, flush=True)
        time.sleep(0.5)
        seen = chaos.end()
    finally:
        chaos.close()
    print_rows(rows)
    print()
    by_kind: dict[str, list[float | None]] = {}
    for row in rows:
        by_kind.setdefault(row["event"], []).append(row["serving again after s"])
    summary = []
    for kind, times in by_kind.items():
        served = [t for t in times if t is not None]
        median, worst = (round(statistics.median(served), 2), max(served)) if served else ("", "")
        summary.append({"event": kind, "runs": len(times), "failed": len(times) - len(served), "median s": median, "worst s": worst})
    print_rows(summary)
    print()
    print(f"{len(events)} events in {time.monotonic() - started:.0f} s; {args.callers} callers")
    print(f"- the callers' calls: {seen['callers']} (and {chaos.checks} checks after the events, all equal to Captum)")
    agree = "equal" if seen["counted"] == seen["called"] else "DIFFERENT"
    print(f"- counted by attrserve_attributions_completed_total: {seen['counted']}: {agree}")
    deaths = sum(event.deaths for event in events)
    restarts = seen["restarts"]
    print(f"- engine process restarts counted: {restarts} of {deaths} deaths: {'equal' if restarts == deaths else 'DIFFERENT'}")
    print(f"- wrong answers: {len(chaos.wrong)}; calls that ended after their deadline: {len(chaos.late)}")
    print(f"- the caller on one AttributeStream: {chaos.streamed} answers; {chaos.stream_broke or 'the stream never broke'}")


if __name__ == "__main__":
    main()
