"""The charts of one run of run.py, as PNG files (matplotlib, a bench-only dependency)."""

import os


def draw(directory, io, loads, wake, drains):
    """``loads``: (label suffix, latency_under_load result) at the same rate; ``drains``: name -> throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []

    levels = sorted({c for series in io.values() for c in series})
    if levels:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        ax.plot(levels, [c / 0.010 for c in levels], color="#999999", linestyle=":", label="ideal (C / 10 ms)")
        for label, series in io.items():
            xs = sorted(series)
            ax.plot(xs, [series[c]["steady"] for c in xs], marker="o", label=label,
                    linewidth=2.5 if label.startswith("jobrunner") else 1.2)
        ax.set_xlabel("concurrent handlers, each waiting 10 ms")
        ax.set_ylabel("messages/s (steady)")
        ax.set_title("I/O-bound handlers on SQLite, 2-core machine")
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, directory, "bench-concurrency.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    top = max(max(max(load["latencies_ms"]) for _, load in loads), 1.0)
    bins = [x * top / 60 for x in range(61)]
    for suffix, load in loads:
        ax.hist(load["latencies_ms"], bins=bins, alpha=0.6,
                label="under load%s, %.0f msg/s (median %.2f ms, p99 %.2f ms)" % (
                    suffix, load["rate"], load["median_ms"], load["p99_ms"]))
    ax.hist(wake["latencies_ms"], bins=bins, alpha=0.7,
            label="idle worker woken (median %.2f ms)" % wake["median_ms"])
    ax.set_xlabel("ms from dispatch returning to handler start")
    ax.set_ylabel("messages")
    ax.set_yscale("log")
    ax.set_title("Latency on SQLite, 2 workers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, directory, "bench-latency.png"))

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    names = [name for name in drains if name.startswith("jobrunner")] + ["bare", "huey"]
    values = [drains[name]["drain"] for name in names]
    names = [name.replace("bare", "bare loop") for name in names]
    colors = ["#2a6fdb" if name.startswith("jobrunner") else "#999999" for name in names]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, " %.0f/s" % v, va="center", fontsize=8)
    ax.set_xlabel("messages/s, drain with 2 workers started cold (same handler work)")
    ax.set_title("Drain on SQLite")
    fig.tight_layout()
    paths.append(_save(fig, directory, "bench-drain.png"))
    return paths


def _save(fig, directory, name):
    import matplotlib.pyplot as plt

    path = os.path.join(directory, name)
    fig.savefig(path)
    plt.close(fig)
    return path
