"""`supervise`, `status` and `health`: real supervisors forking real workers on a real
SQLite file, driven by signals, observed through the command line and the files
the handlers write.  Every process a test starts is gone when it ends."""

import collections
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import psutil
import pytest
from conftest import JOBRUNNER, hold_write_lock, wait_until

pytestmark = pytest.mark.backends

QUICK = ()  # workers are RUNNING as soon as they say they are ready: no timer to shorten


class Supervisors:
    """Starts `supervise` in the background; at teardown kills it and every worker it forked."""

    def __init__(self, project):
        self.project = project
        self.procs = []
        self.workers = {}  # pid -> psutil.Process, every worker a test saw

    def start(self, *args, env=None, log_dir="log"):
        out_path = self.project.path / ("supervise-%d.out" % len(self.procs))
        with open(out_path, "w") as out:
            command = [sys.executable, JOBRUNNER, "supervise", *map(str, args)]
            if log_dir is not None:
                command += ["--log-dir", log_dir]
            proc = subprocess.Popen(command, cwd=self.project.path, env=dict(self.project.env, **(env or {})),
                                    stdout=out, stderr=subprocess.STDOUT)
        proc.out_path = out_path
        self.procs.append(proc)
        return proc

    def output(self, proc):
        return proc.out_path.read_text()

    def remember(self, pids):
        for pid in pids:
            if pid and pid not in self.workers:
                try:
                    self.workers[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    pass

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                ps = psutil.Process(proc.pid)
                with _suppress_gone():
                    # stopped, it cannot fork a replacement for a worker we are about to kill
                    ps.suspend()
                    wait_until(lambda: ps.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE), timeout=5)
                    for child in ps.children(recursive=True):
                        self.workers.setdefault(child.pid, child)
                proc.kill()
            proc.wait(timeout=10)
        for worker in self.workers.values():
            with _suppress_gone():
                if worker.is_running():
                    worker.kill()
        wait_until(lambda: not any(alive(w) for w in self.workers.values()), timeout=10, message="workers to die")


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (psutil.NoSuchProcess, ProcessLookupError))


def alive(process):
    """True while the process exists and is not a zombie (an orphan's reaper may be slow)."""
    if isinstance(process, int):
        try:
            process = psutil.Process(process)
        except psutil.NoSuchProcess:
            return False
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def sups(project):
    s = Supervisors(project)
    yield s
    s.close()


# --- helpers reading what the command line says ---------------------------------------


def status(project, sups=None, missing_ok=False):
    result = project.cli("status", "--json")
    if missing_ok and result.returncode == 2 and ("no database at" in result.stderr or "no jobrunner tables" in result.stderr):
        return {"processes": []}  # the supervisor has not created it yet
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    if sups is not None:
        sups.remember(p["pid"] for p in data["processes"])
    return data


def supervised(data):
    """The supervised processes in ``status --json`` by name (standalone workers have no supervisor_pid)."""
    return {p["name"]: p for p in data["processes"] if p["supervisor_pid"] is not None}


def wait_running(project, sups, names, exclude=(), timeout=10):
    """Wait until exactly ``names`` are RUNNING and registered (beating), with pids not in ``exclude``."""

    def ready():
        procs = supervised(status(project, sups, missing_ok=True))
        if sorted(procs) != sorted(names):
            return None
        if all(p["state"] == "RUNNING" and p["pid"] and p["beat_age_s"] is not None and p["pid"] not in exclude
               for p in procs.values()):
            return procs
        return None

    return wait_until(ready, timeout=timeout, message="%s RUNNING" % ", ".join(names))


def health(project, *args):
    return project.cli("health", *args)


def health_without_workers(project, *args):
    return project.cli("health", "--allow-no-workers", *args)


def log_text(project, name, log_dir="log"):
    path = project.path / log_dir / name
    return path.read_text() if path.exists() else ""


def stats(project):
    result = project.cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    return {q["queue"]: q for q in data["queues"]}, data["failed"]


def dispatch(project, name, _env=None, **payload):
    result = project.cli("dispatch", name, json.dumps(payload), env=_env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def first_start(project):
    """The pid of the worker that started the slow message (it records "start" first)."""
    return wait_until(lambda: project.handled("start"), timeout=5, message="a worker to start the slow message")[0][1]


# --- running workers ----------------------------------------------------------------------


def test_workers_run_under_their_program_names_with_private_logs_and_status_tells_their_state(project, sups, app):
    sup = sups.start("high", "async", "--numprocs", 2, *QUICK)
    procs = wait_running(project, sups, ["high-async_00", "high-async_01"])
    pids = {p["pid"] for p in procs.values()}
    assert len(pids) == 2
    children = psutil.Process(sup.pid).children()
    assert {c.pid for c in children} == pids
    for pid in pids:
        assert os.getpgid(pid) == pid  # its own process group: a terminal's Ctrl-C is for the supervisor
    app.dispatch_many("note_high", [{"n": i} for i in range(3)])
    app.dispatch_many("note", [{"n": i} for i in range(4)])
    wait_until(lambda: len(project.handled("high")) == 3 and len(project.handled("note")) == 4, message="7 messages")
    assert {pid for _, pid in project.handled("high") + project.handled("note")} <= pids
    # the counts reach status with the workers' next heartbeats
    def counted():
        procs = supervised(status(project))
        return sum(p["handled"] for p in procs.values()) == 7 and procs

    procs = wait_until(counted, timeout=5, message="status to count 7 handled messages")
    for name, p in procs.items():
        assert p["state"] == "RUNNING"
        assert p["program"] == "high-async"
        assert p["supervisor_pid"] == sup.pid
        assert p["pid"] in pids
        assert isinstance(p["uptime_s"], float) and 0 < p["uptime_s"] < 30
        assert isinstance(p["rss_bytes"], int) and p["rss_bytes"] > 1024 * 1024
        assert p["handled"] == sum(1 for _, pid in project.handled("high") + project.handled("note") if pid == p["pid"])
    text = project.cli("status")
    assert text.returncode == 0
    for name, p in procs.items():
        assert re.search(r"^%s +RUNNING +pid %d, uptime " % (name, p["pid"]), text.stdout, re.M), text.stdout
    result = health(project)
    assert (result.returncode, result.stdout) == (0, "OK: 0 ready, 0 failed\n")

    logs = project.path / "log"
    assert sorted(os.listdir(logs)) == ["high-async_00.log", "high-async_01.log", "supervisor.log"]
    for name in os.listdir(logs):
        assert stat.S_IMODE(os.stat(logs / name).st_mode) == 0o600, name
    for name, p in procs.items():
        expected = "worker %s (pid %d) consuming high, async from %s" % (name, p["pid"], project.where)
        assert expected in log_text(project, name + ".log")
    assert "spawned high-async_00 with pid %d" % procs["high-async_00"]["pid"] in log_text(project, "supervisor.log")


def test_status_lists_each_supervised_worker_once_from_the_moment_it_is_spawned(project, sups):
    sups.start("async", "--numprocs", 2, *QUICK)
    snapshots = []

    def running():
        data = status(project, missing_ok=True)
        snapshots.append(data["processes"])
        procs = supervised(data)
        return len(procs) == 2 and all(p["state"] == "RUNNING" and p["beat_age_s"] is not None for p in procs.values())

    wait_until(running, timeout=10, message="async_00 and async_01 RUNNING")
    for procs in snapshots:
        names = [p["name"] for p in procs]
        assert len(names) == len(set(names)), procs  # one line per process, not a row and a "standalone" worker
        assert all(p["supervisor_pid"] is not None for p in procs), procs


def test_a_worker_killed_while_it_holds_a_message_is_replaced_and_the_message_handled_again(project, sups):
    sup = sups.start("slow", "--numprocs", 2, *QUICK)
    procs = wait_running(project, sups, ["slow_00", "slow_01"])
    dispatch(project, "slow", n=1, seconds=1)
    victim = first_start(project)
    name = next(n for n, p in procs.items() if p["pid"] == victim)
    survivor = next(p["pid"] for n, p in procs.items() if p["pid"] != victim)
    os.kill(victim, signal.SIGKILL)
    # released at once by the supervisor, which reaps its child: no heartbeat timeout to wait for
    wait_until(lambda: len(project.handled("start")) == 2, timeout=5, message="the message to be handled again")
    wait_until(lambda: project.handled("note"), timeout=5, message="the message to be finished")
    [(_, again)] = project.handled("note")
    assert again != victim
    assert sorted(project.handled("start")) == sorted([("1", victim), ("1", again)])
    assert not alive(victim)
    procs = wait_running(project, sups, ["slow_00", "slow_01"], exclude=(victim,))
    assert procs[name]["pid"] not in (victim, survivor)  # replaced
    assert survivor in {p["pid"] for p in procs.values()}  # the other one untouched
    queues, failed = stats(project)
    assert (queues.get("slow", {}).get("ready", 0), queues.get("slow", {}).get("in_flight", 0), failed) == (0, 0, 0)
    log = log_text(project, "supervisor.log")
    assert "%s (pid %d) killed by SIGKILL" % (name, victim) in log
    assert "released 1 message(s) held by dead worker(s) %d" % victim in log
    assert health(project).returncode == 0
    assert sup.poll() is None


def test_a_worker_that_stops_beating_is_killed_and_replaced_and_its_message_retried(project, sups):
    sups.start("slow", "--heartbeat-timeout", 3, *QUICK)
    wait_running(project, sups, ["slow_00"])
    dispatch(project, "slow", n=1, seconds=0.5)
    victim = first_start(project)
    os.kill(victim, signal.SIGSTOP)  # frozen: alive to waitpid, silent to the heartbeat
    stopped_at = time.monotonic()
    wait_until(lambda: not alive(victim), timeout=8, message="the frozen worker to be killed")
    assert time.monotonic() - stopped_at > 2.5  # not before its heartbeat timeout
    wait_until(lambda: project.handled("note"), timeout=5, message="the message to be retried")
    assert project.handled("note")[0][1] != victim
    assert [v for v, _ in project.handled("start")] == ["1", "1"]
    wait_running(project, sups, ["slow_00"], exclude=(victim,))
    assert re.search(r"slow_00 \(pid %d\) has not beaten for \d+s: killing it" % victim,
                     log_text(project, "supervisor.log"))


def test_a_frozen_worker_is_killed_even_when_another_worker_released_its_claim_first(project, sups):
    # Any worker on the database releases the claims of a silent one and forgets it; here a standalone
    # worker with a shorter heartbeat timeout does so before the supervisor's own timeout (3 s) runs out.
    # The supervisor must still kill its frozen child and start another: a stopped process is not a worker.
    sups.start("slow", "--heartbeat-timeout", 3, *QUICK)
    wait_running(project, sups, ["slow_00"])
    quick_reaper = project.start("consume", "empty", env={
        "JOBRUNNER_DSN": project.dsn_with(heartbeat_interval=0.3, heartbeat_timeout=1.5)})
    wait_until(lambda: len(status(project)["processes"]) == 2, message="the standalone worker to register")
    dispatch(project, "slow", n=1, seconds=0.5)
    victim = first_start(project)
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: not alive(victim), timeout=8, message="the frozen worker %d to be killed" % victim)
    wait_until(lambda: project.handled("note"), timeout=5, message="the message to be retried")
    wait_running(project, sups, ["slow_00"], exclude=(victim,))
    assert [p["pid"] for p in status(project)["processes"] if p["supervisor_pid"] is None] == [quick_reaper.pid]
    quick_reaper.terminate()
    assert "released 1 message(s) claimed by 1 dead worker(s)" in quick_reaper.communicate(timeout=10)[1]


