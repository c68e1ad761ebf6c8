"""jobapp's handlers behind an import that takes $SLOWSTART_S seconds, like a big app's: its workers stay
STARTING that long."""

import os
import time

time.sleep(float(os.environ.get("SLOWSTART_S", "0")))

from jobapp import jobs  # noqa: E402,F401
