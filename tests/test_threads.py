"""--threads: several handlers at once in one worker process, each message claimed, fenced, timed out, cancelled and
given back as it is without threads; real worker processes, real signals, on SQLite and PostgreSQL."""

import os
import signal
import time

import pytest

from conftest import wait_for_stderr, wait_until, watch_stderr
from test_supervisor import alive, log_text, stats, sups, wait_running  # noqa: F401 (sups is a fixture)

pytestmark = pytest.mark.backends


@pytest.fixture(params=[1, 4], ids=["claiming", "buffered"])
def prefetch(request):
    """Threads claim for themselves, or take from a buffer the main thread keeps filled (``--prefetch``)."""
    return ("--prefetch", request.param)


def running(project):
    """Ids of the messages claimed right now, with the id of the worker that holds each."""
    return dict(project.query("SELECT id, claimed_by FROM messenger_messages WHERE delivered_at IS NOT NULL"))


def test_threads_run_that_many_handlers_at_once_and_each_message_once(project, app, prefetch):
    app.dispatch_many("slow", [{"n": i, "seconds": 0.1} for i in range(40)])
    started = time.monotonic()
    result = project.cli("consume", "slow", "--threads", 8, "--limit", 40, "-v", *prefetch)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "stopped: message limit of 40 reached (40 messages, 0 failed attempts)" in result.stderr
    assert project.values() == sorted(str(i) for i in range(40))  # each once
    assert len({pid for _, pid in project.handled()}) == 1  # one process
    assert elapsed < 40 * 0.1 / 2  # one at a time would take 4 s; 8 at a time 0.5 s (plus the start)
    assert project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)]


def test_the_limit_is_exact_with_threads(project, app, prefetch):
    app.dispatch_many("slow", [{"n": i, "seconds": 0.05} for i in range(30)])
    result = project.cli("consume", "slow", "--threads", 8, "--limit", 11, *prefetch)
    assert result.returncode == 0, result.stderr
    assert len(project.values()) == 11
    assert project.query("SELECT COUNT(*) FROM messenger_messages WHERE delivered_at IS NULL") == [(19,)]


def test_a_killed_worker_has_every_message_its_threads_held_back_at_once(project, app, sups):
    gate = project.path / "open"
    ids = app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(4)])
    sups.start("slow", "--threads", 4)
    victim = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    wait_until(lambda: len(running(project)) == 4, message="four messages in flight in one process")
    os.kill(victim, signal.SIGKILL)
    # the supervisor reaps it and gives all four back at once; the new worker claims them again
    replaced = wait_running(project, sups, ["slow_00"], exclude=(victim,))["slow_00"]["pid"]
    wait_until(lambda: len(project.handled("start")) == 8, timeout=5, message="all four started again")
    assert sorted(pid for _, pid in project.handled("start")) == [victim] * 4 + [replaced] * 4
    assert "released 4 message(s) held by dead worker(s) %d" % victim in log_text(project, "supervisor.log")
    gate.touch()
    wait_until(lambda: len(project.values()) == 4, message="the four to finish")
    assert sorted(int(v) for v in project.values()) == list(range(4))
    # a handler records its value, then returns: the acknowledgement commits just after
    wait_until(lambda: project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)], timeout=10,
               message="the four acknowledged")
    assert not alive(victim) and len(ids) == 4


def test_a_second_signal_gives_back_what_every_thread_held_with_its_attempt(project, app, prefetch):
    app.dispatch_many("gate", [{"n": i, "path": str(project.path / "never")} for i in range(3)])
    worker = watch_stderr(project.start("consume", "slow", "--threads", 3, *prefetch))
    # started, not only claimed: a buffered message that no thread started goes back at the first signal
    wait_until(lambda: len(project.handled("start")) == 3, message="three handlers running")
    worker.send_signal(signal.SIGTERM)
    wait_for_stderr(worker, "a second signal aborts it")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 1
    rows = project.query("SELECT attempts, delivered_at, claimed_by FROM messenger_messages WHERE queue_name = 'slow'")
    assert rows == [(0, None, None)] * 3  # back on the queue, the interrupted attempt not counted


def test_a_timeout_and_a_cancel_interrupt_a_handler_in_a_thread(project, app, prefetch):
    spinning = app.dispatch("too_slow_loop", {"n": 1})
    waiting = app.dispatch("gate", {"n": 2, "path": str(project.path / "never")})
    worker = watch_stderr(project.start("consume", "async", "slow", "--threads", 2, "-v", *prefetch))
    wait_until(lambda: len(project.handled("start")) == 2, message="both handlers to start")
    assert project.cli("cancel", waiting).returncode == 0
    wait_for_stderr(worker, "message %d (gate) was cancelled while it ran: interrupted" % waiting, timeout=5)
    wait_for_stderr(worker, "message %d (too_slow_loop) failed, attempt 1: jobrunner.HandlerTimeout: handler ran past "
                            "its timeout of 0.3s" % spinning, timeout=5)
    assert worker.poll() is None  # the worker and its other thread went on
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0


def test_transactional_handlers_commit_each_their_own_writes_from_threads(project, app, prefetch):
    app.dispatch_many("transfer", [{"n": i, "fail": i % 5 == 0} for i in range(20)])
    project.execute("CREATE TABLE ledger (n INTEGER PRIMARY KEY)")  # not 4 threads racing to create it
    result = project.cli("consume", "async", "--threads", 4, "--limit", 20, *prefetch, env={"JOBAPP_RETRY_DELAY": "60"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("failed after writing") == 4
    # the four that failed rolled their write back (they wait for a retry); the other sixteen committed
    assert project.query("SELECT n FROM ledger ORDER BY n") == [(i,) for i in range(20) if i % 5]
    assert sorted(int(v) for v in project.values()) == [i for i in range(20) if i % 5]


def test_threads_out_of_range_are_refused_in_one_line(project):
    for threads in (0, 257, -1):
        result = project.cli("consume", "async", "--threads", threads)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "threads" in result.stderr
    (project.path / "w.ini").write_text("[program:w]\ncommand = consume async\nthreads = 0\n")
    result = project.cli("supervise", "--config", "w.ini")
    assert result.returncode == 2 and "threads of program w must be a whole number >= 1" in result.stderr