def test_a_slow_handler_that_is_alive_keeps_its_message_past_the_heartbeat_timeout(project, sups):
    dsn = project.dsn_with(heartbeat_timeout=3)
    sups.start("slow", "--numprocs", 2, *QUICK, env={"JOBRUNNER_DSN": dsn})
    procs = wait_running(project, sups, ["slow_00", "slow_01"])
    pids = {p["pid"] for p in procs.values()}
    dispatch(project, "slow", n=1, seconds=4)
    busy = first_start(project)
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started > 3.2, message="the heartbeat timeout to pass")
    busy_proc = next(p for p in status(project)["processes"] if p["pid"] == busy)
    assert busy_proc["state"] == "RUNNING" and busy_proc["beat_age_s"] < 3  # its heartbeat thread still beats
    assert health(project).returncode == 0
    wait_until(lambda: project.handled("note"), timeout=5, message="the slow message to finish")
    assert project.handled("start") == [("1", busy)] and project.handled("note") == [("1", busy)]
    assert {p["pid"] for p in status(project)["processes"]} == pids  # nobody killed, nobody replaced
    log = log_text(project, "supervisor.log")
    assert "killing it" not in log and "released" not in log
    assert "released" not in log_text(project, "slow_00.log") + log_text(project, "slow_01.log")


def test_a_standalone_worker_killed_holding_a_message_is_released_by_another_worker_on_the_host(project):
    # a heartbeat timeout of 8 s makes the others look for dead workers every 2 s: a release
    # within 6 s can only come from seeing that the pid is gone, not from the timeout
    env = {"JOBRUNNER_DSN": project.dsn_with(heartbeat_timeout=8)}
    first = project.start("consume", "slow", env=env)
    wait_until(lambda: len(status(project, missing_ok=True)["processes"]) == 1, message="the first worker to register")
    dispatch(project, "slow", n=1, seconds=30)
    wait_until(lambda: project.handled("start") == [("1", first.pid)], timeout=5, message="the first worker to take it")
    second = project.start("consume", "slow", env=env)
    wait_until(lambda: len(status(project)["processes"]) == 2, message="the second worker to register")
    first.kill()
    first.wait()  # reaped, as its shell or systemd would
    wait_until(lambda: ("1", second.pid) in project.handled("start"), timeout=6, message="another worker to release it")
    assert [p["pid"] for p in status(project)["processes"]] == [second.pid]


# --- limits recycle workers at once -----------------------------------------------------


def test_workers_are_recycled_at_once_by_the_message_limit(project, sups, app):
    sups.start("async", "--limit", 3, *QUICK)
    first = wait_running(project, sups, ["async_00"])["async_00"]["pid"]
    app.dispatch_many("note", [{"n": i} for i in range(9)])
    wait_until(lambda: len(project.handled("note")) == 9, timeout=10, message="9 messages")
    per_pid = collections.Counter(pid for _, pid in project.handled("note"))
    assert sorted(per_pid.values()) == [3, 3, 3]
    assert first in per_pid
    sups.remember(per_pid)
    procs = wait_running(project, sups, ["async_00"], exclude=tuple(per_pid))
    assert project.values("note") == sorted(str(i) for i in range(9))
    worker_log = log_text(project, "async_00.log")
    assert worker_log.count("stopped: message limit of 3 reached (3 messages, 0 failed attempts)") == 3
    log = log_text(project, "supervisor.log")
    for pid in per_pid:
        assert "async_00 (pid %d) exit status 0 -> EXITED" % pid in log
    assert "BACKOFF" not in log
    assert log.count("spawned async_00") == 4
    assert procs["async_00"]["state"] == "RUNNING"


def test_workers_are_recycled_at_once_by_the_time_limit(project, sups):
    sups.start("async", "--time-limit", 0.5, *QUICK)
    wait_until(lambda: log_text(project, "async_00.log").count("stopped: time limit of 0.5s reached") >= 2, timeout=8,
               message="two workers to reach their time limit")
    wait_until(lambda: log_text(project, "supervisor.log").count("spawned async_00") >= 3, timeout=5)
    log = log_text(project, "supervisor.log")
    assert "BACKOFF" not in log and "exit status 0 -> EXITED" in log
    pids = set(int(p) for p in re.findall(r"spawned async_00 with pid (\d+)", log))
    sups.remember(pids)
    assert len(pids) >= 3


def test_workers_are_recycled_at_once_by_the_memory_limit(project, sups):
    env = {"JOBRUNNER_APP": "supapp"}
    sups.start("async", "--memory-limit", "100M", *QUICK, env=env)
    first = wait_running(project, sups, ["async_00"])["async_00"]["pid"]
    dispatch(project, "note", n=0)
    wait_until(lambda: project.handled("note") == [("0", first)], message="a small message")
    dispatch(project, "grow", n=1, mb=128, _env=env)
    wait_until(lambda: not alive(first), timeout=8, message="the worker over its memory limit to exit")
    second = wait_running(project, sups, ["async_00"], exclude=(first,))["async_00"]["pid"]
    dispatch(project, "note", n=2)
    wait_until(lambda: len(project.handled("note")) == 3, message="the next message")
    assert sorted(project.handled("note")) == [("0", first), ("1", first), ("2", second)]
    assert re.search(r"worker async_00 stopped: memory limit of 100\.0M exceeded \(RSS 1\d\d\.\dM\)",
                     log_text(project, "async_00.log"))
    log = log_text(project, "supervisor.log")
    assert "async_00 (pid %d) exit status 0 -> EXITED" % first in log
    assert "BACKOFF" not in log


