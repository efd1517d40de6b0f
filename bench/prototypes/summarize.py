"""Merge the per-round lines the prototypes print ("round R SYSTEM WK: X req/s p50 Y ms ... cpu Z ms/req ...") from
one or more logs into one table: mean req/s (with every round), median p50 and CPU ms/req.

    python bench/prototypes/summarize.py bench/out/threads_reuseport.log bench/out/threads_reuseport2.log"""

import collections
import re
import statistics as S
import sys

PAT = re.compile(r"^round (\d+) (.+?) (W\d): (\d+) req/s p50 ([\d.]+) ms.*?cpu ([\d.]+) ms/req(?:.*?rows/pass (\S+))?")


def main() -> int:
    rows = collections.defaultdict(list)
    order = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            for line in fh:
                m = PAT.match(line)
                if m:
                    key = (m.group(3), m.group(2))
                    if key not in rows:
                        order.append(key)
                    rows[key].append((float(m.group(4)), float(m.group(5)), float(m.group(6)), m.group(7)))
    print("| workload | system | rounds | req/s mean (rounds) | p50 ms (median) | server CPU ms/req (median) | rows/pass |")
    print("|---|---|---:|---|---:|---:|---:|")
    for key in sorted(order, key=lambda k: (k[0], order.index(k))):
        r = rows[key]
        rp = ", ".join(x[3] for x in r if x[3] and x[3] != "None")
        print(
            f"| {key[0]} | {key[1]} | {len(r)} | {S.mean(x[0] for x in r):.0f} ({', '.join(f'{x[0]:.0f}' for x in r)}) | "
            f"{S.median(x[1] for x in r):.2f} | {S.median(x[2] for x in r):.2f} | {rp or '—'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
