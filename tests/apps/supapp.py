"""jobapp's handlers plus the few the supervisor tests need (JOBRUNNER_APP=supapp)."""

import os

from jobapp import jobs, record  # the same JobRunner: note, slow, crash... are here too

_ballast = []


@jobs.handler
def report(n, lines=20, width=60):
    """Print a multi-line report in one write, as a handler that dumps a command's output does."""
    text = "".join("report %s line %03d %s\n" % (n, i, "x" * width) for i in range(lines))
    os.write(1, text.encode())
    record("note", n)


@jobs.handler
def grow(n, mb):
    """Keep ``mb`` MiB resident for the rest of the worker's life (a leak)."""
    _ballast.append(b"\x01" * (mb * 1024 * 1024))
    record("note", n)