@pytest.mark.parametrize("app_name", ["jobapp", "periodicapp"])  # with a schedule, its process runs on: no matter
def test_a_memory_limit_below_the_workers_own_footprint_backs_off_to_fatal_instead_of_forking_in_a_loop(project, sups,
                                                                                                      app_name):
    # The worker can never handle anything: it is over the limit as soon as it starts.  It must count as
    # a program that cannot start (never ready: BACKOFF, then FATAL), not be restarted at once forever.
    sup = sups.start("async", "--memory-limit", "1M", "--startretries", 1, env={"JOBRUNNER_APP": app_name})
    try:
        assert sup.wait(timeout=8) == 1  # every process FATAL: the supervisor hands over to systemd / docker
    except subprocess.TimeoutExpired:
        raise AssertionError("supervisor still running after 8 s: %d workers spawned"
                             % log_text(project, "supervisor.log").count("spawned async_00")) from None
    log = log_text(project, "supervisor.log")
    assert log.count("spawned async_00") == 2  # the first start and startretries=1 retry
    assert "exit status 1 -> BACKOFF" in log
    assert "exit status 1 -> FATAL: exited before it was ready 2 times; see async_00.log" in log
    assert "every process is FATAL: exiting" in log
    assert "memory limit of 1.0M is below this worker's own footprint" in log_text(project, "async_00.log")
    assert "memory limit of 1.0M is below this worker's own footprint" in log  # its last lines, copied


# --- programs that cannot start --------------------------------------------------------------


def test_a_program_that_cannot_start_goes_backoff_then_fatal_and_the_supervisor_exits_1(project, sups):
    imports, fixed = project.path / "imports", project.path / "fixed"
    env = {"JOBRUNNER_APP": "supbroken", "SUPBROKEN_IMPORTS": str(imports), "SUPBROKEN_FIXED": str(fixed)}
    sup = sups.start("async", "--startretries", 2, env=env)
    seen = []

    def watch():
        proc = supervised(status(project, missing_ok=True)).get("async_00")
        if proc and (not seen or seen[-1] != proc["state"]):
            seen.append(proc["state"])
        return sup.poll() is not None

    wait_until(watch, timeout=15, interval=0.05, message="the supervisor to give up")
    assert sup.returncode == 1
    assert "BACKOFF" in seen, seen
    # the pre-flight import, then the first start and startretries=2 retries, and nothing after FATAL
    assert len(imports.read_text().split()) == 4
    assert log_text(project, "async_00.log").count("\nRuntimeError: cannot connect to the mail server") == 3
    log = log_text(project, "supervisor.log")
    assert log.count("spawned async_00") == 3
    assert log.count("exit status 2 -> BACKOFF") == 2
    assert "async_00: BACKOFF -> STARTING" in log  # every state change is logged
    assert "exit status 2 -> FATAL: exited before it was ready 3 times; see async_00.log" in log
    # the reason is in the supervisor's own log: the last lines of the worker's, with the traceback
    assert "last lines of async_00.log:" in log and "RuntimeError: cannot connect to the mail server" in log
    result = health(project)
    assert (result.returncode, result.stdout) == (1, "UNHEALTHY: no worker is running on %s (--allow-no-workers if that "
                                                     "is expected)\n" % project.where)


def test_a_fatal_program_beside_a_running_one_keeps_the_supervisor_up_and_sighup_retries_it(project, sups):
    (project.path / "workers.ini").write_text(
        "[program:tiny]\ncommand = consume async --memory-limit 1M\nstartretries = 0\n\n"
        "[program:main]\ncommand = consume async\n")
    sup = sups.start("--config", "workers.ini")
    wait_until(lambda: {n: p["state"] for n, p in supervised(status(project, missing_ok=True)).items()}
               == {"tiny_00": "FATAL", "main_00": "RUNNING"}, timeout=10, message="tiny FATAL beside main RUNNING")
    assert sup.poll() is None
    result = health(project)
    assert result.returncode == 1
    assert result.stdout == "UNHEALTHY: tiny_00 is FATAL: exited before it was ready 1 times; see tiny_00.log\n"
    data = json.loads(health(project, "--json").stdout)
    assert sorted(p["name"] for p in data["processes"]) == ["main_00", "tiny_00"]
    assert [q["queue"] for q in data["queues"]] == ["async"]  # what the running workers consume
    sup.send_signal(signal.SIGHUP)  # a deploy: FATAL programs are given another chance
    wait_until(lambda: log_text(project, "supervisor.log").count("spawned tiny_00") == 2, timeout=10)


def test_a_worker_killed_after_it_was_ready_is_restarted_at_once_and_never_goes_fatal(project, sups):
    # Killed (OOM killer, chaos test) once registered, long before --startsecs: not a failed start.
    sups.start("async", "--startsecs", 5, "--startretries", 0)

    def registered(exclude):
        procs = supervised(status(project, sups, missing_ok=True))
        p = procs.get("async_00")
        return p["pid"] if p and p["pid"] and p["beat_age_s"] is not None and p["pid"] not in exclude else None

    pid = wait_until(lambda: registered(()), message="async_00 registered")
    killed = [pid]
    for kill in range(3):
        os.kill(pid, signal.SIGKILL)
        pid = wait_until(lambda: registered(killed), timeout=5, message="a new async_00 registered")
        killed.append(pid)
    log = log_text(project, "supervisor.log")
    assert log.count("killed by SIGKILL -> EXITED") == 3
    assert "BACKOFF" not in log and "FATAL" not in log


def test_autorestart_false_leaves_a_crashed_worker_exited(project, sups):
    sups.start("slow", "--autorestart", "false", *QUICK)
    pid = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    dispatch(project, "crash", n=1)
    proc = wait_until(lambda: (lambda p: p["state"] == "EXITED" and p)(supervised(status(project))["slow_00"]),
                      timeout=5, message="slow_00 EXITED")
    assert proc["pid"] is None
    assert proc["description"] == "exited (exit status 3; not expected)"
    assert not alive(pid)
    assert log_text(project, "supervisor.log").count("spawned slow_00") == 1
    queues, failed = stats(project)
    assert (queues["slow"]["ready"], queues["slow"]["in_flight"], failed) == (1, 0, 0)  # released, not lost
    result = health(project)
    assert result.returncode == 1 and "slow_00 is EXITED: exited (exit status 3; not expected)" in result.stdout


def test_autorestart_unexpected_restarts_a_crashed_worker(project, sups):
    sups.start("slow", "--autorestart", "unexpected", *QUICK)
    pid = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    dispatch(project, "crash", n=1)
    wait_until(lambda: not alive(pid), timeout=5)
    # the crash handler allows 2 attempts: the worker dies twice, then the message goes to the failure queue
    wait_until(lambda: stats(project)[1] == 1, timeout=10, message="the message to reach the failure queue")
    assert [v for v, _ in project.handled("crash")] == ["1", "1"]
    wait_running(project, sups, ["slow_00"], exclude=(pid,))
    failed = json.loads(project.cli("failed", "show", "--json").stdout)
    assert [(m["handler"], m["error_class"]) for m in failed["failed"]] == [("crash", "WorkerDied")]


# --- signals ----------------------------------------------------------------------------------


def test_sigterm_finishes_the_current_message_and_leaves_no_process(project, sups):  # SIGINT: the config file test
    sup = sups.start("slow", "--numprocs", 2, "--name", "mail", *QUICK)
    procs = wait_running(project, sups, ["mail_00", "mail_01"])
    pids = [p["pid"] for p in procs.values()]
    dispatch(project, "slow", n=1, seconds=1)
    busy = first_start(project)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
    assert project.handled("note") == [("1", busy)]  # finished, not abandoned
    for pid in pids:
        assert not alive(pid)
    assert status(project) == {"processes": []}
    assert project.cli("status").stdout == "no supervisor or worker is running on %s\n" % project.where
    queues, failed = stats(project)
    assert (queues.get("slow", {}).get("ready", 0), queues.get("slow", {}).get("in_flight", 0), failed) == (0, 0, 0)
    log = log_text(project, "supervisor.log")
    assert "received SIGTERM: stopping all workers" in log
    for name, p in procs.items():
        assert "%s (pid %d) exit status 0 -> STOPPED" % (name, p["pid"]) in log
    assert log.rstrip().endswith("supervisor stopped")
    busy_name = next(n for n, p in procs.items() if p["pid"] == busy)
    assert "worker %s stopped: received SIGTERM (1 messages, 0 failed attempts)" % busy_name in log_text(
        project, busy_name + ".log")


def test_a_worker_that_ignores_the_stop_is_killed_after_stopwaitsecs_and_its_message_kept(project, sups):
    sup = sups.start("slow", "--stopwaitsecs", 0.5, *QUICK)
    pid = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    dispatch(project, "slow", n=1, seconds=30)
    first_start(project)
    asked = time.monotonic()
    sup.terminate()
    assert sup.wait(timeout=10) == 0
    assert 0.5 <= time.monotonic() - asked < 5
    assert not alive(pid)
    assert project.handled("note") == []
    queues, failed = stats(project)
    assert (queues["slow"]["ready"], queues["slow"]["in_flight"], failed) == (1, 0, 0)
    assert "slow_00 (pid %d) did not stop within 0.5s: SIGKILL" % pid in log_text(project, "supervisor.log")


