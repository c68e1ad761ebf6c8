"""jobrunner beside Huey's SqliteHuey and a bare SQLite loop, measured in one run on this machine.

    pip install '.[bench]' && python bench/run.py

Absolute figures vary by machine; the ratios, all taken in the same run, are
what the targets are about.  Every drain handler records each message it
handled (one fixed-width line in a file per process), and every drain is
checked to have handled each message.  Not part of the test suite.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
# Workers start as an installed `jobrunner` command does: from cached bytecode.  Without it (some containers set
# PYTHONDONTWRITEBYTECODE) every worker compiles jobrunner.py at start: ~80 ms and ~18 MB of RSS it keeps.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
WORKER = [sys.executable, "-m", "jobrunner"]

import concurrency  # noqa: E402
import jobrunner  # noqa: E402
import peers  # noqa: E402

LINE = 10  # bytes per recorded message: "%09d\n"
PREFETCH = 16  # what the --prefetch rows use


class Run:
    """A scratch directory with an output folder, counting handled messages from file sizes."""

    root = ROOT

    def __init__(self, name):
        self.dir = tempfile.mkdtemp(prefix="jobrunner-bench-%s-" % name)
        self.out = os.path.join(self.dir, "out")
        os.mkdir(self.out)
        self.db = os.path.join(self.dir, "jobs.db")

    def handled(self):
        return sum(os.stat(os.path.join(self.out, f)).st_size for f in os.listdir(self.out) if f.isdigit()) // LINE

    def wait_handled(self, n, timeout=600):
        deadline = time.monotonic() + timeout
        while self.handled() < n:
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d handled" % (self.handled(), n))
            time.sleep(0.005)

    def check_each_once(self, n):
        seen = []
        for f in os.listdir(self.out):
            if f.isdigit():
                with open(os.path.join(self.out, f)) as fh:
                    seen.extend(int(line) for line in fh)
        assert sorted(seen) == list(range(n)), "a message was lost or handled twice"

    def env(self):
        return dict(os.environ, JOBRUNNER_DSN=self.db, JOBRUNNER_APP="bench_app", BENCH_OUT=self.out,
                    PYTHONPATH=os.pathsep.join([ROOT, HERE]))

    def start_workers(self, count, *queues, prefetch=1):
        return [subprocess.Popen(WORKER + ["consume", *(queues or ["async"]), "--prefetch", str(prefetch)],
                                 env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]

    def app(self):
        os.environ["BENCH_OUT"] = self.out
        import bench_app

        bench_app.OUT = self.out
        bench_app.jobs.use_dsn(self.db)
        return bench_app.jobs

    def close(self, workers=()):
        for p in workers:
            p.send_signal(signal.SIGTERM)
        for p in workers:
            p.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def jobrunner_throughput(n, workers, prefetch=1):
    run = Run("jobrunner")
    jobs = run.app()
    jobs.setup()
    started = time.perf_counter()
    for i in range(n):
        jobs.dispatch("record", {"n": i})
    enqueue = n / (time.perf_counter() - started)
    jobs.transport.connection().execute("DELETE FROM messenger_messages")
    started = time.perf_counter()
    jobs.dispatch_many("record", [{"n": i} for i in range(n)])
    batch = n / (time.perf_counter() - started)
    jobs.transport.close()
    started = time.perf_counter()
    procs = run.start_workers(workers, prefetch=prefetch)
    run.wait_handled(n)
    drain = n / (time.perf_counter() - started)
    run.check_each_once(n)
    run.close(procs)
    return {"enqueue": enqueue, "batch": batch, "drain": drain}


def huey_throughput(n, workers):
    run = Run("huey")
    try:
        result = peers.huey(run.dir, n, workers, run.wait_handled)
        run.check_each_once(n)
        return result
    finally:
        run.close()


def bare_throughput(n, workers, record=True):
    run = Run("bare")
    try:
        result = peers.bare(run.dir, n, workers, record)
        if record:
            run.check_each_once(n)
        return result
    finally:
        run.close()


def median_of(fn, repeat, *args, **kwargs):
    results = [fn(*args, **kwargs) for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def wake_up(samples):
    """Latency from dispatch returning to handler start with one idle worker, and the idle worker's CPU use."""
    import psutil

    run = Run("latency")
    jobs = run.app()
    jobs.setup()
    [proc] = run.start_workers(1, "latency")
    time.sleep(1.5)
    worker = psutil.Process(proc.pid)
    cpu = sum(worker.cpu_times()[:2])
    started = time.time()
    time.sleep(10)
    idle_cpu = (sum(worker.cpu_times()[:2]) - cpu) / (time.time() - started)
    path = os.path.join(run.out, "latency")
    returned = []
    for i in range(samples):
        time.sleep(random.uniform(0.01, 0.05))
        jobs.dispatch("latency", {"n": i, "sent_at": time.time()})
        returned.append(time.time())
        deadline = time.monotonic() + 5
        while len(concurrency.whole_lines(path)) <= i and time.monotonic() < deadline:
            time.sleep(0.0005)
    started = concurrency._latency_starts(path, samples)
    run.close([proc])
    latencies = sorted(max(0.0, started[i] - returned[i]) for i in range(samples))
    return {"median_ms": statistics.median(latencies) * 1000, "p95_ms": latencies[int(len(latencies) * 0.95)] * 1000,
            "idle_cpu_pct": idle_cpu * 100, "latencies_ms": [x * 1000 for x in latencies]}


