"""The deployment examples under examples/, started and checked for real.

- webapp: app.py served from a temporary copy of its directory with jobrunner.py vendored beside it; signups
  over HTTP, the rows they store, a worker that welcomes the user.
- pipeline: pipeline.ini run by a real `supervise`, 20 jobs through the four stages, SIGTERM.
- systemd, docker: Docker and systemd do not run here, so their files are parsed, every option they pass is
  checked against the real command line, and the commands they run (the units' ExecStart, the HEALTHCHECK)
  are run themselves.
- monitoring: every metric and label the dashboard and the alert rules use is one `jobrunner metrics` exposes.

Every process a test starts is killed at teardown with whatever it forked.
"""

import configparser
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest
from conftest import JOBRUNNER, REPO, query, wait_until

EXAMPLES = REPO / "examples"

# The metrics `jobrunner metrics` and GET /metrics expose, with their labels: the monitoring examples may use
# these and nothing else.
METRICS = {
    "jobrunner_queue_ready_messages": {"queue"},
    "jobrunner_queue_delayed_messages": {"queue"},
    "jobrunner_queue_in_flight_messages": {"queue"},
    "jobrunner_queue_paused": {"queue"},
    "jobrunner_queue_oldest_ready_age_seconds": {"queue"},
    "jobrunner_failed_messages": set(),
    "jobrunner_process_state": {"process", "program", "state"},
    "jobrunner_process_resident_memory_bytes": {"process", "program"},
    "jobrunner_messages_handled_total": {"queue", "handler"},
    "jobrunner_messages_retried_total": {"queue", "handler"},
    "jobrunner_messages_failed_total": {"queue", "handler"},
}
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series


def clean_env(**extra):
    """The test run's environment without anything that would point a process at another app, database or
    module path: each test says what it wants.  No bytecode is written into examples/ by the processes that
    import from it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_") and k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


class Processes:
    """Background processes of one test, each writing stdout and stderr to a file; at teardown every one still
    running is killed together with every process it forked (a supervisor's workers)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, args, cwd, env, name):
        out_path = self.tmp_path / ("%s-%d.out" % (name, len(self.procs)))
        with open(out_path, "w") as out:
            proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        proc.out_path = out_path
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc):
        return proc.out_path.read_text()

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                children = []
                try:
                    parent = psutil.Process(proc.pid)
                    parent.suspend()  # stopped, a supervisor cannot fork a replacement for a child we kill
                    children = parent.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
                proc.kill()
                for child in children:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(children, timeout=10)
            proc.wait(timeout=10)