def test_sighup_restarts_every_worker_gracefully(project, sups):
    sup = sups.start("slow", "--numprocs", 2, *QUICK)
    old = wait_running(project, sups, ["slow_00", "slow_01"])
    old_pids = tuple(p["pid"] for p in old.values())
    dispatch(project, "slow", n=1, seconds=1)
    busy = first_start(project)
    sup.send_signal(signal.SIGHUP)
    new = wait_running(project, sups, ["slow_00", "slow_01"], exclude=old_pids)
    assert project.handled("start") == [("1", busy)] and project.handled("note") == [("1", busy)]
    for pid in old_pids:
        assert not alive(pid)
    assert set(p["pid"] for p in new.values()) == {c.pid for c in psutil.Process(sup.pid).children()}
    assert sup.poll() is None
    assert "received SIGHUP: restarting all workers gracefully" in log_text(project, "supervisor.log")
    assert health(project).returncode == 0


@pytest.mark.parametrize("second", ["SIGHUP", "SIGTERM"])
def test_a_signal_during_a_graceful_restart_does_not_abort_the_message(project, sups, second):
    sup = sups.start("slow", "--stopwaitsecs", 20, *QUICK)
    pid = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    dispatch(project, "slow", n=1, seconds=2)
    first_start(project)
    sup.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    sup.send_signal(getattr(signal, second))  # the worker is already stopping: it must not be told twice
    wait_until(lambda: project.handled("note"), timeout=10, message="the message to finish")
    assert project.handled("start") == [("1", pid)] and project.handled("note") == [("1", pid)]
    if second == "SIGTERM":
        assert sup.wait(timeout=10) == 0
    else:
        wait_running(project, sups, ["slow_00"], exclude=[pid])
    log = log_text(project, "slow_00.log")
    assert "twice" not in log and "stopped in the middle" not in log, log


def test_an_orphaned_worker_beats_while_it_finishes_so_no_other_worker_takes_its_message(project, sups):
    sup = sups.start("slow", "--heartbeat-timeout", 3, "--stopwaitsecs", 20, *QUICK)
    pid = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    dispatch(project, "slow", n=1, seconds=7)
    first_start(project)
    sup.kill()
    sup.wait()
    project.start("consume", "slow", "--heartbeat-timeout", 3)  # would release a silent worker's claim after 3 s
    wait_until(lambda: not alive(pid), timeout=15, message="the orphan to finish and exit")
    assert project.handled("note") == [("1", pid)]
    assert project.handled("start") == [("1", pid)]  # once: the orphan held its claim to the end


def test_a_second_supervisor_for_the_same_program_refuses_to_start(project, sups):
    first = sups.start("async", *QUICK)
    pid = wait_running(project, sups, ["async_00"])["async_00"]["pid"]
    second = sups.start("async", *QUICK)
    assert second.wait(timeout=20) == 2
    assert re.fullmatch(r"jobrunner: error: another supervisor already runs program async on %s \(lock .+\)\n"
                        % re.escape(str(project.where)), sups.output(second)), sups.output(second)
    procs = supervised(status(project))
    assert procs["async_00"]["pid"] == pid and procs["async_00"]["supervisor_pid"] == first.pid
    # another program on the same database is another matter
    other = sups.start("slow", *QUICK)
    procs = wait_running(project, sups, ["async_00", "slow_00"])
    assert procs["async_00"]["pid"] == pid and procs["slow_00"]["supervisor_pid"] == other.pid
    assert first.poll() is None and other.poll() is None


def test_killing_the_supervisor_stops_its_workers_and_frees_its_programs(project, sups):
    sup = sups.start("slow", "--numprocs", 2, *QUICK)
    procs = wait_running(project, sups, ["slow_00", "slow_01"])
    pids = [p["pid"] for p in procs.values()]
    dispatch(project, "slow", n=1, seconds=1)
    busy = first_start(project)
    sup.kill()
    sup.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5, message="the orphaned workers to stop")
    assert project.handled("note") == [("1", busy)]  # told to stop, it finished its message first
    queues, failed = stats(project)
    assert (queues.get("slow", {}).get("ready", 0), queues.get("slow", {}).get("in_flight", 0), failed) == (0, 0, 0)
    again = sups.start("slow", "--numprocs", 2, *QUICK)
    procs = wait_running(project, sups, ["slow_00", "slow_01"], exclude=pids)
    assert {p["supervisor_pid"] for p in procs.values()} == {again.pid}


def test_status_and_health_do_not_report_a_killed_supervisors_workers_as_running(project, sups):
    sup = sups.start("slow", "--numprocs", 2, *QUICK)
    pids = [p["pid"] for p in wait_running(project, sups, ["slow_00", "slow_01"]).values()]
    sup.kill()
    sup.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5, message="the orphaned workers to stop")
    procs = status(project)["processes"]
    assert sorted((p["name"], p["state"], p["description"]) for p in procs) == [
        ("slow_00", "UNKNOWN", "supervisor (pid %d) is gone" % sup.pid),
        ("slow_01", "UNKNOWN", "supervisor (pid %d) is gone" % sup.pid)]
    result = health(project)
    assert result.returncode == 1
    assert result.stdout == ("UNHEALTHY: slow_00 is UNKNOWN: supervisor (pid {0}) is gone; slow_01 is UNKNOWN: "
                             "supervisor (pid {0}) is gone; no worker is running on {1} (--allow-no-workers if that is "
                             "expected)\n".format(sup.pid, project.where))


# --- logs -------------------------------------------------------------------------------------


def test_worker_logs_rotate_at_the_configured_size_keeping_whole_lines(project, sups, app):
    sups.start("async", "-v", "--log-max-bytes", 1000, "--log-backups", 2, *QUICK, env={"JOBRUNNER_APP": "supapp"})
    wait_running(project, sups, ["async_00"])
    app.dispatch_many("note", [{"n": i} for i in range(30)])
    # a handler printing 20 lines (1.6 KB) in one write, then one more message
    dispatch(project, "report", n="r", _env={"JOBRUNNER_APP": "supapp"})
    last = dispatch(project, "note", n="last")
    wait_until(lambda: len(project.handled("note")) == 32, message="32 messages")
    wait_until(lambda: "message %d handled by note" % last in log_text(project, "async_00.log"), timeout=5)
    logs = project.path / "log"
    assert sorted(os.listdir(logs)) == ["async_00.log", "async_00.log.1", "async_00.log.2", "supervisor.log"]
    line = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} async_00\[\d+\] [A-Z]+ .*|report r line \d{3} x{60})\Z")
    for name in ("async_00.log", "async_00.log.1", "async_00.log.2"):
        data = (logs / name).read_bytes()
        assert stat.S_IMODE(os.stat(logs / name).st_mode) == 0o600
        assert 0 < len(data) <= 1000, "%s is %d bytes" % (name, len(data))
        assert data.endswith(b"\n"), name
        for text in data.decode().splitlines():
            assert line.match(text), (name, text)
    kept = "".join((logs / name).read_text() for name in ("async_00.log.2", "async_00.log.1", "async_00.log"))
    assert kept.count("report r line") == 20  # the whole report, in order, across files
    assert re.findall(r"report r line (\d{3})", kept) == ["%03d" % i for i in range(20)]
    assert re.search(r"VERBOSE message %d handled by note in [\d.]+ ms \(attempt 1\)\n\Z" % last,
                     (logs / "async_00.log").read_text())


def test_a_log_directory_removed_under_rotation_costs_lines_not_the_supervisor(project, sups, app):
    import shutil

    env = {"JOBRUNNER_APP": "supapp"}
    sup = sups.start("async", "--log-max-bytes", 1000, "--log-backups", 1, *QUICK, env=env)
    old = wait_running(project, sups, ["async_00"])
    logs = project.path / "log"

    def logged(n):
        wait_until(lambda: "report %s line 019" % n in log_text(project, "async_00.log"), timeout=5,
                   message="report %s in the log" % n)

    shutil.rmtree(logs)
    logs.mkdir(mode=0o700)
    dispatch(project, "report", n="a", _env=env)  # its log was removed under it: a new one is started
    logged("a")
    shutil.rmtree(logs)
    for n in range(4):  # each report passes the 1000 bytes: every rotation fails
        dispatch(project, "report", n=n, _env=env)
    wait_until(lambda: len(project.handled("note")) == 5, message="four reports")
    logs.mkdir(mode=0o700)
    dispatch(project, "report", n="back", _env=env)
    logged("back")
    sup.send_signal(signal.SIGHUP)  # new pipes, new fds: none may be closed by a log that failed
    wait_running(project, sups, ["async_00"], exclude=[old["async_00"]["pid"]])
    app.dispatch_many("note", [{"n": i} for i in range(10)])
    wait_until(lambda: len(project.handled("note")) == 16, message="ten more messages")
    assert sup.poll() is None
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
    assert "Traceback" not in sups.output(sup) + log_text(project, "supervisor.log")