def claim_cost(queue_size, sample):
    """Seconds per message to claim, run a no-op handler and ack, from a queue of queue_size messages."""
    run = Run("scale")
    jobs = jobrunner.JobRunner(run.db)

    @jobs.handler
    def noop(n):
        pass

    chunk = 100000
    for start in range(0, queue_size, chunk):
        jobs.dispatch_many("noop", [{"n": i} for i in range(start, min(queue_size, start + chunk))])
    worker = jobs.worker(["async"], limit=sample)
    started = time.perf_counter()
    worker.run()
    per_message = (time.perf_counter() - started) / sample
    stats_started = time.perf_counter()
    cli = subprocess.run(WORKER + ["stats", "--json", "--dsn", run.db],
                         capture_output=True, text=True)
    stats_s = time.perf_counter() - stats_started
    ready = sum(q["ready"] for q in json.loads(cli.stdout)["queues"])
    assert ready == queue_size - sample, (ready, queue_size - sample)
    run.close()
    return per_message, stats_s


def memory(n):
    """RSS of an idle worker, and of the same worker after handling n messages."""
    import psutil

    run = Run("memory")
    jobs = run.app()
    jobs.setup()
    [proc] = run.start_workers(1)
    time.sleep(2)
    idle = psutil.Process(proc.pid).memory_info().rss
    jobs.dispatch_many("record", [{"n": i} for i in range(n)])
    run.wait_handled(n)
    time.sleep(1.5)
    after = psutil.Process(proc.pid).memory_info().rss
    run.close([proc])
    return idle, after


