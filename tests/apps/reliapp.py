"""The app of the reliability suite: a handler that takes a few milliseconds and records
who handled which message, when it started and when it finished."""

import os
import time

from jobrunner import JobRunner

OUT = os.environ.get("JOBAPP_OUT", "handled")
WORK_S = float(os.environ.get("RELIAPP_WORK_S", "0.003"))

jobs = JobRunner(delay=0.05)


@jobs.handler
def work(n):
    started = time.time()
    time.sleep(WORK_S)
    os.makedirs(OUT, exist_ok=True)
    fd = os.open(os.path.join(OUT, str(os.getpid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, ("note %s %.6f %.6f\n" % (n, started, time.time())).encode())
    finally:
        os.close(fd)
