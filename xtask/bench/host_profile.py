#!/usr/bin/env python3
"""Summarizes `palm bench --host-profile` output (folded stacks: thread;root;...;leaf COUNT).

Usage: host_profile.py FILE.folded [--top N] [--thread SUBSTRING]

Prints the samples per thread, then for each thread with at least a tenth of the samples (or
the one named) the functions with the most samples inclusive (anywhere on the stack, counted
once per sample) and exclusive (the leaf), as percentages of that thread's samples. Generic
parameters are dropped from the names so that monomorphized copies add up. burn 0.21 runs a
step on three threads: the caller (`palm`), fusion's server (`DSU-…`) and CubeCL's device
thread (`DSD-…`).
"""
import argparse
import collections
import re


def simplify(frame):
    # Drop generic arguments (nested <...>) and closure markers, keep the path.
    out, depth = [], 0
    for ch in frame:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    name = "".join(out)
    name = re.sub(r"::\{\{closure\}\}", "::{closure}", name)
    return name.replace("{closure}::{closure}", "{closure}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--thread")
    a = ap.parse_args()
    threads = collections.Counter()
    stacks = []
    with open(a.file) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            threads[frames[0]] += int(count)
            stacks.append((frames[0], [simplify(x) for x in frames[1:]], int(count)))
    total = sum(threads.values())
    print(f"{a.file}: {total} samples")
    for t, n in threads.most_common(8):
        print(f"  thread {t}: {n} ({100 * n / total:.1f}%)")
    picks = [a.thread] if a.thread else [t for t, n in threads.most_common() if n * 10 >= total]
    for pick in picks:
        summarize(stacks, pick, a.top)


def summarize(stacks, pick, top):
    incl, excl = collections.Counter(), collections.Counter()
    n_thread = 0
    for t, frames, n in stacks:
        if pick not in t:
            continue
        n_thread += n
        for fr in set(frames):
            incl[fr] += n
        if frames:
            excl[frames[-1]] += n
    print(f"thread {pick}: {n_thread} samples; inclusive:")
    for fr, n in incl.most_common(top):
        print(f"  {100 * n / n_thread:5.1f}%  {fr[:150]}")
    print("exclusive:")
    for fr, n in excl.most_common(top // 2):
        print(f"  {100 * n / n_thread:5.1f}%  {fr[:150]}")


if __name__ == "__main__":
    main()