def verdict(ok):
    return "ok" if ok else "MISSED"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="messages per throughput run (default 20000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per throughput figure; the median is kept")
    parser.add_argument("--scale", type=int, default=1000000, help="messages in the big queue (default 1,000,000)")
    parser.add_argument("--memory-messages", type=int, default=100000)
    parser.add_argument("--concurrency", default="4,16,32,64",
                        help="concurrent 10 ms handlers to measure (default 4,16,32,64; empty: skip)")
    parser.add_argument("--plot", metavar="DIR", nargs="?", const="docs",
                        help="write PNG charts of this run to DIR (default docs/; needs matplotlib)")
    args = parser.parse_args()
    n, w = args.n, args.workers
    print("machine: %d cores, Python %s, SQLite %s; n=%d, %d workers, median of %d runs"
          % (os.cpu_count(), sys.version.split()[0], jobrunner.sqlite3.sqlite_version, n, w, args.repeat), flush=True)

    ours = median_of(jobrunner_throughput, args.repeat, n, w)
    prefetching = median_of(jobrunner_throughput, args.repeat, n, w, prefetch=PREFETCH)
    huey = median_of(huey_throughput, args.repeat, n, w)
    bare = median_of(bare_throughput, args.repeat, n, w)
    bare_silent = median_of(bare_throughput, args.repeat, n, w, record=False)
    print("\nthroughput (messages/s)        jobrunner      huey   bare loop   bare loop, not recording")
    print("  dispatch one by one        %9.0f %9.0f   %9.0f   %9.0f" % (ours["enqueue"], huey["enqueue"], bare["enqueue"], bare_silent["enqueue"]))
    print("  dispatch_many / batch      %9.0f %9s   %9.0f   %9.0f" % (ours["batch"], "-", bare["batch"], bare_silent["batch"]))
    print("  drain, %d workers           %9.0f %9.0f   %9.0f   %9.0f" % (w, ours["drain"], huey["drain"], bare["drain"], bare_silent["drain"]))
    print("  drain, --prefetch %-3d      %9.0f" % (PREFETCH, prefetching["drain"]), flush=True)

    load_rate = ours["drain"] / 2
    load = concurrency.latency_under_load(Run, load_rate, 10)
    print("\nlatency under load, from dispatch returning to the handler starting (dispatch at %.0f/s, half the "
          "drain rate, 2 workers): median %.2f ms, p99 %.2f ms (targets 2 ms, 20 ms): %s; from dispatch called: "
          "%.2f ms, %.2f ms" % (load["rate"], load["median_ms"], load["p99_ms"],
                                 verdict(load["median_ms"] <= 2 and load["p99_ms"] <= 20), load["from_call_median_ms"],
                                 load["from_call_p99_ms"]), flush=True)
    prefetched_loads = []
    for rate in (load_rate, prefetching["drain"] / 2):
        prefetched = concurrency.latency_under_load(Run, rate, 10, prefetch=PREFETCH)
        prefetched_loads.append(prefetched)
        print("  with --prefetch %d, dispatch at %.0f/s: median %.2f ms, p99 %.2f ms: %s; from dispatch called: "
              "%.2f ms, %.2f ms" % (PREFETCH, prefetched["rate"], prefetched["median_ms"], prefetched["p99_ms"],
                                     verdict(prefetched["median_ms"] <= 2 and prefetched["p99_ms"] <= 20),
                                     prefetched["from_call_median_ms"], prefetched["from_call_p99_ms"]), flush=True)
    io = io_sweep([int(c) for c in args.concurrency.split(",") if c.strip()])

    wake = wake_up(200)
    small, stats_small = claim_cost(10000, 5000)
    big, stats_big = claim_cost(args.scale, 5000)
    idle_rss, busy_rss = memory(args.memory_messages)

    mib = 1024 * 1024
    checks = [
        ("drain vs huey", ours["drain"] / huey["drain"], ">= 4x", ours["drain"] / huey["drain"] >= 4),
        ("drain vs bare loop", ours["drain"] / bare["drain"], ">= 0.5x", ours["drain"] / bare["drain"] >= 0.5),
        ("drain vs bare loop not recording", ours["drain"] / bare_silent["drain"], "(for reference)", True),
        ("drain --prefetch %d vs bare loop" % PREFETCH, prefetching["drain"] / bare["drain"], ">= 1x",
         prefetching["drain"] / bare["drain"] >= 1),
        ("drain --prefetch %d vs huey" % PREFETCH, prefetching["drain"] / huey["drain"], ">= 5x",
         prefetching["drain"] / huey["drain"] >= 5),
        ("dispatch vs huey", ours["enqueue"] / huey["enqueue"], ">= 5x", ours["enqueue"] / huey["enqueue"] >= 5),
        ("dispatch_many vs bare batch", ours["batch"] / bare["batch"], ">= 0.7x or >= 100,000/s",
         ours["batch"] / bare["batch"] >= 0.7 or ours["batch"] >= 100000),
        ("claim at %d vs at 10,000" % args.scale, big / small, "<= 1.5x", big / small <= 1.5),
    ]
    print("\nwake-up: median %.2f ms, p95 %.2f ms (targets 5 ms, 20 ms): %s" % (
        wake["median_ms"], wake["p95_ms"], verdict(wake["median_ms"] <= 5 and wake["p95_ms"] <= 20)))
    print("idle worker CPU: %.2f%% of a core (target < 1%%): %s" % (wake["idle_cpu_pct"], verdict(wake["idle_cpu_pct"] < 1)))
    print("claim+handle+ack: %.1f us/message from 10,000 queued, %.1f us from %d" % (small * 1e6, big * 1e6, args.scale))
    print("stats command on %d rows: %.2f s end to end (target 1 s): %s" % (args.scale, stats_big, verdict(stats_big <= 1)))
    print("worker RSS: idle %.1f MB, after %d messages %.1f MB (targets: both < 30 MB, within 10%%): %s" % (
        idle_rss / mib, args.memory_messages, busy_rss / mib,
        verdict(max(idle_rss, busy_rss) < 30 * mib and abs(busy_rss - idle_rss) <= 0.1 * idle_rss)))
    print("\nratios")
    for name, ratio, target, ok in checks:
        print("  %-38s %6.2fx   target %-24s %s" % (name, ratio, target, verdict(ok) if target[0] != "(" else ""))
    if args.plot:
        import charts

        drains = {"jobrunner": ours, "jobrunner --prefetch %d" % PREFETCH: prefetching, "huey": huey, "bare": bare}
        for path in charts.draw(args.plot, io, [("", load), (" --prefetch %d" % PREFETCH, prefetched_loads[0])],
                                wake, drains):
            print("chart: %s" % path)


