"""jobrunner on PostgreSQL beside a bare psycopg loop and Procrastinate, measured in one run on one server.

    pip install '.[bench]' procrastinate && python bench/pg.py [--dsn postgresql://postgres@127.0.0.1/test]

Every contender does the same handler work (one fixed-width line appended to a
file per process, open/append/close per message), its workers are forked from
this script (their modules already imported), and every drain is checked to
have handled each message exactly once.  The bare loop claims and deletes in one
statement (at-most-once): the floor of a Python worker's cost per message.
Absolute figures vary by machine; the ratios, taken in the same run, are what
the targets are about.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import psycopg  # noqa: E402

import concurrency  # noqa: E402
import jobrunner  # noqa: E402

LINE = 10
PREFETCH = 16  # what the --prefetch rows use


def record_line(out, n):
    with open(os.path.join(out, str(os.getpid())), "a") as f:
        f.write("%09d\n" % n)


class Output:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jobrunner-pgbench-")

    def handled(self):
        return sum(e.stat().st_size for e in os.scandir(self.dir)) // LINE

    def wait(self, n, timeout=300):
        deadline = time.monotonic() + timeout
        while self.handled() < n:
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d handled" % (self.handled(), n))
            time.sleep(0.005)

    def check_each_once(self, n):
        seen = []
        for e in os.scandir(self.dir):
            with open(e.path) as f:
                seen.extend(int(line) for line in f)
        assert sorted(seen) == list(range(n)), "a message was lost or handled twice"

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def fork_workers(count, target):
    """Fork ``count`` processes running ``target()``; each exits when it returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                target()
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    return pids


def reap(pids):
    for pid in pids:
        os.waitpid(pid, 0)


def fresh_schema(admin, schema):
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS %s CASCADE" % schema)


def with_option(dsn, key, value):
    return "%s%s%s=%s" % (dsn, "&" if "?" in dsn else "?", key, value)


# --- jobrunner -----------------------------------------------------------------------------------


def jobrunner_run(admin, n, workers, prefetch=1):
    fresh_schema(admin, "bench_jobrunner")
    out = Output()
    jobs = jobrunner.JobRunner(with_option(admin, "schema", "bench_jobrunner"))
    jobs.handler("record")(lambda n: record_line(out.dir, n))
    jobs.setup()
    started = time.perf_counter()
    for i in range(n):
        jobs.dispatch("record", {"n": i})
    enqueue = n / (time.perf_counter() - started)
    jobs.transport.connection().execute("DELETE FROM messenger_messages")
    started = time.perf_counter()
    jobs.dispatch_many("record", [{"n": i} for i in range(n)])
    batch = n / (time.perf_counter() - started)
    jobs.close()
    started = time.perf_counter()
    pids = fork_workers(workers, lambda: jobs.worker(["async"], until_empty=True, install_signals=False,
                                                     prefetch=prefetch).run())
    out.wait(n)
    drain = n / (time.perf_counter() - started)
    reap(pids)
    out.check_each_once(n)
    out.close()
    return {"enqueue": enqueue, "batch": batch, "drain": drain}


def jobrunner_threads(admin, processes, threads, wait=0.010, prefetch=1):
    """``processes`` forked workers of ``threads`` threads each, draining handlers that wait 10 ms: rate and ideal."""
    fresh_schema(admin, "bench_threads")
    out = Output()
    jobs = jobrunner.JobRunner(with_option(admin, "schema", "bench_threads"))

    def io_record(n):
        time.sleep(wait)
        record_line(out.dir, n)

    jobs.handler("io_record")(io_record)
    ideal = processes * threads / wait
    n = int(ideal * 3)
    jobs.dispatch_many("io_record", [{"n": i} for i in range(n)])
    jobs.close()
    started = time.perf_counter()
    pids = fork_workers(processes, lambda: jobs.worker(["async"], until_empty=True, threads=threads, prefetch=prefetch,
                                                     install_signals=False).run())
    rates = concurrency.Rates(out, n).watch(started)
    reap(pids)
    out.check_each_once(n)
    out.close()
    return dict(rates, ideal=ideal)