@pytest.fixture
def processes(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.close()


def jobrunner_help(command):
    """``jobrunner COMMAND --help``, from the real command line."""
    result = subprocess.run([sys.executable, JOBRUNNER, command, "--help"], capture_output=True, text=True,
                            env=clean_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_options_exist(argv, command):
    """Every ``--option`` in ``argv`` is one ``jobrunner COMMAND`` accepts (a typo in a unit file or a
    Dockerfile would only show at deploy time)."""
    help_text = jobrunner_help(command)
    options = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert options, argv
    for option in options:
        assert re.search(r"(^|[\s,])%s\b" % re.escape(option), help_text), "%s: not an option of %s" % (option,
                                                                                                       command)


def stopwaitsecs(config_path):
    """Every program's stopwaitsecs in a supervise config (jobrunner's default, 10, where unset)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(config_path)
    return {s.split(":", 1)[1]: float(config[s].get("stopwaitsecs", "10")) for s in config.sections()
            if s.startswith("program:")}


PIPELINE_STOPWAIT = max(stopwaitsecs(EXAMPLES / "pipeline" / "pipeline.ini").values())


def seconds(value):
    """A systemd or Docker duration (``90``, ``90s``, ``1min 30s``, ``1m30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", value), value
    return sum(float(n) * units[u] for n, u in parts)


def alive(pid):
    """True while the process exists and is not a zombie waiting for its parent."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the web app -------------------------------------------------------------------------------------------


class WebApp:
    """examples/webapp copied to a temporary directory with jobrunner.py vendored beside app.py."""

    def __init__(self, directory, processes):
        self.dir = directory
        self.processes = processes
        self.db = directory / "var" / "webapp.db"
        # only the copy on the module path: the web app must run on the vendored jobrunner.py, and the worker
        # (`python jobrunner.py consume`) on it too, with this python's click
        self.env = clean_env(PYTHONPATH=str(directory))
        self.proc = None
        self.url = None

    def start(self):
        self.proc = self.processes.start([sys.executable, "app.py", "--port", "0"], self.dir, self.env, "webapp")

        def listening():
            assert self.proc.poll() is None, self.processes.output(self.proc)
            return re.search(r"^listening on (http://\S+) \(jobrunner (.+), database (.+)\)$",
                             self.processes.output(self.proc), re.M)

        line = wait_until(listening, timeout=10, message="the web app to listen")
        self.url = line.group(1)
        return line

    def request(self, method, path, form=None):
        """(status, decoded JSON body) of one HTTP request."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read()
            return error.code, (json.loads(body) if error.headers.get("Content-Type") == "application/json" else body)

    def signup(self, email):
        return self.request("POST", "/signup", {"email": email})

    def users(self):
        status, body = self.request("GET", "/users")
        assert status == 200, body
        return body

    def messages(self):
        return query(self.db, "SELECT id, queue_name, body, headers FROM messenger_messages ORDER BY id")

    def consume(self, *args):
        """One worker run, vendored: ``python jobrunner.py consume --app jobs ARGS`` in the app's directory."""
        return subprocess.run([sys.executable, "jobrunner.py", "consume", "--app", "jobs", *args], cwd=self.dir,
                              env=self.env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def webapp(tmp_path, processes):
    directory = tmp_path / "webapp"
    shutil.copytree(EXAMPLES / "webapp", directory, ignore=shutil.ignore_patterns("__pycache__", "var", "*.db*"))
    assert not (directory / "jobrunner.py").exists()  # the example itself vendors nothing: the test does
    shutil.copy(REPO / "jobrunner.py", directory / "jobrunner.py")
    app = WebApp(directory, processes)
    line = app.start()
    # the vendored copy is the one imported (an installed jobrunner is on this python's path too), and the
    # database is the default, relative to the app's directory
    assert line.group(2) == str(directory / "jobrunner.py")
    assert line.group(3) == str(app.db)
    return app


def test_a_signup_stores_the_user_and_its_message_together_and_a_worker_welcomes_the_user(webapp):
    status, body = webapp.signup("Ann@Example.com")
    assert status == 201, body
    assert set(body) == {"user_id", "message_id"}
    user_id, message_id = body["user_id"], body["message_id"]
    assert query(webapp.db, "SELECT id, email, welcomed FROM users") == [(user_id, "ann@example.com", 0)]
    [(stored_id, queue, payload, headers)] = webapp.messages()
    assert (stored_id, queue, json.loads(payload)) == (message_id, "mail", {"user_id": user_id})
    assert "send_welcome" in headers
    assert [(u["id"], u["email"], u["welcomed"]) for u in webapp.users()] == [(user_id, "ann@example.com", False)]

    worker = webapp.consume("--limit", "1", "-v")
    assert worker.returncode == 0, worker.stderr
    assert "welcome mail to ann@example.com" in worker.stdout
    assert "message %d handled by send_welcome" % message_id in worker.stderr
    # the UPDATE committed with the acknowledgement: the user is welcomed and the message is gone
    assert [(u["id"], u["welcomed"]) for u in webapp.users()] == [(user_id, True)]
    assert webapp.messages() == []

    webapp.proc.send_signal(signal.SIGTERM)
    assert webapp.proc.wait(timeout=10) == 0
    assert webapp.processes.output(webapp.proc).splitlines()[-1] == "stopped on SIGTERM"


def test_a_signup_that_fails_inside_the_transaction_stores_neither_the_user_nor_a_message(webapp):
    assert webapp.signup("ann@example.com")[0] == 201
    # the INSERT fails (email is UNIQUE): no second user, and the dispatch after it never happened
    status, body = webapp.signup("ann@example.com")
    assert (status, body) == (409, {"error": "ann@example.com is already signed up"})
    assert query(webapp.db, "SELECT count(*) FROM users") == [(1,)]
    assert len(webapp.messages()) == 1
    # the other way round: the INSERT succeeds, then storing the message fails (a trigger refuses it): the
    # user's row is rolled back with it, so no user is ever left without a welcome
    with sqlite3.connect(str(webapp.db)) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messenger_messages BEGIN "
                     "SELECT RAISE(ABORT, 'refused by the test'); END")
    status, _ = webapp.signup("bob@example.com")
    assert status == 500
    assert query(webapp.db, "SELECT email FROM users") == [("ann@example.com",)]
    assert len(webapp.messages()) == 1
    # the app is still fine once the database accepts messages again
    with sqlite3.connect(str(webapp.db)) as conn:
        conn.execute("DROP TRIGGER refuse")
    assert webapp.signup("bob@example.com")[0] == 201
    assert [u["email"] for u in webapp.users()] == ["ann@example.com", "bob@example.com"]
    assert len(webapp.messages()) == 2
    # bad input is refused before any transaction
    assert webapp.signup("not an address")[0] == 400
    assert webapp.request("GET", "/signup")[0] == 405
    assert webapp.request("GET", "/nowhere")[0] == 404
    assert query(webapp.db, "SELECT count(*) FROM users") == [(2,)]


# --- the pipeline ------------------------------------------------------------------------------------------

STAGES = ["new_job", "execute_job", "history_sent", "job_done"]


def test_the_pipeline_runs_20_jobs_through_its_four_stages_under_supervise(tmp_path, processes):
    directory = tmp_path / "pipeline"
    shutil.copytree(EXAMPLES / "pipeline", directory, ignore=shutil.ignore_patterns("__pycache__", "var"))
    env = clean_env(PYTHONPATH=os.pathsep.join([str(directory), str(REPO)]))
    db = directory / "var" / "pipeline.db"  # the app's default, as pipeline.ini names no dsn

    def cli(*args):
        result = subprocess.run([sys.executable, JOBRUNNER, *args], cwd=directory, env=env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    config = configparser.ConfigParser(interpolation=None)
    config.read(directory / "pipeline.ini")
    numprocs = {s.split(":", 1)[1]: int(config[s].get("numprocs", "1")) for s in config.sections()
                if s.startswith("program:")}
    assert sorted(numprocs) == sorted(STAGES)
    assert numprocs["execute_job"] == 3
    expected = sorted("%s_%02d" % (program, n) for program, count in numprocs.items() for n in range(count))

    sup = processes.start([sys.executable, JOBRUNNER, "supervise", "--config", "pipeline.ini"], directory, env,
                          "supervise")

    def running():
        assert sup.poll() is None, Processes.output(sup)
        if not db.exists():
            return None
        procs = json.loads(cli("status", "--json", "--dsn", str(db)))["processes"]
        if sorted(p["name"] for p in procs) == expected and all(p["state"] == "RUNNING" for p in procs):
            return procs
        return None

    procs = wait_until(running, timeout=15, message="every program RUNNING")
    assert {p["supervisor_pid"] for p in procs} == {sup.pid}
    pids = {program: {p["pid"] for p in procs if p["program"] == program} for program in numprocs}
    assert {program: len(p) for program, p in pids.items()} == numprocs

    submitted = subprocess.run([sys.executable, "pipeline.py", "20"], cwd=directory, env=env, capture_output=True,
                               text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("submitted 20 jobs")

    def done():
        try:
            return query(db, "SELECT count(*) FROM stages WHERE stage = 'job_done'")[0][0] == 20
        except sqlite3.OperationalError:  # no stages table before the first stage ran
            return False

    wait_until(done, timeout=20, interval=0.1, message="20 jobs done")
    rows = query(db, "SELECT job_id, stage, pid, at FROM stages ORDER BY at, rowid")
    assert len(rows) == 80
    jobs = {}
    for job_id, stage, pid, _ in rows:
        jobs.setdefault(job_id, []).append(stage)
        assert pid in pids[stage], "%s of job %s ran in pid %d, not one of its program's workers" % (stage, job_id,
                                                                                                    pid)
    assert len(jobs) == 20
    assert all(stages == STAGES for stages in jobs.values())  # each job through every stage once, in order
    assert query(db, "SELECT count(*) FROM messenger_messages") == [(0,)]
    for name in expected:
        assert (directory / "var" / "log" / ("%s.log" % name)).exists()  # log_dir = var/log

    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=15) == 0, Processes.output(sup)
    workers = [pid for program_pids in pids.values() for pid in program_pids]
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=5, message="the workers to be gone")
    assert json.loads(cli("status", "--json", "--dsn", str(db))) == {"processes": []}


# --- systemd -----------------------------------------------------------------------------------------------


def read_unit(name):
    unit = configparser.ConfigParser(strict=False, interpolation=None)  # systemd repeats keys; % is its own
    unit.optionxform = str  # keys are case-sensitive
    unit.read_string((EXAMPLES / "systemd" / name).read_text())
    return unit


def unit_command(unit, instance, variables=None):
    """A unit's ExecStart as the argv systemd would run for ``instance`` (``%i`` replaced, ``$VAR`` split into
    words as systemd does), with the installed ``jobrunner`` replaced by this checkout's."""
    line = unit["Service"]["ExecStart"].replace("%i", instance)
    argv = []
    for word in shlex.split(line):
        if word.startswith("$"):
            argv += (variables or {}).get(word[1:], "").split()
        else:
            argv.append(word)
    assert os.path.basename(argv[0]) == "jobrunner", argv
    return [sys.executable, JOBRUNNER] + argv[1:]


@pytest.mark.parametrize("name, command", [("jobrunner@.service", "supervise"),
                                           ("jobrunner-consume@.service", "consume")])
def test_the_systemd_units_stop_gracefully_restart_always_and_pass_real_options(name, command):
    unit = read_unit(name)
    service = unit["Service"]
    argv = unit_command(unit, "pipeline")
    assert argv[2] == command
    if command == "supervise":
        assert "supervise --config /etc/jobrunner/%i.ini" in service["ExecStart"]
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP re-reads the config
    else:
        assert re.search(r"\bconsume %i\b", service["ExecStart"])
    assert_options_exist(argv[3:], command)
    assert service["Restart"] == "always"
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to the main process only: workers must hear it once, from their supervisor
    assert service["KillMode"] == "mixed"
    # systemd's SIGKILL must come after the longest graceful stop the pipeline's programs are given
    assert seconds(service["TimeoutStopSec"]) > PIPELINE_STOPWAIT
    assert service["WorkingDirectory"].startswith("/")
    assert service["EnvironmentFile"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    text = (EXAMPLES / "systemd" / name).read_text()
    assert "systemctl enable --now" in text


# --- Docker ------------------------------------------------------------------------------------------------


def dockerfile():
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    instructions, pending = [], ""
    for line in (EXAMPLES / "docker" / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending
    return instructions


def only(instructions, keyword):
    found = [arguments for k, arguments in instructions if k == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


@pytest.fixture
def jobrunner_on_path(tmp_path):
    """A ``jobrunner`` command on the PATH, as the image's ``pip install .`` gives: this checkout's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "jobrunner"
    shim.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (shlex.quote(sys.executable), shlex.quote(JOBRUNNER)))
    shim.chmod(0o755)
    return str(bin_dir) + os.pathsep + os.environ.get("PATH", "")


def test_the_dockerfile_installs_jobrunner_stops_on_sigterm_and_supervises_the_pipeline():
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert only(instructions, "STOPSIGNAL") == "SIGTERM"
    assert "JOBRUNNER_DSN=sqlite:////data/" in only(instructions, "ENV")
    assert any(k == "RUN" and "pip install ." in a for k, a in instructions)
    assert "/data" in only(instructions, "VOLUME")
    assert only(instructions, "USER") != "root"
    # every file the image copies exists in the build context, the repository's root (compose.yaml's context)
    copied = []
    for keyword, arguments in instructions:
        if keyword == "COPY":
            sources = arguments.split()[:-1]
            for source in sources:
                assert (REPO / source).exists(), source
            copied += [os.path.basename(s) for s in sources]
    # CMD, exec form: the supervisor is PID 1 and gets Docker's SIGTERM itself
    cmd = json.loads(only(instructions, "CMD"))
    assert cmd[:2] == ["jobrunner", "supervise"]
    assert cmd[cmd.index("--config") + 1] in copied
    assert cmd[cmd.index("--log-dir") + 1] == "-"  # logs on stdout, for `docker logs`
    assert_options_exist(cmd[2:], "supervise")
    healthcheck = only(instructions, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert command.startswith("jobrunner health ")
    for option in ("--interval", "--timeout", "--start-period"):
        assert option + "=" in options
    assert seconds(re.search(r"--timeout=(\S+)", options).group(1)) < seconds(
        re.search(r"--interval=(\S+)", options).group(1))
    assert_options_exist(shlex.split(command.split("||")[0]), "health")


def test_the_dockerfiles_healthcheck_is_healthy_with_a_running_worker_only(tmp_path, processes, jobrunner_on_path):
    healthcheck = only(dockerfile(), "HEALTHCHECK")
    command = healthcheck.partition(" CMD ")[2]  # shell form: run by /bin/sh -c, as Docker does
    db = tmp_path / "var" / "pipeline.db"
    # what /etc/jobrunner/consume.env gives the unit, and the image's ENV gives the HEALTHCHECK
    env = clean_env(PATH=jobrunner_on_path, JOBRUNNER_DSN="sqlite:///%s" % db, JOBRUNNER_APP="pipeline",
                    PYTHONPATH=os.pathsep.join([str(EXAMPLES / "pipeline"), str(REPO)]))

    def health():
        return subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=30)

    # the container's first seconds: no database yet (what --start-period is for)
    result = health()
    assert result.returncode == 1 and "no database" in result.stdout, result.stdout + result.stderr
    # a worker, started by jobrunner-consume@.service's own command line for the execute_job queue
    worker = processes.start(unit_command(read_unit("jobrunner-consume@.service"), "execute_job",
                                          {"CONSUME_OPTIONS": "--memory-limit 256M -v"}), tmp_path, env, "consume")
    wait_until(lambda: worker.poll() is None and health().returncode == 0, timeout=15, interval=0.2,
               message="the HEALTHCHECK to pass with a worker running (%s)" % Processes.output(worker))
    assert health().stdout.startswith("OK")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, Processes.output(worker)
    result = health()
    assert result.returncode == 1 and "no worker is running" in result.stdout, result.stdout


def compose_services():
    """compose.yaml's services, read line by line (PyYAML is not a dependency): for each, its volumes,
    environment, command and stop_grace_period.  Checked against PyYAML when it is installed."""
    lines = (EXAMPLES / "docker" / "compose.yaml").read_text().splitlines()
    services, current, key = {}, None, None
    in_services = False
    for index, raw in enumerate(lines):
        # comments dropped; the continuation lines of a multi-line command are deeper than 6 and skipped here
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            in_services = text == "services:"
            continue
        if not in_services:
            continue
        if indent == 2:
            current = services.setdefault(text.rstrip(":"), {"volumes": [], "environment": {}})
        elif indent == 4:
            key, _, value = text.partition(":")
            value = value.strip()
            if key == "command":
                while value.count("[") > value.count("]"):  # a flow list over several lines: JSON once joined
                    index += 1
                    value += " " + lines[index].strip()
                current["command"] = json.loads(value)
            elif value:
                current[key] = value
        elif indent == 6 and key == "volumes":
            current["volumes"].append(text.lstrip("- ").strip())
        elif indent == 6 and key == "environment":
            name, _, value = text.partition(":")
            current["environment"][name] = value.strip()
    try:
        import yaml
    except ImportError:
        return services
    parsed = yaml.safe_load((EXAMPLES / "docker" / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        assert parsed[name].get("volumes", []) == service["volumes"]
        assert parsed[name].get("environment", {}) == service["environment"]
        assert parsed[name].get("command") == service.get("command")
    return services


def test_compose_runs_the_web_app_and_its_worker_on_one_sqlite_file_in_a_shared_volume(tmp_path):
    services = compose_services()
    web, worker = services["web"], services["worker"]
    text = (EXAMPLES / "docker" / "compose.yaml").read_text()
    # every service builds the image from the repository's root, the Dockerfile's build context
    assert set(re.findall(r"context: (\S+)", text)) == {"../.."} and (EXAMPLES / "docker" / "../..").resolve() == REPO
    assert text.count("dockerfile: examples/docker/Dockerfile") == len(services)
    # one named volume, mounted at the same place, and one database file in it
    assert web["volumes"] == worker["volumes"] and web["volumes"][0].startswith("data:")
    mount = web["volumes"][0].split(":")[1]
    dsn = web["environment"]["JOBRUNNER_DSN"]
    assert dsn == worker["environment"]["JOBRUNNER_DSN"]
    assert dsn.startswith("sqlite:///" + mount + "/")
    assert re.search(r"^volumes:\n  data:", text, re.M)
    # the web service runs app.py, the worker supervises the queue the app's handler is on
    assert web["command"][:2] == ["python", "app.py"] and "0.0.0.0" in web["command"]
    command = worker["command"]
    assert command[:2] == ["jobrunner", "supervise"]
    assert_options_exist(command[2:], "supervise")
    handlers = subprocess.run([sys.executable, JOBRUNNER, "handlers", "--json", *command[command.index("--app"):
                               command.index("--app") + 2]], cwd=tmp_path, capture_output=True, text=True,
                              env=clean_env(PYTHONPATH=str(EXAMPLES / "webapp")), timeout=30)
    assert handlers.returncode == 0, handlers.stderr
    queues = {h["queue"] for h in json.loads(handlers.stdout)["handlers"]}
    assert command[2] in queues
    # Docker's SIGKILL comes after the graceful stop each service's workers are given
    assert seconds(worker["stop_grace_period"]) > float(command[command.index("--stopwaitsecs") + 1])
    assert seconds(services["pipeline"]["stop_grace_period"]) > PIPELINE_STOPWAIT
    assert not list(tmp_path.iterdir())  # `handlers` needed no database, and made none


# --- monitoring --------------------------------------------------------------------------------------------

METRIC_NAME = re.compile(r"\bjobrunner_[a-z_]+\b")
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR_LABELS = re.compile(r"[{,]\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def check_promql(expr, where):
    """Every metric ``expr`` names is exposed, and every label it groups, matches or selects on belongs to one
    of its metrics (or to the scrape target).  Returns the metrics it uses."""
    metrics = set(METRIC_NAME.findall(expr))
    assert metrics, "%s: %r uses no jobrunner metric" % (where, expr)
    unknown = metrics - set(METRICS)
    assert not unknown, "%s: %r uses metrics jobrunner does not expose: %s" % (where, expr, sorted(unknown))
    labels = set().union(*(METRICS[m] for m in metrics)) | TARGET_LABELS
    used = {label.strip() for group in LABEL_LISTS.findall(expr) for label in group.split(",") if label.strip()}
    used |= set(SELECTOR_LABELS.findall(expr))
    assert used <= labels, "%s: %r uses labels its metrics do not have: %s" % (where, expr, sorted(used - labels))
    for counter in re.findall(r"\bjobrunner_\w+_total\b", expr):  # counters only ever through rate or increase
        assert re.search(r"\b(rate|increase)\(%s(\{[^}]*\})?\[\w+\]\)" % counter, expr), (where, expr)
    return metrics


def test_the_grafana_dashboard_uses_only_exposed_metrics_and_shows_what_on_call_needs():
    dashboard = json.loads((EXAMPLES / "monitoring" / "grafana-dashboard.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    [source] = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used, by_title = set(), {}
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource
            metrics = check_promql(target["expr"], panel["title"])
            used |= metrics
            by_title.setdefault(panel["title"], set()).update(metrics)
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= set(re.findall(r"\w+", target["expr"])), (panel["title"], target)
    # no two panels overlap
    cells = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, "%s overlaps %s" % (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            check_promql(variable["definition"], "variable " + variable["name"])
    # the panels the brief asks for: backlog, its age, throughput and failures, the failure queue, processes
    assert {"jobrunner_queue_ready_messages", "jobrunner_queue_in_flight_messages",
            "jobrunner_queue_oldest_ready_age_seconds", "jobrunner_messages_handled_total",
            "jobrunner_messages_failed_total", "jobrunner_failed_messages", "jobrunner_process_state",
            "jobrunner_process_resident_memory_bytes"} <= used
    rates = [t["expr"] for p in panels for t in p["targets"] if "_total" in t["expr"]]
    assert rates and all("[5m]" in expr for expr in rates)
    memory = [p for p in panels if "jobrunner_process_resident_memory_bytes" in by_title[p["title"]]]
    assert memory and all(p["fieldConfig"]["defaults"]["unit"] == "bytes" for p in memory)


def alert_rules():
    """alerts.yml's rules as dicts (alert, expr, for, labels, annotations), read line by line (PyYAML is not a
    dependency) and checked against PyYAML when it is installed."""
    text = (EXAMPLES / "monitoring" / "alerts.yml").read_text()
    assert re.search(r"^groups:\n  - name: \S+\n    rules:\n", text, re.M)
    rules = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^(\s*)- alert: (\w+)$", lines[index])
        index += 1
        if not match:
            continue
        indent = len(match.group(1)) + 2  # the rule's keys line up under "alert"
        rule = {"alert": match.group(2), "labels": {}, "annotations": {}}
        section = None
        while index < len(lines) and (not lines[index].strip() or
                                      len(lines[index]) - len(lines[index].lstrip()) >= indent):
            line = lines[index]
            index += 1
            depth = len(line) - len(line.lstrip())
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, _, value = line.strip().partition(":")
            value = value.strip()
            if depth == indent:
                section = key
                if value in ("|", ">-", ">", "|-"):  # a block scalar: the more indented lines that follow
                    block = []
                    while index < len(lines) and (not lines[index].strip() or
                                                  len(lines[index]) - len(lines[index].lstrip()) > indent):
                        block.append(lines[index].strip())
                        index += 1
                    value = ("\n" if value.startswith("|") else " ").join(block).strip()
                if value:
                    rule[key] = value
            elif section in ("labels", "annotations"):
                if value in ("|", ">-", ">", "|-"):
                    block = []
                    while index < len(lines) and (not lines[index].strip() or
                                                  len(lines[index]) - len(lines[index].lstrip()) > depth):
                        block.append(lines[index].strip())
                        index += 1
                    value = " ".join(block).strip()
                rule[section][key] = value.strip('"')
        rules.append(rule)
    try:
        import yaml
    except ImportError:
        return rules
    parsed = [r for group in yaml.safe_load(text)["groups"] for r in group["rules"]]
    assert [r["alert"] for r in parsed] == [r["alert"] for r in rules]
    for mine, theirs in zip(rules, parsed):
        assert " ".join(mine["expr"].split()) == " ".join(theirs["expr"].split())
        assert mine["labels"] == theirs["labels"] and mine["for"] == theirs["for"]
    return rules


def test_the_alert_rules_use_only_exposed_metrics_and_cover_the_health_checks():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {"QueueBacklogOld", "FailureQueueGrowing", "WorkerFatal", "NoWorkerRunning",
                          "QueuePausedTooLong", "WorkerMemoryHigh"}
    for name, rule in rules.items():
        check_promql(rule["expr"], name)
        assert rule["labels"].get("severity") in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
    backlog = rules["QueueBacklogOld"]
    assert "jobrunner_queue_oldest_ready_age_seconds" in backlog["expr"] and "> 300" in backlog["expr"]
    assert seconds(backlog["for"]) == 300
    growing = rules["FailureQueueGrowing"]
    assert "jobrunner_messages_failed_total" in growing["expr"] or "jobrunner_failed_messages" in growing["expr"]
    assert "[15m]" in growing["expr"]
    assert re.search(r'jobrunner_process_state\{state="FATAL"\}', rules["WorkerFatal"]["expr"])
    assert rules["WorkerFatal"]["labels"]["severity"] == "critical"
    no_worker = rules["NoWorkerRunning"]["expr"]
    assert 'absent(jobrunner_process_state{state="RUNNING"})' in no_worker and "== 0" in no_worker
    assert seconds(rules["NoWorkerRunning"]["for"]) == 300
    assert "jobrunner_queue_paused" in rules["QueuePausedTooLong"]["expr"]
    assert seconds(rules["QueuePausedTooLong"]["for"]) == 1800
    assert "jobrunner_process_resident_memory_bytes" in rules["WorkerMemoryHigh"]["expr"]
