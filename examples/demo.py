"""A real run on the embedded SQLite default: dispatch a batch, drain it with a worker, show what happened.

    pip install . && python examples/demo.py
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.chdir(HERE)

from demo_app import jobs  # noqa: E402


def jobrunner(*args):
    env = dict(os.environ, JOBRUNNER_APP="demo_app")
    return subprocess.run([sys.executable, "-m", "jobrunner", *args], env=env, capture_output=True, text=True)


def main():
    for suffix in ("", "-wal", "-shm"):  # each run starts from an empty queue
        if os.path.exists(jobs.settings.path + suffix):
            os.remove(jobs.settings.path + suffix)
    print("database: %s" % jobs.setup())
    started = time.perf_counter()
    ids = jobs.dispatch_many("send_email", [{"to": "user%d@example.com" % i, "subject": "welcome"} for i in range(20)])
    jobs.dispatch("charge_card", {"order_id": 42, "cents": 1999})
    jobs.dispatch("flaky_webhook", {"url": "https://example.com/hook"})
    jobs.dispatch("send_email", {"to": "later@example.com", "subject": "a delayed one"}, delay=1.0)
    print("dispatched %d messages in %.1f ms (ids %d..%d and 3 more)" % (23, (time.perf_counter() - started) * 1000, ids[0], ids[-1]))
    print("\nstats before:\n" + jobrunner("stats").stdout)

    print("worker: jobrunner consume high async --time-limit 3 -v")
    worker = jobrunner("consume", "high", "async", "--time-limit", "3", "-v")
    print(worker.stdout, end="")
    handled = [line for line in worker.stderr.splitlines() if "handled by" in line]
    retried = [line for line in worker.stderr.splitlines() if "retrying" in line]
    print("\nthe worker handled %d messages (high priority first), retried %d failed attempt(s)" % (len(handled), len(retried)))
    stats = json.loads(jobrunner("stats", "--json").stdout)
    print("stats after: %s" % json.dumps(stats))
    if stats["failed"]:
        print("\nfailed messages (jobrunner failed show):\n" + jobrunner("failed", "show").stdout)


if __name__ == "__main__":
    main()