def test_log_rotation_defaults_are_10mb_and_3_backups(project, sups):
    sups.start("async", env={"JOBRUNNER_APP": "supapp"})  # no log option: the defaults
    wait_running(project, sups, ["async_00"])
    line = 100  # bytes per report line with width 72
    for n in range(5):  # 5 x 9.6 MB: four rotations
        dispatch(project, "report", n=n, lines=96000, width=72, _env={"JOBRUNNER_APP": "supapp"})
    wait_until(lambda: len(project.handled("note")) == 5, timeout=30, message="five reports")
    wait_until(lambda: "report 4 line 95999" in log_text(project, "async_00.log"), timeout=10)
    logs = project.path / "log"
    assert sorted(n for n in os.listdir(logs) if n.startswith("async")) == [
        "async_00.log", "async_00.log.1", "async_00.log.2", "async_00.log.3"]  # 3 backups; the oldest dropped
    for name in ("async_00.log.1", "async_00.log.2", "async_00.log.3"):
        size = os.path.getsize(logs / name)
        assert 10 * 1024 * 1024 - line < size <= 10 * 1024 * 1024, (name, size)  # full, up to the last whole line


def test_backoff_waits_1_2_3_seconds_between_failed_starts(project, sups):
    imports, fixed = project.path / "imports", project.path / "fixed"
    env = {"JOBRUNNER_APP": "supbroken", "SUPBROKEN_IMPORTS": str(imports), "SUPBROKEN_FIXED": str(fixed)}
    sup = sups.start("async", "--startretries", 3, env=env)
    assert sup.wait(timeout=20) == 1
    log = log_text(project, "supervisor.log")
    import datetime

    spawned = [datetime.datetime.fromisoformat(t).timestamp()
               for t in re.findall(r"^(\S+) supervisor\[\d+\] INFO spawned async_00", log, re.M)]
    exited = [datetime.datetime.fromisoformat(t).timestamp()
              for t in re.findall(r"^(\S+) supervisor\[\d+\] WARNING async_00 \(pid \d+\) exit status 2", log, re.M)]
    assert len(spawned) == 4 and len(exited) == 4, log
    for retry in (1, 2, 3):  # each start waits its delay after the previous failure, and not much longer
        gap = spawned[retry] - exited[retry - 1]
        assert retry - 0.01 <= gap < retry + 1.0, (retry, gap)


def test_a_worker_is_starting_until_it_is_ready(project, sups):
    sups.start("async", env={"JOBRUNNER_APP": "slowstart", "SLOWSTART_S": "2"})
    starting = wait_until(lambda: supervised(status(project, missing_ok=True)).get("async_00", {}).get("state")
                          == "STARTING", timeout=10, message="async_00 STARTING")
    assert starting
    procs = supervised(status(project))
    assert procs["async_00"]["state"] == "STARTING" and procs["async_00"]["pid"]
    assert health(project).returncode == 0  # starting is healthy
    wait_running(project, sups, ["async_00"], timeout=10)


# --- a supervisord-style config file ----------------------------------------------------------

CONFIG = """\
[supervise]
log_dir = logs
dsn = var/jobs.db

[program:mail]
command = consume async --time-limit=3600 --memory-limit=512M --sleep=1 -vv
process_name = %(program_name)s_%(process_num)02d
numprocs = 2
autorestart = unexpected
startretries = 10
stopwaitsecs = 5
stdout_logfile_maxbytes = 2KB
stdout_logfile_backups = 1

[program:reports]
command = consume high slow
"""

NO_DSN_ENV = {"JOBRUNNER_DSN": ""}  # the database named in [supervise] only (see the next test)


@pytest.mark.sqlite
def test_a_config_file_runs_each_program_with_its_own_settings(project, sups, app):
    (project.path / "workers.conf").write_text(CONFIG)
    sup = sups.start("--config", "workers.conf", log_dir=None, env=NO_DSN_ENV)
    procs = wait_running(project, sups, ["mail_00", "mail_01", "reports_00"])
    mail = {procs["mail_00"]["pid"], procs["mail_01"]["pid"]}
    assert {p["program"] for p in procs.values()} == {"mail", "reports"}
    app.dispatch_many("note", [{"n": i} for i in range(80)])
    app.dispatch_many("note_high", [{"n": i} for i in range(2)])
    wait_until(lambda: len(project.handled("note")) == 80 and len(project.handled("high")) == 2, message="82 messages")
    assert {pid for _, pid in project.handled("note")} <= mail
    assert {pid for _, pid in project.handled("high")} == {procs["reports_00"]["pid"]}
    logs = project.path / "logs"
    names = sorted(os.listdir(logs))
    assert {"mail_00.log", "mail_01.log", "reports_00.log", "supervisor.log"} <= set(names)
    # 2 KB logs with one backup: 80 lines of -vv output rotate at least one of them, never twice over
    assert any(n.endswith(".log.1") for n in names), names
    assert set(names) <= {"mail_00.log", "mail_01.log", "reports_00.log", "supervisor.log", "mail_00.log.1",
                          "mail_01.log.1"}, names
    mail_logs = "".join((logs / n).read_text() for n in names if n.startswith("mail"))
    assert "VERBOSE message" in mail_logs  # -vv in its command
    assert "VERBOSE" not in log_text(project, "reports_00.log", "logs")
    assert not (project.path / "log").exists() and not (project.path / "var" / "log").exists()
    sup.send_signal(signal.SIGINT)  # Ctrl-C in the terminal it runs in
    assert sup.wait(timeout=15) == 0
    assert status(project) == {"processes": []}
    assert "received SIGINT: stopping all workers" in log_text(project, "supervisor.log", "logs")
    for name, p in procs.items():
        assert not alive(p["pid"])


def test_a_config_files_supervisord_settings_take_effect(project, sups, app):
    (project.path / "workers.conf").write_text("""\
[program:slow]
command = consume slow
process_name = %(program_name)s_%(process_num)02d
autorestart = false
stopwaitsecs = 1

[program:tiny]
command = consume async --memory-limit 1M
startretries = 1
""")
    sup = sups.start("--config", "workers.conf", log_dir="logs")
    wait_until(lambda: supervised(status(project, missing_ok=True)).get("tiny_00", {}).get("state") == "FATAL",
               timeout=10, message="tiny FATAL")
    log = log_text(project, "supervisor.log", "logs")
    assert log.count("spawned tiny_00") == 2  # startretries = 1: the first start and one retry
    assert "[program:slow] process_name is not used by jobrunner; ignored" in sups.output(sup)
    pid = wait_until(lambda: supervised(status(project)).get("slow_00", {}).get("pid"), message="slow_00")
    dispatch(project, "crash", n=1)  # autorestart = false: a crashed worker stays EXITED
    wait_until(lambda: supervised(status(project))["slow_00"]["state"] == "EXITED", timeout=10, message="EXITED")
    time.sleep(1.5)  # an absence: what a restart would have taken, and then some
    assert supervised(status(project))["slow_00"]["pid"] is None and "spawned slow_00" in log_text(
        project, "supervisor.log", "logs") and not alive(pid)
    assert log_text(project, "supervisor.log", "logs").count("spawned slow_00") == 1
    project.execute("DELETE FROM messenger_messages")  # the crashing message would crash the next worker too
    sup.send_signal(signal.SIGHUP)  # restart everything, slow_00 included
    pid = wait_until(lambda: supervised(status(project)).get("slow_00", {}).get("pid"), message="slow_00 again")
    dispatch(project, "slow", n=2, seconds=30)
    wait_until(lambda: project.values("start") == ["2"], message="the slow handler")
    sup.send_signal(signal.SIGTERM)  # stopwaitsecs = 1: killed a second after it was asked to stop
    started = time.monotonic()
    assert sup.wait(timeout=15) == 0
    assert 0.9 < time.monotonic() - started < 5
    assert "slow_00 (pid %d) did not stop within 1s: SIGKILL" % pid in log_text(project, "supervisor.log", "logs")


def test_a_config_file_works_with_the_database_in_jobrunner_dsn(project, sups):
    # JOBRUNNER_DSN is how the design says a deployment names its database; a config file must not refuse it
    (project.path / "workers.conf").write_text("[program:mail]\ncommand = consume async\n")
    sup = sups.start("--config", "workers.conf", log_dir=None)
    wait_until(lambda: sup.poll() is not None or supervised(status(project, missing_ok=True)).get("mail_00"), timeout=5)
    assert sup.poll() is None, sups.output(sup)
    assert wait_running(project, sups, ["mail_00"])["mail_00"]["supervisor_pid"] == sup.pid


