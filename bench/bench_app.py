"""The benchmark's app: one no-op handler that records what it handled, as the peers' do."""

import os
import time

from jobrunner import JobRunner

OUT = os.environ.get("BENCH_OUT", "out")
jobs = JobRunner()


def record_line(n):
    # fixed width, so the driver counts handled messages from file sizes without reading them
    with open(os.path.join(OUT, str(os.getpid())), "a") as f:
        f.write("%09d\n" % n)


@jobs.handler
def record(n):
    record_line(n)


@jobs.handler(queue="latency")
def latency(n, sent_at):
    started = time.time()
    with open(os.path.join(OUT, "latency"), "a") as f:
        f.write("%d %.6f\n" % (n, started))  # the driver knows when dispatch was called and when it returned


@jobs.handler(queue="io")
def io_record(n):
    time.sleep(0.010)  # an I/O-bound handler: a network call
    record_line(n)
