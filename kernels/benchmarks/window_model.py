"""A queue model of the overlapped windows (chunk.Plan.windows, chunk._overlapped) at one long sequence: how long a
direction's passes and per-chunk kernels take for a given split of the chunks into windows. No GPU needed.

The passes run back to back, window after window, each taking its share of the pass time P. When a window's pass is
done its per-chunk work (the output kernel forward; grad_state and grad_wy backward: G of GPU time over all chunks at
the whole GPU) joins a queue, which runs at the passes' idle share of the SMs while passes run and at the whole GPU
after. Assumed: passes are not slowed by the blocks beside them, and work is proportional to chunks.

    python kernels/benchmarks/window_model.py [--windows 4,8] [--growth 1,1.15,1.3,1.5]

The default cases are v15's kernel times at (1, 16384, 16, 128), H200 (kernels/benchmarks/NOTES.md v15, v16): the
passes 64 programs narrow (V blocks of 32) or 32 wide (64), of 132 SMs.
"""

import argparse

from bench_args import numbers

CASES = {  # direction, pass width: (pass µs, per-chunk µs, idle share of the SMs during passes)
    "backward, narrow pass": (544, 626, 68 / 132),
    "backward, wide pass": (616, 626, 100 / 132),
    "forward, narrow pass": (235, 136, 68 / 132),
    "forward, wide pass": (353, 136, 100 / 132),
}


def growing(count, growth):
    """Shares of the chunks for `count` windows, each `growth` times the one before (Plan.windows' weights)."""
    weights = [growth**i for i in range(count)]
    return [w / sum(weights) for w in weights]


def duration(passes, work, idle, shares, step=0.05):
    """µs until the last window's per-chunk work is done (time steps of `step` µs)."""
    ends, t = [], 0.0
    for share in shares:
        t += passes * share
        ends.append(t)
    released = done = t = 0.0
    finished = 0
    while finished < len(ends) or done < work - 1e-6:
        while finished < len(ends) and ends[finished] <= t + 1e-9:
            released += work * shares[finished]
            finished += 1
        done = min(released, done + (idle if t < ends[-1] else 1.0) * step)
        t += step
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=numbers("window counts, each ≥ 1", 1), default=[4, 8], help="window counts")
    ap.add_argument("--growth", type=numbers("growth factors, each ≥ 1", 1, kind=float), default=[1, 1.15, 1.3, 1.5],
                    help="each window this many times the one before")
    args = ap.parse_args(argv)
    counts, growths = args.windows, args.growth
    columns = [(n, g) for n in counts for g in growths]
    print("µs until the direction's per-chunk work is done\n")
    print("| case | one window | " + " | ".join(f"{n} windows, ×{g:g}" for n, g in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    table = {}
    for case, (passes, work, idle) in CASES.items():
        table[case] = [duration(passes, work, idle, [1.0])] + [
            duration(passes, work, idle, growing(n, g)) for n, g in columns]
        print(f"| {case} | " + " | ".join(f"{t:.0f}" for t in table[case]) + " |")
    return table


if __name__ == "__main__":
    main()
