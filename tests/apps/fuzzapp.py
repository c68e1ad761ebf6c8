"""The app the command-line fuzzer loads: one handler, nothing else callable."""

from jobrunner import JobRunner

jobs = JobRunner()


@jobs.handler
def note(n):
    pass