# I/O-bound handlers: (label, how) for each contender; how(c) runs c concurrent handlers and returns rates
IO_CONTENDERS = [
    ("jobrunner, processes", lambda n, c: concurrency.jobrunner_io(Run, n, c, 1)),
    ("jobrunner, threads", lambda n, c: concurrency.jobrunner_io(Run, n, max(1, c // 16), c // max(1, c // 16))),
    ("jobrunner, threads --prefetch %d" % PREFETCH,
     lambda n, c: concurrency.jobrunner_io(Run, n, max(1, c // 16), c // max(1, c // 16), PREFETCH)),
    ("huey, processes", lambda n, c: concurrency.huey_io(Run, n, c, "process")),
    ("huey, threads", lambda n, c: concurrency.huey_io(Run, n, c, "thread")),
    ("bare loop, processes", lambda n, c: concurrency.bare_io(Run, n, c)),
]


def io_sweep(levels):
    """Each contender at each level of concurrency; messages per level: 3 s of the ideal rate."""
    results = {label: {} for label, _ in IO_CONTENDERS}
    if not levels:
        return results
    print("\nI/O-bound handlers (each waits 10 ms): fraction of the ideal C/10ms, cold (from start) / steady "
          "(5-95 %%), peak RSS of the process tree")
    print("  %-32s" % "concurrent handlers" + "".join("%22d" % c for c in levels))
    for label, how in IO_CONTENDERS:
        cells = []
        for c in levels:
            ideal = c / concurrency.WAIT
            rates = how(int(ideal * 3), c)
            results[label][c] = dict(rates, ideal=ideal)
            cells.append("%5.2f / %4.2f %6.0fM" % (rates["cold"] / ideal, rates["steady"] / ideal,
                                                   rates["rss"] / 2 ** 20) if rates["rss"] else
                         "%5.2f / %4.2f        " % (rates["cold"] / ideal, rates["steady"] / ideal))
        print("  %-32s" % label + "".join("%22s" % cell for cell in cells), flush=True)
    top = max(levels)
    for label in ("jobrunner, threads", "jobrunner, threads --prefetch %d" % PREFETCH):
        threads = results[label][top]
        print("%d concurrent handlers, %s (%d processes): %.2f of ideal steady, %.2f cold, tree RSS %.0f MB "
              "(targets 0.9, 300 MB): %s" % (top, label[len("jobrunner, "):], max(1, top // 16),
                                            threads["steady"] / threads["ideal"], threads["cold"] / threads["ideal"],
                                            threads["rss"] / 2 ** 20, verdict(threads["steady"] / threads["ideal"] >= 0.9
                                                                              and threads["rss"] < 300 * 2 ** 20)))
    return results


if __name__ == "__main__":
    main()
