"""What jobrunner does when things go wrong, with real processes killed for real.

Each scenario asserts that nothing is lost, exactly, and reports its figures
(see the "reliability figures" section at the end of a pytest run).
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import hold_write_lock, report, wait_until, watch_stderr

pytestmark = pytest.mark.slow

RELIAPP = {"JOBRUNNER_APP": "reliapp"}


def fill(project, count):
    """count messages for reliapp's `work` handler, in one transaction."""
    code = "import reliapp; reliapp.jobs.dispatch_many('work', [{'n': i} for i in range(%d)])" % count
    subprocess.run([sys.executable, "-c", code], env=dict(project.env, **RELIAPP), cwd=project.path, check=True)


def queue_counts(project):
    stats = json.loads(project.cli("stats", "--json").stdout)
    pending = sum(q["ready"] + q["delayed"] + q["in_flight"] for q in stats["queues"])
    return pending, stats["failed"]


def workers_of(supervisor):
    try:
        return [c for c in psutil.Process(supervisor.pid).children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc):
    """SIGKILL a supervisor and every worker it forked (they live in their own process groups)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [proc] + children:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def logs_of(project):
    """The end of every program log under var/log, to say why a drain stalled."""
    logs = sorted((project.path / "var" / "log").glob("*"))
    return "".join("\n== %s ==\n%s" % (p.name, p.read_text()[-3000:]) for p in logs)


def check_all_handled(project, count, kills, per_kill=1):
    """Every message handled at least once, none left, none failed; duplicates only from kills (``per_kill`` each)."""
    handled = project.values()
    unique = set(handled)
    assert unique == {str(i) for i in range(count)}, "lost: %s" % sorted(
        {str(i) for i in range(count)} - unique, key=int)[:20]
    pending, failed = queue_counts(project)
    assert (pending, failed) == (0, 0)
    duplicates = len(handled) - count
    assert duplicates <= kills * per_kill, "%d duplicates from %d kills" % (duplicates, kills)
    return duplicates


@pytest.mark.backends
@pytest.mark.parametrize("threads, prefetch", [(1, 1), (1, 8), (4, 8)])
def test_workers_killed_at_random_lose_nothing(project, threads, prefetch):
    # 3 workers x 3 ms handlers: the drain takes ~4 s whatever the CPU; the 12 kills take ~3 s of it.
    # With --prefetch a kill can cost a batch: what the worker had handled and not yet settled runs again; with
    # threads too, what its threads ran since its last claim: at most what the buffer held and what they held then.
    count, planned = 4000 * threads, 12
    fill(project, count)
    supervisor = project.start("supervise", "async", "--numprocs", "3", "--threads", str(threads),
                               "--prefetch", str(prefetch), "--log-dir", "var/log", env=RELIAPP)
    kills = 0
    rng = random.Random(1)
    started = time.monotonic()
    # the supervisor's children are its workers once it runs them (before, one is its check of the app)
    wait_until(lambda: len(project.query("SELECT id FROM jobrunner_workers")) == 3, timeout=30, message="3 workers")
    try:
        while len(set(project.values())) < count:
            if time.monotonic() - started > 90 or supervisor.poll() is not None:
                kill_tree(supervisor)
                raise AssertionError("drain stalled at %d: %s" % (len(set(project.values())),
                                                                  supervisor.communicate()[1][-3000:]))
            time.sleep(rng.uniform(0.1, 0.4))
            victims = workers_of(supervisor)
            if victims and kills < planned and len(set(project.values())) < count:
                os.kill(rng.choice(victims).pid, signal.SIGKILL)
                kills += 1
        wait_until(lambda: queue_counts(project)[0] == 0, timeout=15, message="an empty queue")
        duplicates = check_all_handled(project, count, kills, per_kill=prefetch + (threads if threads > 1 else 0))
        assert kills >= planned // 2, "the drain ended after %d kills: too fast to be a test" % kills
        options = "".join(" --%s %d" % (name, value) for name, value in (("threads", threads), ("prefetch", prefetch))
                          if value > 1)
        report("[%s] random SIGKILLs of 3 supervised workers%s: %d messages, %d kills, lost 0, failed 0, "
               "%d duplicates, %.1fs" % (project.backend, options and " with" + options, count, kills, duplicates,
                                         time.monotonic() - started))
    finally:
        kill_tree(supervisor)


@pytest.mark.backends
def test_supervisor_killed_and_restarted_loses_nothing(project):
    count = 2000
    fill(project, count)
    args = ("supervise", "async", "--numprocs", "2", "--log-dir", "var/log")
    first = project.start(*args, env=RELIAPP)
    started = time.monotonic()
    try:
        wait_until(lambda: len(project.values()) > count // 3, timeout=30, message="a third handled")
    except AssertionError as exc:
        kill_tree(first)
        raise AssertionError("%s; %d handled\n%s\n%s" % (exc, len(project.values()), first.communicate()[1][-3000:],
                                                         logs_of(project))) from None
    orphans = workers_of(first)
    kill_tree_pids = [p.pid for p in orphans]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    # the kernel tells the orphaned workers (PR_SET_PDEATHSIG): they finish their message and exit
    wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in kill_tree_pids), timeout=10, message="the orphaned workers to exit")
    second = project.start(*args, env=RELIAPP)
    try:
        wait_until(lambda: len(set(project.values())) == count, timeout=60, message="every message handled")
        wait_until(lambda: queue_counts(project)[0] == 0, timeout=15, message="an empty queue")
        duplicates = check_all_handled(project, count, kills=2)
        report("[%s] supervisor SIGKILLed mid-drain and restarted: %d messages, lost 0, failed 0, %d duplicates, "
               "orphans gone, %.1fs" % (project.backend, count, duplicates, time.monotonic() - started))
    finally:
        kill_tree(second)


PRODUCER = textwrap.dedent("""
    import sys, reliapp
    first, count = int(sys.argv[1]), int(sys.argv[2])
    for n in range(first, first + count):
        reliapp.jobs.dispatch("work", {"n": n})
