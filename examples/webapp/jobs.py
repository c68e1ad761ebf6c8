"""The web app's jobs: one JobRunner on the app's own SQLite database, and the handler that welcomes a new user.

The users table and the message queue live in the same database file on purpose: a signup's INSERT and its
``send_welcome`` message then commit in one transaction (see app.py), and the handler's UPDATE commits in the
transaction that acknowledges the message.  Neither can happen without the other, whatever crashes when.

Workers import this module:

    python jobrunner.py consume --app jobs -v          # vendored: jobrunner.py beside this file
    jobrunner consume --app jobs -v                    # installed
"""

import os

from jobrunner import JobRunner

# JOBRUNNER_DSN wins so that a deployment (compose.yaml, a systemd env file) points the web app and its workers
# at one file; the default is relative to the working directory, as every jobrunner command's is.
jobs = JobRunner(os.environ.get("JOBRUNNER_DSN") or "sqlite:///var/webapp.db")

# UNIQUE: a second signup with the same address fails inside the transaction, so its message is never stored.
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    welcomed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
)
"""


def create_tables():
    """The app's own table (jobrunner creates its tables itself); idempotent, run when the web app starts."""
    with jobs.transaction() as db:
        db.execute(SCHEMA)


@jobs.handler(queue="mail", max_retries=5, delay=30, transactional=True)
def send_welcome(db, user_id):
    """Welcome a new user.

    A real app would hand the mail to its SMTP relay here, before the UPDATE: if the mail fails the handler
    raises, the UPDATE is rolled back with the acknowledgement, and the message is retried (30 s, 60 s, ...).
    """
    row = db.execute("SELECT email, welcomed FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None or row[1]:
        return  # deleted since, or already welcomed (a second message for the same user): nothing to do
    print("welcome mail to %s" % row[0], flush=True)
    db.execute("UPDATE users SET welcomed = 1 WHERE id = ?", (user_id,))
