"""Handlers that wait (10 ms, like a network call), run by C at once: jobrunner's processes and threads beside
Huey's and the bare loop's, and the latency of a message under a steady load.

Used by run.py (``--io``, and ``--plot`` for the charts); each function returns plain figures.
"""

import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import peers

WAIT = 0.010  # seconds each I/O-bound handler waits


class Rates:
    """Watches a run's output: cold rate (from start), steady rate (5 % to 95 % handled), peak RSS of a process tree."""

    def __init__(self, run, n):
        self.run, self.n = run, n
        self.peak_rss = 0

    def watch(self, started, root_pid=None):
        import psutil

        root = psutil.Process(root_pid) if root_pid else None
        marks = {}
        next_rss = 0.0
        deadline = time.monotonic() + 600
        while True:
            handled = self.run.handled()
            now = time.perf_counter()
            for fraction in (0.05, 0.95):
                if fraction not in marks and handled >= fraction * self.n:
                    marks[fraction] = (now, handled)
            if handled >= self.n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d handled" % (handled, self.n))
            if root is not None and now >= next_rss:
                next_rss = now + 0.25
                self.peak_rss = max(self.peak_rss, _tree_rss(root))
            time.sleep(0.005)
        (t5, h5), (t95, h95) = marks[0.05], marks[0.95]
        return {"cold": self.n / (now - started), "steady": (h95 - h5) / max(t95 - t5, 1e-9), "rss": self.peak_rss}


def _tree_rss(root):
    import psutil

    total = 0
    for proc in [root] + root.children(recursive=True):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def jobrunner_io(run_class, n, processes, threads, prefetch=1):
    """``supervise --numprocs P --threads T [--prefetch N]`` draining n messages whose handler waits 10 ms."""
    run = run_class("io")
    jobs = run.app()
    jobs.setup()
    jobs.dispatch_many("io_record", [{"n": i} for i in range(n)])
    jobs.transport.close()
    started = time.perf_counter()
    sup = subprocess.Popen([sys.executable, "-m", "jobrunner", "supervise", "io",
                            "--numprocs", str(processes), "--threads", str(threads), "--prefetch", str(prefetch), "--no-scheduler",
                            "--log-dir", os.path.join(run.dir, "log")],
                           env=run.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = Rates(run, n).watch(started, sup.pid)
        run.check_each_once(n)
        return result
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(60)
        run.close()


def huey_io(run_class, n, workers, worker_type):
    """Huey's consumer with ``workers`` processes or threads, the same 10 ms handler."""
    from huey import SqliteHuey
    from huey.consumer import Consumer

    run = run_class("huey-io")
    huey = SqliteHuey(filename=os.path.join(run.dir, "huey.db"))
    out = run.out

    @huey.task()
    def io_record(i):
        time.sleep(WAIT)
        peers.record_line(out, i)

    for i in range(n):
        io_record(i)

    def consume():
        Consumer(huey, workers=workers, worker_type=worker_type, periodic=False, initial_delay=0.001,
                 max_delay=0.01, backoff=1.0).run()

    proc = mp.get_context("fork").Process(target=consume)
    started = time.perf_counter()
    proc.start()
    try:
        result = Rates(run, n).watch(started, proc.pid)
        run.check_each_once(n)
        return result
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(30)
        run.close()


def bare_io(run_class, n, workers):
    """The bare claim/ack loop, one process per concurrent handler, the same 10 ms handler."""
    run = run_class("bare-io")
    try:
        holder = {}

        def drain():
            holder["result"] = peers.bare(run.dir, n, workers, wait=WAIT)

        thread = threading.Thread(target=drain)
        thread.start()
        while not os.path.exists(os.path.join(run.dir, "bare.started")):
            time.sleep(0.001)
        with open(os.path.join(run.dir, "bare.started")) as f:
            started = float(f.read())
        result = Rates(run, n).watch(started)
        thread.join()
        run.check_each_once(n)
        return result
    finally:
        run.close()


def latency_under_load(run_class, rate, seconds, workers=2, prefetch=1):
    """Dispatch at ``rate`` messages/s for ``seconds`` to ``workers`` workers; ms from dispatch to handler start.

    The target's measure is from ``dispatch`` returning (the message is
    stored) to its handler starting; the wait inside ``dispatch`` itself, for
    SQLite's write lock, is the producer's and is reported on its own, as the
    latency from ``dispatch`` called.
    """
    run = run_class("load")
    jobs = run.app()
    jobs.setup()
    procs = run.start_workers(workers, "latency", prefetch=prefetch)
    time.sleep(1.5)  # started and idle
    interval = 1.0 / rate
    count = int(rate * seconds)
    called, returned = [0.0] * count, [0.0] * count
    began = time.perf_counter()
    for i in range(count):
        target = began + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        called[i] = time.time()
        jobs.dispatch("latency", {"n": i, "sent_at": called[i]})
        returned[i] = time.time()
    achieved = count / (time.perf_counter() - began)
    started = _latency_starts(os.path.join(run.out, "latency"), count)
    run.close(procs)
    latencies = sorted(max(0.0, started[i] - returned[i]) * 1000 for i in range(count))
    from_call = sorted((started[i] - called[i]) * 1000 for i in range(count))
    return {"rate": achieved, "median_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99)], "latencies_ms": latencies,
            "from_call_median_ms": statistics.median(from_call), "from_call_p99_ms": from_call[int(count * 0.99)]}


def _latency_starts(path, count, timeout=60):
    """When each message's handler started (time.time()), by message number, once all have."""
    deadline = time.monotonic() + timeout
    while len(whole_lines(path)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    started = {int(n): float(at) for n, at in (line.split() for line in whole_lines(path))}
    missing = [i for i in range(count) if i not in started]
    if missing:
        raise RuntimeError("latency: %d of %d messages never handled" % (len(missing), count))
    return started


def whole_lines(path):
    """The lines handlers wrote to ``path`` so far, without one still being written."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return text[:text.rfind("\n") + 1].splitlines()
