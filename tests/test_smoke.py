def test_dispatch_then_consume_handles_each_message_once(project):
    for n in range(20):
        assert project.cli("dispatch", "note", '{"n": %d}' % n).returncode == 0
    result = project.cli("consume", "async", "--limit", "20", "--time-limit", "20")
    assert result.returncode == 0, result.stderr
    assert project.values() == sorted(str(n) for n in range(20))
    assert "message limit of 20 reached" in result.stderr


# --- the oldest Python we claim --------------------------------------------------------------

import ast  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from conftest import REPO  # noqa: E402


def claimed_minimum():
    text = (REPO / "pyproject.toml").read_text()
    major, minor = re.search(r'requires-python = ">=(\d+)\.(\d+)"', text).groups()
    return int(major), int(minor)


def test_the_module_parses_as_the_oldest_python_we_claim():
    ast.parse((REPO / "jobrunner.py").read_text(), feature_version=claimed_minimum())


def oldest_interpreter():
    """A python of exactly the claimed minimum version on this machine, if there is one."""
    major, minor = claimed_minimum()
    name = "python%d.%d" % (major, minor)
    candidates = [shutil.which(name)] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%d.%d.*/bin/%s"
                                                                            % (major, minor, name))))
    for path in filter(None, candidates):
        probe = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str((major, minor)):
            return path
    return None


OLDEST_SMOKE = """
import jobrunner
jobs = jobrunner.JobRunner("sqlite:///j.db", delay=0.01)
seen = []

@jobs.handler(max_retries=1)
def boom(n):
    raise ValueError("boom %s" % n)

@jobs.handler
def ok(n):
    seen.append(n)

jobs.dispatch("boom", {"n": 1})
jobs.dispatch("ok", {"n": 2})
jobs.consume("async", limit=3, install_signals=False)
assert seen == [2], seen
[failed] = jobs.failed()
assert failed.error == "ValueError: boom 1", failed.error
assert "Traceback" in failed.headers["traceback"]
assert jobrunner._find_app_spec() == "myapp:jobs", jobrunner._find_app_spec()
print("ok")
"""


def test_the_oldest_python_we_claim_runs_a_worker_and_reads_pyproject(tmp_path):
    python = oldest_interpreter()
    if python is None:
        import pytest

        pytest.skip("no python%d.%d on this machine" % claimed_minimum())
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.jobrunner]\napp = "myapp:jobs"  # the app\n')
    result = subprocess.run([python, "-c", OLDEST_SMOKE], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JOBRUNNER_APP=""))
    assert result.stdout == "ok\n", result.stderr
