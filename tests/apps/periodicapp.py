"""An app with periodic handlers (JOBRUNNER_APP=periodicapp): every second, and a cron one."""

import os

from jobapp import jobs, record  # noqa: F401  (jobapp's handlers and queues too)


@jobs.periodic(every=1, queue="async")
def tick(scheduled_at):
    record("tick", "%d" % scheduled_at)


@jobs.periodic("30 4 * * 1-5", tz="Europe/Paris", name="weekday_report")
def report():
    record("report", os.getpid())