@pytest.mark.parametrize("config, message", [
    ("[program:mail]\nnumprocs = 2\n", "[program:mail] needs command = consume QUEUE... [options]"),
    ("[program:mail]\ncommand = consume async\nnumprocz = 2\n", "[program:mail]: unknown setting 'numprocz'"),
    ("[program:mail]\ncommand = consume nosuch\n", "unknown queue 'nosuch'"),
    ("[program:mail]\ncommand = consume async\nautorestart = sometimes\n", "autorestart = 'sometimes' is not valid"),
    ("[program:mail]\ncommand = consume failed\n", "program mail: consume failed stops after one pass"),
    ("[program:mail]\ncommand = consume async --ping-file p\n", "--ping-file and --heartbeat-timeout are the supervisor's"),
    ("[program:mail]\ncommand = consume async --sleep=nan\n", "nan is not a finite number of seconds"),
    ('[program:mail]\ncommand = consume async\nenvironment = A="x  # unclosed\n', """environment = 'A="x' is not valid"""),
    ('[program:mail]\ncommand = consume async\nenvironment = A="1" junk\n', """environment = 'A="1" junk' is not valid"""),
    ("[program:mail]\ncommand = consume async --limit=-1\n", "[program:mail] command: Invalid value for '--limit'"),
    ("[program:mail]\ncommand = consume async\n[program:mail2]\ncommand = consume async --dsn other.db\n",
     "[program:mail2]: set app and dsn once, in [supervise] or on the command line"),
    ("[supervise]\nlog_dir = logs\n", "has no [program:NAME] section"),
])
def test_a_bad_config_file_is_refused_with_a_clear_message(project, config, message):
    (project.path / "workers.conf").write_text(config)
    result = project.cli("supervise", "--config", "workers.conf", "--dsn", project.dsn, timeout=20, env=NO_DSN_ENV)
    assert result.returncode == 2
    assert result.stderr.startswith("jobrunner: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (project.path / "logs").exists() and not (project.path / "var" / "log").exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "workers.conf", "--numprocs", "4", "-v"],
     "with --config, set --numprocs, --verbose in each [program:NAME]"),
    (["--config", "workers.conf", "--limit", "5", "--name", "x"], "with --config, set --limit, --name in each"),
    (["failed"], "program failed: consume failed stops after one pass"),
    (["async", "--time-limit", "inf"], "Invalid value for '--time-limit': inf is not a finite number of seconds"),
])
def test_supervise_refuses_what_it_would_ignore_or_restart_in_a_loop(project, args, message):
    (project.path / "workers.conf").write_text("[program:mail]\ncommand = consume async\n")
    result = project.cli("supervise", *args, timeout=20)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (project.path / "var" / "log").exists()


def test_the_command_line_log_dir_and_format_win_over_the_config_files(project, sups):
    (project.path / "w.ini").write_text("[supervise]\nlog_dir = fromfile\nlog_format = text\n\n"
                                        "[program:mail]\ncommand = consume async\n")
    sup = sups.start("--config", "w.ini", "--log-format", "json", log_dir="var/log")
    wait_running(project, sups, ["mail_00"])
    assert not (project.path / "fromfile").exists()
    first = log_text(project, "supervisor.log", "var/log").splitlines()[0]
    assert json.loads(first)["process"] == "supervisor"
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=15) == 0


# --- health -----------------------------------------------------------------------------------


def test_health_checks_the_database_and_the_thresholds(project, app):
    result = health(project)
    assert result.returncode == 1
    missing = "no database at %s" % project.db if project.db else "%s has no jobrunner tables" % project.where
    assert result.stdout.startswith("UNHEALTHY: " + missing), result.stdout
    app.dispatch_many("note", [{"n": i} for i in range(3)])
    result = health(project)  # nothing consumes them: unhealthy, unless that is expected
    assert (result.returncode, result.stdout) == (1, "UNHEALTHY: no worker is running on %s (--allow-no-workers if "
                                                     "that is expected)\n" % project.where)
    result = health_without_workers(project)
    assert (result.returncode, result.stdout) == (0, "OK: 3 ready, 0 failed\n")
    assert health_without_workers(project, "--max-ready", 3).returncode == 0
    result = health_without_workers(project, "--max-ready", 2)
    assert (result.returncode, result.stdout) == (1, "UNHEALTHY: 3 messages ready, more than 2\n")
    assert health_without_workers(project, "--max-age", 3600).returncode == 0
    result = health_without_workers(project, "--max-age", 0)
    assert result.returncode == 1 and re.fullmatch(r"UNHEALTHY: oldest ready message waited [\d.]+s, more than 0s\n",
                                                   result.stdout), result.stdout
    app.dispatch("unrecoverable", {"n": 9})
    assert project.cli("consume", "async", "--limit", 4).returncode == 0
    assert health_without_workers(project, "--max-failed", 1).returncode == 0
    result = health_without_workers(project, "--max-failed", 0, "--max-ready", 0, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["healthy"] is False
    assert data["reasons"] == ["1 failed messages, more than 0"]
    assert data["failed"] == 1


@pytest.mark.sqlite
def test_a_long_write_transaction_does_not_get_healthy_workers_killed(project, sups):
    # While another connection holds the write lock, no worker can beat: that is not death.
    dsn = "sqlite:///%s?heartbeat_interval=0.2&heartbeat_timeout=1.5&busy_timeout=10" % project.db
    sups.start("async", "--numprocs", 2, *QUICK, env={"JOBRUNNER_DSN": dsn})
    procs = wait_running(project, sups, ["async_00", "async_01"])
    pids = {p["pid"] for p in procs.values()}
    assert hold_write_lock(project.db, 3).wait(10) == 0
    time.sleep(2)  # long enough for a supervisor that misjudged the silence to have killed someone
    assert "killing it" not in log_text(project, "supervisor.log")
    assert {p["pid"] for p in status(project)["processes"]} == pids


@pytest.mark.parametrize("option", ["--limit", "--failure-limit", "--memory-limit", "--time-limit"])
def test_limits_of_zero_are_refused_because_they_would_restart_in_a_loop(project, option):
    result = project.cli("supervise", "async", option, "0", "--log-dir", "log")
    assert (result.returncode, result.stderr) == (
        2, "jobrunner: error: program async: %s 0 would restart its workers in a loop\n" % option)
    (project.path / "w.ini").write_text("[program:w]\ncommand = consume async %s 0\n" % option)
    result = project.cli("supervise", "--config", "w.ini", "--log-dir", "log")
    assert (result.returncode, result.stderr) == (
        2, "jobrunner: error: program w: %s 0 would restart its workers in a loop\n" % option)
    assert not (project.path / "log").exists()  # refused before anything started


def test_a_memory_limit_without_a_unit_below_a_kilobyte_is_refused_with_a_hint(project):
    result = project.cli("consume", "async", "--memory-limit", "5")
    assert result.returncode == 2
    assert "5 bytes is less than a worker needs: did you mean 5M?" in result.stderr


# --- hardening ----------------------------------------------------------------------------------

HARD = {"JOBRUNNER_APP": "hardapp"}


def test_a_killed_workers_grandchild_holding_its_output_does_not_make_the_supervisor_spin(project, sups):
    # The handler starts a child that inherits stdout and writes to it after the worker is gone.
    sup = sups.start("hard", env=HARD)
    pid = wait_running(project, sups, ["hard_00"])["hard_00"]["pid"]
    project.cli("dispatch", "spawns", '{"n": 1}', env=HARD)
    wait_until(lambda: project.values("start") == ["1"], message="the handler to start its children")
    os.kill(pid, signal.SIGKILL)  # from outside: its children live on and keep the old pipe open
    wait_running(project, sups, ["hard_00"], exclude=(pid,))
    supervisor = psutil.Process(sup.pid)
    before = supervisor.cpu_times()
    time.sleep(3)  # the grandchild writes, then closes the old pipe (EOF) during this
    after = supervisor.cpu_times()
    assert (after.user + after.system) - (before.user + before.system) < 0.5  # idle, not 100 % of a core
    assert "grandchild 1" in log_text(project, "hard_00.log")  # its output still reached the log


def test_a_worker_the_supervisor_kills_takes_its_process_group_with_it(project, sups):
    dsn = project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=1.5)
    sups.start("hard", env=dict(HARD, JOBRUNNER_DSN=dsn))
    pid = wait_running(project, sups, ["hard_00"])["hard_00"]["pid"]
    project.cli("dispatch", "spawns", '{"n": 1}', env=HARD)
    wait_until(lambda: project.values("start") == ["1"], message="the handler to start its children")
    children = psutil.Process(pid).children(recursive=True)
    assert any(c.name() == "sleep" for c in children)
    os.kill(pid, signal.SIGSTOP)  # silent: the supervisor kills it, and what it started
    wait_until(lambda: not alive(pid), timeout=10, message="the silent worker to be killed")
    wait_until(lambda: not any(alive(c) for c in children), timeout=5, message="its children to be gone")
    assert "has not beaten for 1.5s: killing it" in log_text(project, "supervisor.log")


def test_health_stays_healthy_through_planned_restarts(project, sups):
    sups.start("async", "--numprocs", 2, "--time-limit", 1)
    wait_running(project, sups, ["async_00", "async_01"])
    verdicts = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        result = health(project)
        verdicts.append((result.returncode, result.stdout))
        time.sleep(0.1)
    assert log_text(project, "supervisor.log").count("exit status 0 -> EXITED") >= 4  # they did restart
    assert [v for v in verdicts if v[0] != 0] == []


