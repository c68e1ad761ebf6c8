"""Dispatch and drain of two versions of jobrunner, alternated in one run: did a change slow the hot path?

    python bench/compare.py BEFORE_REF [AFTER_REF] [-n 20000] [--repeat 3]

Each ref (a commit, a tag, a branch; AFTER defaults to the working tree) is
checked out in a temporary git worktree.  For each, in turn: n messages
dispatched one by one on a fresh SQLite file, then drained by 2 `consume`
workers started cold, with bench_app's recording handler.  Prints the medians
and the after/before ratios.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_MEASURE = r"""
import json, os, subprocess, sys, time
root, n, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path[:0] = [root, os.path.join(root, "bench")]
out = os.path.join(directory, "out")
os.mkdir(out)
os.environ["BENCH_OUT"] = out
import bench_app
bench_app.OUT = out
jobs = bench_app.jobs
jobs.use_dsn(os.path.join(directory, "jobs.db"))
jobs.setup()
started = time.perf_counter()
for i in range(n):
    jobs.dispatch("record", {"n": i})
enqueue = n / (time.perf_counter() - started)
jobs.transport.close()
env = dict(os.environ, JOBRUNNER_DSN=os.path.join(directory, "jobs.db"), JOBRUNNER_APP="bench_app", BENCH_OUT=out,
           PYTHONPATH=os.pathsep.join([root, os.path.join(root, "bench")]))
started = time.perf_counter()
workers = [subprocess.Popen([sys.executable, "-m", "jobrunner", "consume", "async"], env=env, cwd=directory,
                            stderr=subprocess.DEVNULL) for _ in range(2)]
while sum(e.stat().st_size for e in os.scandir(out)) // 10 < n:
    time.sleep(0.003)
drain = n / (time.perf_counter() - started)
for w in workers:
    w.terminate()
for w in workers:
    w.wait()
print(json.dumps({"enqueue": enqueue, "drain": drain}))
"""


def checkout(ref, into):
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", into, ref], check=True)
    return into


def measure(root, n):
    directory = tempfile.mkdtemp(prefix="jobrunner-compare-")
    try:
        result = subprocess.run([sys.executable, "-c", _MEASURE, root, str(n), directory], capture_output=True,
                                text=True, check=True)
        return json.loads(result.stdout)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="jobrunner-refs-")
    roots = {"before": checkout(args.before, os.path.join(scratch, "before"))}
    roots["after"] = checkout(args.after, os.path.join(scratch, "after")) if args.after else ROOT
    try:
        results = {"before": [], "after": []}
        for _ in range(args.repeat):  # alternated, so that a noisy moment hits both
            for side in ("before", "after"):
                results[side].append(measure(roots[side], args.n))
                time.sleep(0.5)
        medians = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in results.items()}
        print("n=%d, 2 workers, SQLite, medians of %d alternated runs" % (args.n, args.repeat))
        for key, label in (("enqueue", "dispatch one by one"), ("drain", "drain, 2 workers (cold)")):
            before, after = medians["before"][key], medians["after"][key]
            print("  %-26s before %9.0f/s   after %9.0f/s   %+.1f%%" % (label, before, after, (after / before - 1) * 100))
    finally:
        for side, root in roots.items():
            if root != ROOT:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", root], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