""")


@pytest.mark.backends
def test_four_producers_four_consumers(project):
    per_producer, producers = 1000, 4
    count = per_producer * producers
    env = dict(project.env, **RELIAPP, RELIAPP_WORK_S="0")
    project.cli("setup")
    consumers = [project.start("consume", "async", env={**RELIAPP, "RELIAPP_WORK_S": "0"}) for _ in range(4)]
    started = time.monotonic()
    running = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(i * per_producer), str(per_producer)], env=env,
                                cwd=project.path) for i in range(producers)]
    assert [p.wait(60) for p in running] == [0] * producers
    wait_until(lambda: len(project.values()) >= count, timeout=60, message="every message handled")
    elapsed = time.monotonic() - started
    for c in consumers:
        c.send_signal(signal.SIGTERM)
    assert [c.wait(10) for c in consumers] == [0] * 4
    handled = project.handled()
    values = [v for v, _ in handled]
    assert sorted(values, key=int) == [str(i) for i in range(count)], "lost or handled twice"
    took_part = len({pid for _, pid in handled})
    assert took_part >= 2, "the consumers did not share the work"  # all four usually; SQLite promises no fairness
    assert queue_counts(project) == (0, 0)
    report("[%s] 4 producers and 4 consumers: %d messages in %.1fs, %d consumers took part, lost 0, handled twice 0"
           % (project.backend, count, elapsed, took_part))


def cpu_seconds(pid):
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.postgres
@pytest.mark.parametrize("threads", [1, 4])
def test_every_connection_terminated_three_times_mid_drain_loses_nothing(project, threads):
    # A PostgreSQL restart, a failover, a network blip: every session of the workers and the supervisor is cut,
    # three times.  They reconnect with backoff and go on; nothing is lost.  With threads, a cut lands on
    # claims made together for several threads, whose answer may never come back.
    count, cuts, workers = 3000, 3, 2
    fill(project, count)
    supervisor = project.start("supervise", "async", "--numprocs", str(workers), "--threads", str(threads),
                               "--log-dir", "var/log", env=RELIAPP)
    started = time.monotonic()
    cut = 0
    try:
        while cut < cuts:
            wait_until(lambda: len(set(project.values())) > (cut + 1) * count // (cuts + 2), timeout=60,
                       message="progress before cut %d" % (cut + 1))
            terminated = project.query("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE application_name = ? AND pid <> pg_backend_pid()", project.schema)[0][0]
            assert terminated >= workers  # at least each worker's connection
            cut += 1
        wait_until(lambda: len(set(project.values())) == count, timeout=90, message="every message handled")
        wait_until(lambda: queue_counts(project)[0] == 0, timeout=15, message="an empty queue")
        duplicates = check_all_handled(project, count, kills=cuts * workers)
        log = "".join(p.read_text() for p in (project.path / "var" / "log").glob("async_0*.log*"))
        assert "cannot reach database" in log or "terminat" in log  # they did notice
        report("[postgres] every connection terminated %d times mid-drain, %d thread(s) per worker: %d messages, "
               "lost 0, failed 0, %d duplicates, %.1fs" % (cuts, threads, count, duplicates, time.monotonic() - started))
    finally:
        kill_tree(supervisor)


@pytest.mark.postgres
def test_a_connection_cut_before_a_prefetched_transactional_handler_begins_costs_it_no_attempt(project, app):
    # The cut lands while the batch's first handler runs; the next statement is the transaction of the second.
    app.dispatch("slow", {"n": 1, "seconds": 1.5})
    app.dispatch("tx_once", {"n": 2})  # max_retries=0: a spent attempt would fail it
    worker = watch_stderr(project.start("consume", "slow", "--prefetch", "4", "-v"))
    wait_until(lambda: project.values("start") == ["1"], message="the first handler to start")
    assert project.query("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name = ? AND pid <> pg_backend_pid()", project.schema)[0][0] >= 1
    wait_until(lambda: sorted(project.values("note")) == ["1", "2"], timeout=20, message="both handled")
    wait_until(lambda: queue_counts(project) == (0, 0), timeout=10, message="an empty queue")
    assert worker.poll() is None, "the worker should have gone on"


@pytest.mark.postgres
def test_a_connection_cut_under_a_running_transactional_handler_is_retried_not_failed(project, app):
    app.dispatch("tx_slow", {"n": 1})  # max_retries=0: had the cut cost an attempt, it would fail
    worker = watch_stderr(project.start("consume", "slow", "-v"))
    wait_until(lambda: project.values("start") == ["1"], message="the handler to start")
    assert project.query("SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name = ? AND pid <> pg_backend_pid()", project.schema)[0][0] >= 1
    wait_until(lambda: project.values("note") == ["1"], timeout=20, message="the message handled on a new connection")
    assert project.values("start") == ["1", "1"]
    wait_until(lambda: queue_counts(project) == (0, 0), timeout=10, message="an empty queue, nothing failed")
    assert worker.poll() is None


@pytest.mark.postgres
def test_a_dispatch_from_a_handler_waits_for_the_wal_flush_as_every_dispatch_does(project, app):
    # The worker's own bookkeeping commits with synchronous_commit off on its connection; a handler's dispatch
    # shares that connection, yet it is the app's write.  A trigger records the setting each insert ran under.
    app.setup()
    project.query("CREATE TABLE commit_modes (body TEXT, mode TEXT)")
    project.query("CREATE FUNCTION note_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                  "INSERT INTO commit_modes VALUES (NEW.body, current_setting('synchronous_commit')); RETURN NEW; "
                  "END $$")
    project.query("CREATE TRIGGER commit_mode AFTER INSERT ON messenger_messages FOR EACH ROW "
                  "EXECUTE FUNCTION note_commit_mode()")
    app.dispatch("spawn", {"n": 1})
    app.dispatch("spawn", {"n": 2})
    worker = project.cli("consume", "async", "--limit", "4", "--time-limit", "10")
    assert worker.returncode == 0, worker.stderr
    assert sorted(project.values("note")) == ["1.0", "2.0"]
    assert project.query("SELECT body, mode FROM commit_modes ORDER BY body") == [
        ('{"n":"1.0"}', "on"), ('{"n":"2.0"}', "on"), ('{"n":1}', "on"), ('{"n":2}', "on")]


def test_write_lock_held_for_seconds_is_waited_out(project):
    project.cli("setup")
    worker = project.start("consume", "async", env=RELIAPP)
    fill(project, 50)
    wait_until(lambda: len(project.values()) == 50, message="the first batch")
    locker = hold_write_lock(project.db, 3)
    started = time.monotonic()
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, "50", "50"], env=dict(project.env, **RELIAPP),
                                cwd=project.path)
    assert producer.wait(30) == 0
    waited = time.monotonic() - started
    assert waited >= 2.5, "the producer should have waited for the lock"
    locker.wait(10)
    wait_until(lambda: len(project.values()) == 100, message="the second batch")
    assert worker.poll() is None
    assert queue_counts(project) == (0, 0), "nothing failed because of the lock"
    report("write lock held 3s by another process: producer waited %.1fs, 100 messages handled, 0 failed" % waited)


def test_write_lock_held_past_the_busy_timeout_gives_clear_errors(project):
    dsn = "sqlite:///%s?busy_timeout=1" % project.db
    env = {**RELIAPP, "JOBRUNNER_DSN": dsn}
    project.cli("setup")
    worker = project.start("consume", "async", env=env)
    fill(project, 10)
    wait_until(lambda: len(project.values()) == 10, message="the first batch")
    locker = hold_write_lock(project.db, 5)
    before = cpu_seconds(worker.pid)
    result = project.cli("dispatch", "work", '{"n": 10}', env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "locked" in result.stderr and "Traceback" not in result.stderr
    time.sleep(3)
    busy = cpu_seconds(worker.pid) - before
    locker.wait(10)
    assert worker.poll() is None, "the worker rides the outage out"
    assert busy < 0.5, "the worker spun for %.2f CPU seconds while locked out" % busy
    assert project.cli("dispatch", "work", '{"n": 10}', env=env).returncode == 0
    wait_until(lambda: len(project.values()) == 11, message="the message after the outage")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=10)
    assert "locked" in err and "Traceback" not in err
    assert queue_counts(project) == (0, 0)
    report("write lock held past busy_timeout: dispatch exits 1 with one line, worker used %.2f CPU s in 3s, "
           "then carried on; 0 failed" % busy)


def test_database_deleted_under_running_workers(project):
    fill(project, 20)
    project.cli("dispatch", "work", '{"n": 99}', "--delay", "3600", env=RELIAPP)
    workers = [project.start("consume", "async", env=RELIAPP) for _ in range(2)]
    wait_until(lambda: len(project.values()) == 20, message="the ready messages handled")
    # both running on this file (under load one may start after the other drained it all)
    wait_until(lambda: project.query("SELECT COUNT(*) FROM jobrunner_workers") == [(2,)], message="both workers")
    for suffix in ("", "-wal", "-shm"):
        os.unlink(str(project.db) + suffix)
    started = time.monotonic()
    codes = [w.wait(15) for w in workers]
    stopped_in = time.monotonic() - started
    assert codes == [1, 1]
    assert stopped_in < 5, "the workers noticed within their heartbeats"
    errors = "".join(w.stderr.read() for w in workers)
    assert "was deleted or replaced" in errors and "Traceback" not in errors
    assert not project.db.exists()  # stopping, neither made an empty one in its place
    saved = list(project.db.parent.glob("jobs.db.saved-*"))
    assert saved, "the delayed message was not saved"
    rows = sqlite3.connect(saved[0]).execute("SELECT body FROM messenger_messages").fetchall()
    assert rows == [('{"n":99}',)]
    report("database deleted under 2 running workers: both stop in %.1fs with exit 1 and a clear error; the "
           "message still stored was saved beside it" % stopped_in)


@pytest.fixture
def honour_permissions():
    """A command prefix under which file permissions apply: root ignores them unless it drops CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return []
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv(1) to drop CAP_DAC_OVERRIDE")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps, "--"]