def jobrunner_wake_up(admin, samples):
    """Dispatch to handler start with one idle worker (LISTEN/NOTIFY), and the idle worker's CPU."""
    import psutil

    fresh_schema(admin, "bench_wake")
    out = Output()
    jobs = jobrunner.JobRunner(with_option(admin, "schema", "bench_wake"))
    latencies = []

    @jobs.handler
    def ping(sent_at):
        latencies.append(time.time() - sent_at)

    jobs.setup()
    worker = jobs.worker(["async"], install_signals=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    time.sleep(1.0)
    proc = psutil.Process()
    before, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    time.sleep(5)
    idle = (sum(proc.cpu_times()[:2]) - before) / (time.monotonic() - t0)
    for _ in range(samples):
        expected = len(latencies) + 1
        jobs.dispatch("ping", {"sent_at": time.time()})
        deadline = time.monotonic() + 5
        while len(latencies) < expected and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(0.02)
    worker.stop()
    thread.join(10)
    jobs.close()
    out.close()
    latencies.sort()
    return {"p50_ms": statistics.median(latencies) * 1000, "p95_ms": latencies[int(len(latencies) * 0.95)] * 1000,
            "idle_cpu_pct": idle * 100}


# --- a bare psycopg loop, written here ----------------------------------------------------------

_BARE_DDL = """
DROP TABLE IF EXISTS bench_bare;
CREATE TABLE bench_bare (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL, headers TEXT NOT NULL,
    queue_name VARCHAR(190) NOT NULL, created_at DOUBLE PRECISION NOT NULL, available_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION);
CREATE INDEX bench_bare_ready ON bench_bare (queue_name, available_at, id) WHERE delivered_at IS NULL
"""
_BARE_INSERT = "INSERT INTO bench_bare (body, headers, queue_name, created_at, available_at) VALUES (%s, %s, %s, %s, %s)"
_BARE_TAKE = ("DELETE FROM bench_bare WHERE id = (SELECT id FROM bench_bare WHERE queue_name = %s AND delivered_at IS NULL "
              "AND available_at <= %s ORDER BY available_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING body, headers")


def bare_run(admin, n, workers):
    out = Output()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(_BARE_DDL)
        cur = conn.cursor()
        headers = json.dumps({"handler": "record"})
        started = time.perf_counter()
        for i in range(n):
            now = time.time()
            cur.execute(_BARE_INSERT, (json.dumps({"n": i}), headers, "async", now, now), prepare=True)
        enqueue = n / (time.perf_counter() - started)

    def work():
        with psycopg.connect(admin, autocommit=True) as conn:
            cur = conn.cursor()
            while True:
                row = cur.execute(_BARE_TAKE, ("async", time.time()), prepare=True).fetchone()
                if row is None:
                    return
                json.loads(row[1])
                record_line(out.dir, json.loads(row[0])["n"])

    started = time.perf_counter()
    pids = fork_workers(workers, work)
    out.wait(n)
    drain = n / (time.perf_counter() - started)
    reap(pids)
    out.check_each_once(n)
    out.close()
    return {"enqueue": enqueue, "drain": drain}


# --- Procrastinate --------------------------------------------------------------------------------


def procrastinate_run(admin, n, workers):
    import procrastinate

    database = "jobrunner_bench_procrastinate"
    parts = admin.split("?")[0].rsplit("/", 1)
    dsn = "%s/%s" % (parts[0], database)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS %s" % database)
        conn.execute("CREATE DATABASE %s" % database)
    out = Output()
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="record", queue="async")
    def record(n):
        record_line(out.dir, n)

    try:
        with app.open():
            app.schema_manager.apply_schema()
            started = time.perf_counter()
            for i in range(n):
                record.defer(n=i)
            enqueue = n / (time.perf_counter() - started)

        def work():
            app.run_worker(queues=["async"], concurrency=1, wait=False, delete_jobs="successful")

        started = time.perf_counter()
        pids = fork_workers(workers, work)
        out.wait(n)
        drain = n / (time.perf_counter() - started)
        reap(pids)
        out.check_each_once(n)
        return {"enqueue": enqueue, "drain": drain, "version": procrastinate.__version__}
    finally:
        out.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS %s" % database)