def test_a_log_file_that_is_a_symlink_is_refused_and_its_target_left_alone(project, sups):
    logs = project.path / "log"
    logs.mkdir(mode=0o700)
    target = project.path / "precious.txt"
    target.write_text("do not touch\n")
    os.symlink(target, logs / "async_00.log")
    sup = sups.start("async")
    assert sup.wait(timeout=10) == 2
    assert "log file %s is a symbolic link: refusing to follow it" % (logs / "async_00.log") in sups.output(sup)
    assert target.read_text() == "do not touch\n"


def test_a_log_directory_others_can_write_to_is_warned_about(project, sups):
    logs = project.path / "log"
    logs.mkdir()
    os.chmod(logs, 0o777)
    sup = sups.start("async")
    wait_running(project, sups, ["async_00"])
    assert "log directory %s is writable by group or others (mode 777)" % logs in sups.output(sup)


def test_health_fails_on_a_worker_that_stopped_beating_supervised_or_standalone(project, sups, app):
    # health judges with its own DSN's timeout (1 s) while the supervisor waits 30 s before killing anyone
    quick = project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=1)
    sups.start("async")
    supervised_pid = wait_running(project, sups, ["async_00"])["async_00"]["pid"]
    standalone = project.start("consume", "low")
    wait_until(lambda: len(status(project)["processes"]) == 2, message="the standalone worker")
    assert health(project, "--dsn", quick).returncode == 0
    os.kill(supervised_pid, signal.SIGSTOP)
    os.kill(standalone.pid, signal.SIGSTOP)
    try:
        # each is judged from its own last beat, up to a beat interval apart: wait until both are named
        result = wait_until(lambda: (lambda r: r.returncode == 1 and "async_00" in r.stdout and "consume" in r.stdout
                                     and r)(health(project, "--dsn", quick)), timeout=10, message="health to notice both")
        assert re.search(r"async_00 \(pid %d\) has not beaten for \d+s" % supervised_pid, result.stdout)
        assert re.search(r"worker consume \(pid %d\) has not beaten for \d+s" % standalone.pid, result.stdout)
    finally:
        os.kill(supervised_pid, signal.SIGCONT)
        os.kill(standalone.pid, signal.SIGCONT)


# --- the first hour: defaults, config files, logs, locks ---------------------------------------------


@pytest.mark.sqlite
def test_a_supervisor_that_had_to_create_its_database_says_so_and_records_its_workers(project, sups):
    assert not project.db.exists()
    sup = sups.start("async")
    wait_running(project, sups, ["async_00"])
    log = log_text(project, "supervisor.log")
    assert "WARNING created a new, empty database at %s" % project.db in log
    assert "ERROR" not in log, log
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=15) == 0


def test_supervise_with_no_queue_takes_every_queue_of_the_app(project, sups, app):
    sups.start()
    procs = wait_running(project, sups, ["worker_00"])
    assert "worker x1 [async high low slow empty]" in log_text(project, "supervisor.log")
    app.dispatch("note_low", {"n": "low"})
    wait_until(lambda: project.handled("low") == [("low", procs["worker_00"]["pid"])], message="the low message")


def test_a_program_gets_its_environment_and_directory(project, sups, app, tmp_path):
    home = tmp_path / "elsewhere"
    home.mkdir()
    # as the seeds write a whole supervisord.conf: its own sections and settings, and '#' comments after values
    (project.path / "w.ini").write_text(
        "[supervisord]\nnodaemon=true\n\n[unix_http_server]\nfile=/tmp/supervisor.sock\n\n"
        "[program:env]\ncommand = consume hard  # the one queue\nnumprocs=1  # one is enough\nautorestart=True\n"
        'environment = GREETING="hello, world",OTHER=plain  # both\n'
        "directory = %s\n" % home)
    sup = sups.start("--config", "w.ini", env={"JOBRUNNER_APP": "envapp", "PYTHONPATH": "%s:%s" % (
        project.path, project.env["PYTHONPATH"])})
    wait_running(project, sups, ["env_00"])
    assert "[supervisord] nodaemon is not used by jobrunner; ignored" in sups.output(sup)
    assert "[unix_http_server] is supervisord's own; ignored" in sups.output(sup)
    project.cli("dispatch", "where", "{}", env={"JOBRUNNER_APP": "envapp", "PYTHONPATH": "%s:%s" % (
        project.path, project.env["PYTHONPATH"])})
    wait_until(lambda: project.values("where"), message="the handler")
    assert project.values("where") == ["%s|hello,_world|plain" % home]
    assert not (home / "var").exists()  # the database stayed where the supervisor found it


ENVAPP = """
import os
from jobapp import jobs, record

@jobs.handler(queue="hard")
def where():
    record("where", "%s|%s|%s" % (os.getcwd(), os.environ["GREETING"].replace(" ", "_"), os.environ["OTHER"]))
"""


@pytest.fixture
def envapp(project):
    (project.path / "envapp.py").write_text(ENVAPP)


test_a_program_gets_its_environment_and_directory = pytest.mark.usefixtures("envapp")(
    test_a_program_gets_its_environment_and_directory)


def test_sighup_rereads_the_config_file_and_applies_what_changed(project, sups):
    config = project.path / "w.ini"
    config.write_text("[program:mail]\ncommand = consume async\nnumprocs = 4\n")
    sup = sups.start("--config", "w.ini")
    first = wait_running(project, sups, ["mail_%02d" % i for i in range(4)])
    config.write_text("[program:mail]\ncommand = consume async\nnumprocs = 2\n\n[program:reports]\ncommand = consume high\n")
    sup.send_signal(signal.SIGHUP)
    wait_running(project, sups, ["mail_00", "mail_01", "reports_00"], timeout=15)
    for name in ("mail_02", "mail_03"):
        assert not alive(first[name]["pid"])
    log = log_text(project, "supervisor.log")
    assert "SIGHUP: %s reloaded: mail x2 [async], reports x1 [high]" % config in log
    # an invalid file is refused: the running configuration stays, untouched
    config.write_text("[program:mail]\ncommand = consume async\nnumprocz = 1\n")
    pids = {n: p["pid"] for n, p in wait_running(project, sups, ["mail_00", "mail_01", "reports_00"]).items()}
    sup.send_signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in log_text(project, "supervisor.log"), timeout=10)
    assert "unknown setting 'numprocz'" in log_text(project, "supervisor.log")
    after = wait_running(project, sups, ["mail_00", "mail_01", "reports_00"])
    assert {n: p["pid"] for n, p in after.items()} == pids  # not even restarted


def test_sighup_brings_back_a_worker_removed_and_wanted_again_before_it_had_stopped(project, sups):
    config = project.path / "w.ini"
    config.write_text("[program:slow]\ncommand = consume slow\nnumprocs = 2\nstopwaitsecs = 30\n")
    sup = sups.start("--config", "w.ini")
    first = wait_running(project, sups, ["slow_00", "slow_01"])
    dispatch(project, "slow", n=1, seconds=3)
    dispatch(project, "slow", n=2, seconds=3)
    wait_until(lambda: len(project.handled("start")) == 2, message="both workers busy")
    config.write_text("[program:slow]\ncommand = consume slow\nnumprocs = 1\nstopwaitsecs = 30\n")
    sup.send_signal(signal.SIGHUP)
    wait_until(lambda: "slow x1" in log_text(project, "supervisor.log"), timeout=5)
    config.write_text("[program:slow]\ncommand = consume slow\nnumprocs = 2\nstopwaitsecs = 30\n")
    sup.send_signal(signal.SIGHUP)  # slow_01 is still finishing its message
    wait_running(project, sups, ["slow_00", "slow_01"], exclude=[p["pid"] for p in first.values()], timeout=15)
    assert sorted(project.values()) == ["1", "2"]  # each finished its message: stopped once, not twice


def test_sighup_applies_new_log_sizes_and_refuses_a_config_whose_new_log_cannot_be_opened(project, sups):
    config = project.path / "w.ini"
    config.write_text("[program:a]\ncommand = consume async\n")
    sup = sups.start("--config", "w.ini", env={"JOBRUNNER_APP": "supapp"})
    old = wait_running(project, sups, ["a_00"])["a_00"]["pid"]
    config.write_text("[program:a]\ncommand = consume async\nstdout_logfile_maxbytes = 1KB\nstdout_logfile_backups = 1\n")
    sup.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded: a x1" in log_text(project, "supervisor.log"), timeout=5)
    pid = wait_running(project, sups, ["a_00"], exclude=[old])["a_00"]["pid"]  # a reload restarts every worker
    dispatch(project, "report", n="r", lines=40, _env={"JOBRUNNER_APP": "supapp"})  # 3.2 KB of output
    wait_until(lambda: project.handled("note"), message="the report")
    wait_until(lambda: "line 039" in log_text(project, "a_00.log"), timeout=5)
    assert os.path.getsize(project.path / "log" / "a_00.log") <= 1024
    assert os.path.getsize(project.path / "log" / "a_00.log.1") <= 1024
    (project.path / "log" / "b_00.log").symlink_to(project.path / "elsewhere")
    config.write_text("[program:a]\ncommand = consume async\n\n[program:b]\ncommand = consume high\n")
    sup.send_signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in log_text(project, "supervisor.log"), timeout=5)
    assert "b_00.log is a symbolic link" in log_text(project, "supervisor.log")
    assert wait_running(project, sups, ["a_00"])["a_00"]["pid"] == pid and sup.poll() is None
    assert not (project.path / "elsewhere").exists()


