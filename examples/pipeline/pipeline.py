"""A four-stage job pipeline, as its users ran it with Symfony Messenger and supervisord:

    new_job -> execute_job -> history_sent -> job_done

Each stage is a handler on a queue of its own name, so each gets its own workers (see pipeline.ini): the stage
that does the work scales and has memory and time limits, the bookkeeping stages stay at one process.

Every handler is transactional: it records its stage in the ``stages`` table and dispatches the next stage in
the transaction that also acknowledges its message.  A stage is therefore recorded exactly once and its
successor queued exactly when it is: a worker killed halfway leaves neither, and the message is handled again.

    python pipeline.py 20                         # submit 20 jobs
    jobrunner supervise --config pipeline.ini     # the workers; Ctrl-C or SIGTERM stops them gracefully
    jobrunner status --dsn var/pipeline.db        # in another shell: one line per worker process
    sqlite3 var/pipeline.db 'SELECT stage, count(*) FROM stages GROUP BY stage'

(with jobrunner installed: ``pip install .`` in its checkout; vendored, copy jobrunner.py here and run
``python jobrunner.py supervise --config pipeline.ini``).
"""

import hashlib
import os
import sys
import time
import uuid

from jobrunner import JobRunner

jobs = JobRunner(os.environ.get("JOBRUNNER_DSN") or "sqlite:///var/pipeline.db")

STAGES = ["new_job", "execute_job", "history_sent", "job_done"]


def record(db, job_id, stage, detail=None):
    """One row per job and stage.  The table is created by the first stage that needs it (IF NOT EXISTS is a
    lookup in SQLite's schema, cheap next to the write this transaction makes anyway); UNIQUE makes a stage
    recorded twice an error that rolls its transaction back instead of a silent duplicate."""
    db.execute("CREATE TABLE IF NOT EXISTS stages (job_id TEXT NOT NULL, stage TEXT NOT NULL, detail TEXT, "
               "pid INTEGER NOT NULL, at REAL NOT NULL, UNIQUE (job_id, stage))")
    db.execute("INSERT INTO stages (job_id, stage, detail, pid, at) VALUES (?, ?, ?, ?, ?)",
               (job_id, stage, detail, os.getpid(), time.time()))


@jobs.handler(queue="new_job", transactional=True)
def new_job(db, job_id):
    """Accept a job: validate it and queue its execution."""
    record(db, job_id, "new_job")
    jobs.dispatch("execute_job", {"job_id": job_id})


# The stage that does the work.  On SQLite a transactional handler holds the database's write lock while it
# runs, so this one stays short; work that takes minutes belongs before the transaction (a non-transactional
# stage), or on PostgreSQL, where transactions do not exclude each other.
@jobs.handler(queue="execute_job", transactional=True, max_retries=3, delay=10)
def execute_job(db, job_id):
    """Run the job: here a checksum standing in for the real computation."""
    result = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:16]
    record(db, job_id, "execute_job", result)
    jobs.dispatch("history_sent", {"job_id": job_id, "result": result})


@jobs.handler(queue="history_sent", transactional=True)
def history_sent(db, job_id, result):
    """Report the job's result to the history service (an HTTP call in production)."""
    record(db, job_id, "history_sent", result)
    jobs.dispatch("job_done", {"job_id": job_id})


@jobs.handler(queue="job_done", transactional=True)
def job_done(db, job_id):
    """Close the job."""
    record(db, job_id, "job_done")


def submit(count):
    """Queue ``count`` new jobs in one transaction; return the new_job messages' ids."""
    # random ids: unique across runs of this script and across hosts, with no counter to keep
    return jobs.dispatch_many("new_job", [{"job_id": uuid.uuid4().hex} for _ in range(count)])


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    ids = submit(count)
    print("submitted %d jobs (messages %d..%d) to %s" % (count, ids[0], ids[-1], jobs.transport.where))