def median_of(fn, repeat, *args):
    results = [fn(*args) for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in results) if not isinstance(results[0][k], str) else results[0][k]
            for k in results[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("JOBRUNNER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with psycopg.connect(args.dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
    print("PostgreSQL %s, psycopg %s, %d cores; n=%d, medians of %d runs" % (server, psycopg.__version__, os.cpu_count(),
                                                                            args.n, args.repeat), flush=True)
    rows = []
    for workers in (2, 4):
        ours = median_of(jobrunner_run, args.repeat, args.dsn, args.n, workers)
        ours["prefetch"] = median_of(jobrunner_run, args.repeat, args.dsn, args.n, workers, PREFETCH)["drain"]
        bare = median_of(bare_run, args.repeat, args.dsn, args.n, workers)
        try:
            proc = median_of(procrastinate_run, args.repeat, args.dsn, args.n, workers)
        except ImportError:
            proc = None
        rows.append((workers, ours, bare, proc))
        print("\n%d workers            jobrunner   bare loop   procrastinate" % workers)
        print("  dispatch one by one  %9.0f   %9.0f   %13s" % (ours["enqueue"], bare["enqueue"],
                                                              "%.0f" % proc["enqueue"] if proc else "-"))
        print("  dispatch_many        %9.0f   %9s   %13s" % (ours["batch"], "-", "-"))
        print("  drain                %9.0f   %9.0f   %13s" % (ours["drain"], bare["drain"],
                                                              "%.0f" % proc["drain"] if proc else "-"))
        print("  drain, --prefetch %-2d %9.0f" % (PREFETCH, ours["prefetch"]), flush=True)
    for prefetch in (1, PREFETCH):
        threaded = jobrunner_threads(args.dsn, 4, 16, prefetch=prefetch)
        print("%s64 concurrent 10 ms handlers (4 processes x 16 threads%s): %.0f/s steady, %.0f/s cold; %.2f and %.2f "
              "of the ideal %.0f/s (target 0.9)" % ("\n" if prefetch == 1 else "", ", --prefetch %d" % prefetch
                                                    if prefetch > 1 else "", threaded["steady"], threaded["cold"],
                                                    threaded["steady"] / threaded["ideal"],
                                                    threaded["cold"] / threaded["ideal"], threaded["ideal"]), flush=True)
    wake = jobrunner_wake_up(args.dsn, 200)
    print("\nwake-up of an idle worker: p50 %.2f ms, p95 %.2f ms (target p50 <= 5 ms); idle CPU %.2f%% of a core"
          % (wake["p50_ms"], wake["p95_ms"], wake["idle_cpu_pct"]))
    print("\nratios")
    for workers, ours, bare, proc in rows:
        print("  drain, %d workers, vs the bare loop     %5.2fx   target >= 0.8x" % (workers, ours["drain"] / bare["drain"]))
        print("    with --prefetch %d                    %5.2fx" % (PREFETCH, ours["prefetch"] / bare["drain"]))
        if proc:
            print("  drain, %d workers, vs Procrastinate %s %5.2fx   target >= 5x" % (
                workers, proc["version"], ours["drain"] / proc["drain"]))
    ours, bare = rows[0][1], rows[0][2]
    print("  dispatch one by one vs the bare insert  %5.2fx   target >= 0.8x" % (ours["enqueue"] / bare["enqueue"]))


if __name__ == "__main__":
    main()
