"""Summarises `ncu --csv --page raw` output (one row per kernel launch) into the kernels that
take the most device time, with their launch shapes and how close they run to the H200's DRAM
and SM throughput. Used by `gpu.sh ncu`; prints a plain-text table."""
import collections
import csv
import sys

TIME = "gpu__time_duration.sum"
DRAM = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
SM = "sm__throughput.avg.pct_of_peak_sustained_elapsed"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read(path):
    """The header, units and kernel rows of one ncu CSV (none if the run left no table)."""
    with open(path, newline="", errors="replace") as f:
        # ncu prints its own progress lines before the CSV header.
        lines = [l for l in f if l.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        print("no kernel rows in", path)
        return None
    return rows[0], rows[1], rows[2:]


def main(paths):
    tables = [t for t in map(read, paths) if t]
    if not tables:
        return
    header, units = tables[0][0], tables[0][1]
    data = [r for t in tables for r in t[2] if len(r) == len(header)]
    col = {name: i for i, name in enumerate(header)}
    scale = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3,
             "ms": 1e-3, "second": 1.0, "s": 1.0}.get(units[col[TIME]], 1e-9)
    groups = collections.defaultdict(lambda: [0.0, 0, 0.0, 0.0])
    for r in data:
        key = (r[col["Kernel Name"]][:70], r[col["Grid Size"]], r[col["Block Size"]])
        t = number(r[col[TIME]]) * scale
        g = groups[key]
        g[0] += t
        g[1] += 1
        # The throughput columns are there only when they were asked for (NCU_METRICS).
        g[2] += number(r[col[DRAM]]) * t if DRAM in col else 0.0
        g[3] += number(r[col[SM]]) * t if SM in col else 0.0
    total = sum(g[0] for g in groups.values()) or 1.0
    print(f"{len(data)} launches, {total * 1e3:.1f} ms of device time "
          "(each launch replayed alone; DRAM and SM as % of peak, time-weighted)")
    print(f"{'ms':>9} {'share':>6} {'calls':>6} {'dram%':>6} {'sm%':>6}  kernel  grid  block")
    for (name, grid, block), (t, n, dram, sm) in sorted(
            groups.items(), key=lambda kv: -kv[1][0])[:50]:
        print(f"{t * 1e3:9.3f} {100 * t / total:5.1f}% {n:6d} {dram / t if t else 0:6.1f} "
              f"{sm / t if t else 0:6.1f}  {name}  {grid}  {block}")
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for (name, _, _), (t, n, _, _) in groups.items():
        by_name[name[:40]][0] += t
        by_name[name[:40]][1] += n
    print(f"\nBy kernel name (first 40 characters):\n{'ms':>9} {'share':>6} {'calls':>6}  kernel")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{t * 1e3:9.3f} {100 * t / total:5.1f}% {n:6d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