def test_database_file_made_read_only(project, honour_permissions):
    """Permissions are checked when a file is opened: a running worker goes on; a new writer gets a clear error."""
    from conftest import JOBRUNNER

    def jobrunner(*args):
        return subprocess.run([*honour_permissions, sys.executable, JOBRUNNER, *args], env=dict(project.env, **RELIAPP),
                              cwd=project.path, capture_output=True, text=True, timeout=30)

    assert jobrunner("dispatch", "work", '{"n": 0}').returncode == 0
    worker = subprocess.Popen([*honour_permissions, sys.executable, JOBRUNNER, "consume", "async"],
                              env=dict(project.env, **RELIAPP), cwd=project.path, stderr=subprocess.PIPE, text=True)
    project.processes.append(worker)
    wait_until(lambda: project.values() == ["0"], message="the first message")
    os.chmod(project.db, 0o400)
    result = jobrunner("dispatch", "work", '{"n": 1}')
    assert result.returncode == 2, result.stderr
    assert "read-only" in result.stderr and result.stderr.count("\n") == 1
    assert worker.poll() is None
    os.chmod(project.db, 0o600)
    assert jobrunner("dispatch", "work", '{"n": 1}').returncode == 0
    wait_until(lambda: project.values() == ["0", "1"], message="the message after the fix")
    report("database file made read-only: a new producer exits 2 with one line, the running worker carries on")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("mounting a small tmpfs needs CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_gives_clear_errors_and_loses_nothing(project, small_disk):
    db = small_disk / "jobs.db"
    env = {**RELIAPP, "JOBRUNNER_DSN": str(db)}
    project.cli("setup", env=env)
    worker = project.start("consume", "async", env=env)
    for n in range(5):
        assert project.cli("dispatch", "work", '{"n": %d}' % n, env=env).returncode == 0
    wait_until(lambda: len(project.values()) == 5, message="the first batch")
    project.cli("dispatch", "work", '{"n": 100}', "--delay", "3600", env=env)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    before = cpu_seconds(worker.pid)
    failures = 0
    for n in range(5, 25):
        result = project.cli("dispatch", "work", '{"n": %d, "pad": "%s"}' % (n, "x" * 3000), env=env)
        if result.returncode != 0:
            failures += 1
            assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    time.sleep(1)
    assert failures > 0, "the disk never filled up"
    assert worker.poll() is None
    assert cpu_seconds(worker.pid) - before < 1.0
    filler.unlink()
    assert project.cli("dispatch", "work", '{"n": 200}', env=env).returncode == 0
    wait_until(lambda: "200" in project.values(), message="the message after space came back")
    rows = sqlite3.connect(str(db)).execute("SELECT body FROM messenger_messages WHERE available_at > ?",
                                           (time.time(),)).fetchall()
    assert rows == [('{"n":100}',)], "the delayed message survived"
    report("disk full: %d of 20 dispatches refused with one line (exit 2), the worker idled, nothing stored was lost"
           % failures)