def test_log_dir_dash_sends_every_line_to_stdout_prefixed_with_its_process(project, sups, app):
    sup = sups.start("async", "--numprocs", 2, "-v", log_dir="-")
    wait_running(project, sups, ["async_00", "async_01"])
    app.dispatch_many("note", [{"n": i} for i in range(4)])
    wait_until(lambda: sups.output(sup).count("VERBOSE message") == 4, timeout=10, message="4 lines on stdout")
    out = sups.output(sup)
    assert re.search(r"^async_0[01] \| \S+ async_0[01]\[\d+\] VERBOSE message 1 handled by note", out, re.M)
    assert re.search(r"^\S+ supervisor\[\d+\] INFO spawned async_00", out, re.M)
    assert not (project.path / "-").exists() and not (project.path / "var" / "log").exists()


def test_log_format_json_writes_one_object_per_line(project, sups, app):
    sups.start("async", "-v", "--log-format", "json")
    wait_running(project, sups, ["async_00"])
    msg_id = app.dispatch("note", {"n": 1})
    wait_until(lambda: "handled by note" in log_text(project, "async_00.log"), message="the message")
    worker_lines = [json.loads(line) for line in log_text(project, "async_00.log").splitlines()]
    handled = [e for e in worker_lines if e["event"] == "handled"]
    assert handled and handled[0]["message_id"] == msg_id and handled[0]["handler"] == "note"
    assert set(handled[0]) >= {"time", "level", "process", "pid", "event", "message_id", "handler", "message"}
    assert handled[0]["process"] == "async_00" and handled[0]["level"] == "verbose"
    assert all(isinstance(json.loads(line), dict) for line in log_text(project, "supervisor.log").splitlines())


@pytest.mark.sqlite
def test_program_locks_live_in_one_directory_and_are_cleaned_up(project, sups):
    locks = project.path / "var" / "jobs.db.locks"
    sup = sups.start("async", "--name", "a")
    wait_running(project, sups, ["a_00"])
    assert sorted(os.listdir(locks)) == ["a.lock"] and stat.S_IMODE(os.stat(locks).st_mode) == 0o700
    refused = project.cli("supervise", "async", "--name", "a", "--log-dir", "log2")
    assert refused.returncode == 2 and "another supervisor already runs program a" in refused.stderr
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=15) == 0
    assert os.listdir(locks) == []  # a clean stop leaves nothing behind
    killed = sups.start("async", "--name", "b")
    wait_running(project, sups, ["b_00"])
    killed.kill()
    killed.wait()
    assert os.listdir(locks) == ["b.lock"]  # SIGKILL left it
    again = sups.start("async", "--name", "c")
    wait_running(project, sups, ["c_00"], timeout=15)
    assert sorted(os.listdir(locks)) == ["c.lock"]  # the next supervisor removed the stale one
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=15)


@pytest.mark.parametrize("config, message", [
    ("[supervise]\nlogdir = x\n[program:w]\ncommand = consume async\n",
     "unknown setting 'logdir' in [supervise] (known: app, dsn, log_dir, log_format, logfile_backups, "
     "logfile_maxbytes, ping_file, scheduler)"),
    ("[supervisor]\n[program:w]\ncommand = consume async\n", "unknown section [supervisor]"),
    ("[program:w]\ncommand = consume async\nenvironment = A=1,,\n", "[program:w]: environment = 'A=1,,' is not valid"),
    ("[program:w]\ncommand = consume async\ndirectory = /no/such/dir\n", "directory = '/no/such/dir' is not valid"),
])
def test_a_typo_in_a_config_file_is_refused(project, config, message):
    (project.path / "w.ini").write_text(config)
    result = project.cli("supervise", "--config", "w.ini")
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.postgres
def test_one_supervisor_per_program_is_a_postgresql_advisory_lock(project, sups):
    # a file lock cannot span hosts; the lock lives in the database both supervisors share
    first = sups.start("async", "--name", "mail")
    wait_running(project, sups, ["mail_00"])
    refused = project.cli("supervise", "async", "--name", "mail", "--log-dir", "log2")
    assert refused.returncode == 2
    assert "another supervisor already runs program mail on %s (lock advisory lock" % project.where in refused.stderr
    other = sups.start("high", "--name", "reports", log_dir="log3")  # another program: welcome
    wait_running(project, sups, ["mail_00", "reports_00"])
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    again = sups.start("async", "--name", "mail", log_dir="log4")  # the lock went with its session
    wait_running(project, sups, ["mail_00", "reports_00"], timeout=15)
    assert {p["supervisor_pid"] for p in supervised(status(project)).values()} == {again.pid, other.pid}


# --- ping files: liveness a probe can check without the database ---------------------------------


def ping_age(path):
    return time.time() - os.stat(path).st_mtime


def test_a_worker_touches_its_ping_file_each_beat_and_a_stopped_one_goes_stale(project):
    ping = project.path / "run" / "consume-{pid}.ping"
    (project.path / "run").mkdir()
    env = {"JOBRUNNER_DSN": project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=5)}
    proc = project.start("consume", "async", "--ping-file", ping, env=env)
    path = project.path / "run" / ("consume-%d.ping" % proc.pid)
    wait_until(path.exists)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = os.stat(path).st_mtime
    wait_until(lambda: os.stat(path).st_mtime > first, timeout=3, message="a second touch")
    result = project.cli("health", "--ping-file", project.path / "run" / "*.ping", "--max-age", "1")
    assert (result.returncode, result.stdout) == (0, "OK: 1 ping file(s) younger than 1s\n")

    os.kill(proc.pid, signal.SIGSTOP)  # frozen: the database would still say it beat a moment ago
    try:
        wait_until(lambda: ping_age(path) > 1.2, timeout=5, message="a stale ping file")
        result = project.cli("health", "--ping-file", path, "--max-age", "1")
        assert result.returncode == 1
        assert re.fullmatch(r"UNHEALTHY: ping file .*consume-\d+\.ping is \ds old, more than 1s\n", result.stdout)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: ping_age(path) < 0.5, timeout=3, message="a fresh touch after SIGCONT")
    assert project.cli("health", "--ping-file", path, "--max-age", "1").returncode == 0

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not path.exists()  # removed on a clean exit
    result = project.cli("health", "--ping-file", path, "--max-age", "1", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"healthy": False, "reasons": ["no ping file %s" % path], "ping_files": []}


def test_health_of_a_ping_file_never_opens_the_database(tmp_path):
    missing = tmp_path / "nowhere" / "jobs.db"
    ping = tmp_path / "ping"
    ping.touch()
    os.utime(ping, (time.time() - 30, time.time() - 30))
    run = [sys.executable, JOBRUNNER, "health", "--dsn", str(missing), "--ping-file"]
    result = subprocess.run(run + [str(ping)], capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "OK: 1 ping file(s) younger than 60s\n"), result.stderr
    os.utime(ping, (time.time() - 30, time.time() - 30))
    result = subprocess.run(run + [str(ping), "--max-age", "10"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and re.search(r"is 3\ds old, more than 10s", result.stdout)  # 30 s and the start
    result = subprocess.run(run + [str(tmp_path / "*.none")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "no ping file matches" in result.stdout
    assert not missing.parent.exists()


def test_supervise_ping_files_per_worker_or_one_while_everything_runs(project, sups):
    env = {"JOBRUNNER_DSN": project.dsn_with(heartbeat_interval=0.2, heartbeat_timeout=5)}
    each = sups.start("async", "--numprocs", 2, "--ping-file", "ping-{name}", env=env)
    procs = wait_running(project, sups, ["async_00", "async_01"])
    wait_until(lambda: (project.path / "ping-async_00").exists() and (project.path / "ping-async_01").exists())
    assert project.cli("health", "--ping-file", project.path / "ping-*", "--max-age", "2").returncode == 0
    os.kill(procs["async_01"]["pid"], signal.SIGKILL)
    wait_running(project, sups, ["async_00", "async_01"], exclude={procs["async_01"]["pid"]})
    each.send_signal(signal.SIGTERM)
    assert each.wait(15) == 0
    assert not list(project.path.glob("ping-*"))

    one = sups.start("async", "--numprocs", 2, "--ping-file", "alive", env=env)
    wait_running(project, sups, ["async_00", "async_01"])
    wait_until((project.path / "alive").exists)
    assert project.cli("health", "--ping-file", "alive", "--max-age", "2").returncode == 0
    one.send_signal(signal.SIGTERM)
    assert one.wait(15) == 0
    assert not (project.path / "alive").exists()
