"""An app whose workers cannot start, like a deploy with a broken dependency.

Every import is counted in $SUPBROKEN_IMPORTS.  The first one (the
supervisor's pre-flight check) succeeds; every later one raises, until the
file $SUPBROKEN_FIXED exists.
"""

import os

from jobrunner import JobRunner

with open(os.environ["SUPBROKEN_IMPORTS"], "a") as _f:
    _f.write("%d\n" % os.getpid())
with open(os.environ["SUPBROKEN_IMPORTS"]) as _f:
    IMPORTS = len(_f.read().split())
if IMPORTS > 1 and not os.path.exists(os.environ["SUPBROKEN_FIXED"]):
    raise RuntimeError("cannot connect to the mail server (import %d)" % IMPORTS)

jobs = JobRunner(queue="async")


@jobs.handler
def ping(n):
    pass
