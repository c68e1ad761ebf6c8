"""Every code block of the README, run in order in one fresh project directory, so the README cannot drift.

- ```python whose first line is ``# NAME.py`` is written to that file; any other is run as a script.
- ```ini whose first line is ``; NAME`` is written to that file; any other must parse.
- ```sh lines run one by one (``jobrunner`` installed on the PATH, and ``jobrunner.py`` vendored beside the
  app); each must exit 0.  A line commented ``stops on SIGTERM`` runs for a few seconds, then gets SIGTERM
  and must stop cleanly.  ``pip install`` is what the test environment already did; ``pytest`` is this run.
- ```json must parse.
"""

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO

BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks():
    return [(lang, text) for lang, text in BLOCK.findall((REPO / "README.md").read_text())]


def shell_lines(text):
    for line in text.splitlines():
        command, _, comment = line.partition("  #")
        command = command.strip()
        if command and not command.startswith("#"):
            yield command, comment.strip()


@pytest.fixture(scope="module")
def readme_project(tmp_path_factory):
    project = tmp_path_factory.mktemp("readme")
    shutil.copy(REPO / "jobrunner.py", project / "jobrunner.py")  # vendored
    bin_dir = project / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "jobrunner"  # installed
    shim.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (sys.executable, REPO / "jobrunner.py"))
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    env.update(PATH="%s:%s:%s" % (bin_dir, os.path.dirname(sys.executable), env.get("PATH", "")),
               PYTHONPATH="%s:%s" % (project, REPO), PYTHONUNBUFFERED="1")
    return project, env


def run_line(command, comment, project, env):
    if command.startswith("pip install"):
        command = command.partition("&&")[2].strip()
        if not command or command == "pytest":
            return
    if command == "python examples/demo.py":
        command = "%s %s" % (sys.executable, REPO / "examples" / "demo.py")
    proc = subprocess.Popen(["bash", "-c", command], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if "stops on SIGTERM" in comment:
        try:
            out, err = proc.communicate(timeout=3)
            raise AssertionError("%r ended by itself (exit %s): %s" % (command, proc.returncode, err))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("%r did not finish" % command)
    assert proc.returncode == 0, "%r exited %d:\n%s%s" % (command, proc.returncode, out, err)
    assert "Traceback" not in err, err


def test_the_readme_has_blocks_of_every_kind():
    kinds = {lang for lang, _ in blocks()}
    assert {"python", "sh", "ini", "json"} <= kinds


def test_every_readme_block_runs_in_order(readme_project):
    project, env = readme_project
    for number, (lang, text) in enumerate(blocks()):
        first = text.splitlines()[0] if text.strip() else ""
        if lang == "python":
            name = re.fullmatch(r"# (\w+\.py)", first)
            if name:
                (project / name.group(1)).write_text(text)
                continue
            script = project / ("readme_block_%02d.py" % number)
            script.write_text(text)
            result = subprocess.run([sys.executable, str(script)], cwd=project, env=env, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0, "README block %d:\n%s\n%s" % (number, text, result.stderr)
        elif lang == "ini":
            name = re.fullmatch(r"; (\S+)", first)
            if name:
                (project / name.group(1)).write_text(text)
            else:
                configparser.ConfigParser(interpolation=None).read_string(text)
        elif lang == "sh":
            for command, comment in shell_lines(text):
                run_line(command, comment, project, env)
        elif lang == "json":
            json.loads(text)
