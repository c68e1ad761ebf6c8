"""--prefetch: a worker claims several messages in one write, runs them in order and settles them together; what it
holds and never started goes back at a stop, or at the normal release when it is killed.  Real worker processes,
real signals, on SQLite and PostgreSQL."""

import os
import signal
import time

import pytest

from conftest import wait_for_stderr, wait_until, watch_stderr
from test_supervisor import alive, log_text, sups, wait_running  # noqa: F401 (sups is a fixture)
from test_threads import running

pytestmark = pytest.mark.backends


def queued(project):
    """``(attempts, claimed)`` of each message still stored, by id."""
    return project.query("SELECT attempts, claimed_by IS NOT NULL FROM messenger_messages ORDER BY id")


def test_prefetch_runs_each_message_once_in_order_and_keeps_the_limit_exact(project, app):
    app.dispatch_many("note", [{"n": i} for i in range(30)])
    result = project.cli("consume", "async", "--prefetch", 8, "--limit", 20)
    assert result.returncode == 0, result.stderr
    assert "stopped: message limit of 20 reached (20 messages" in result.stderr
    assert [value for value, _ in project.handled()] == [str(i) for i in range(20)]  # in dispatch order, each once
    # the last batch asked for 4 (the limit), so the other 10 were never claimed
    assert queued(project) == [(0, 0)] * 10


def test_a_prefetching_worker_holds_a_batch_and_gives_back_what_it_never_started(project, app):
    gate = project.path / "open"
    app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(5)])
    worker = watch_stderr(project.start("consume", "slow", "--prefetch", 3))
    wait_until(lambda: len(project.handled("start")) == 1, message="the first handler to start")
    assert sorted(running(project)) == [1, 2, 3]  # one write claimed three
    worker.send_signal(signal.SIGTERM)
    gate.touch()
    assert worker.wait(timeout=10) == 0
    assert project.values() == ["0"]
    # the two it prefetched are back with their attempt given back, as if never claimed, like the two it never took
    assert queued(project) == [(0, 0)] * 4


def test_threads_with_prefetch_run_each_message_once_and_keep_the_limit_exact(project, app):
    app.dispatch_many("note", [{"n": i} for i in range(60)])
    result = project.cli("consume", "async", "--threads", 4, "--prefetch", 8, "--limit", 40)
    assert result.returncode == 0, result.stderr
    assert "stopped: message limit of 40 reached (40 messages" in result.stderr
    assert sorted(int(value) for value, _ in project.handled()) == list(range(40))  # each once, in any order
    assert queued(project) == [(0, 0)] * 20  # never claimed beyond the limit


def test_threads_keep_a_buffer_claimed_ahead_and_a_stop_gives_it_back(project, app):
    gate = project.path / "open"
    app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(6)])
    worker = watch_stderr(project.start("consume", "slow", "--threads", 2, "--prefetch", 3))
    wait_until(lambda: len(project.handled("start")) == 2 and len(running(project)) == 5,
               message="two handlers running and three messages waiting for them")
    worker.send_signal(signal.SIGTERM)
    # the main thread takes the signal while the threads run on: open the gate once it has
    wait_for_stderr(worker, "received SIGTERM: finishing message")
    gate.touch()
    assert worker.wait(timeout=10) == 0
    assert sorted(project.values()) == ["0", "1"]
    # the three it held for its threads are back with their attempt given back, like the one it never claimed
    assert queued(project) == [(0, 0)] * 4


def test_threads_with_their_limit_claimed_wait_without_spinning(project, app):
    import psutil

    gate = project.path / "open"
    app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(6)])
    worker = watch_stderr(project.start("consume", "slow", "--threads", 2, "--prefetch", 4, "--limit", 2))
    try:
        wait_until(lambda: len(project.handled("start")) == 2, message="both handlers to start")
        process = psutil.Process(worker.pid)
        before = sum(process.cpu_times()[:2])
        time.sleep(1.0)  # both handlers wait for the gate; nothing more may be claimed
        assert sum(process.cpu_times()[:2]) - before < 0.2
        assert len(running(project)) == 2
    finally:
        gate.touch()
    assert worker.wait(timeout=10) == 0
    assert sorted(project.values()) == ["0", "1"]


def test_threads_settle_an_outcome_at_once_while_their_buffer_is_more_than_half_full(project, app):
    gate = project.path / "open"
    app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(3)])
    first = app.dispatch_many("slow", [{"n": 10 + i, "seconds": 0.5} for i in range(20)])[0]
    # the heartbeat, which also writes outcomes, does not beat during this test
    slow_beats = {"JOBRUNNER_DSN": project.dsn_with(heartbeat_interval=5, heartbeat_timeout=30)}
    worker = watch_stderr(project.start("consume", "slow", "--threads", 4, "--prefetch", 16, env=slow_beats))
    try:
        # three threads wait at the gate, one runs the slow messages: the buffer stays more than half full, and one
        # outcome is fewer than a thread's worth; it is written within _REFILL_WAIT all the same, not seconds later
        wait_until(lambda: project.values() == ["10"], timeout=10, message="the first slow message to finish")
        wait_until(lambda: project.query("SELECT COUNT(*) FROM messenger_messages WHERE id = ?", first) == [(0,)],
                   timeout=1.0, message="its acknowledgement written before the next message finishes")
        assert len(project.values()) == 1
    finally:
        gate.touch()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0


def test_a_long_handler_does_not_hold_back_the_outcomes_of_its_batch(project, app):
    gate = project.path / "open"
    done = app.dispatch("slow", {"n": 0, "seconds": 0})
    app.dispatch("gate", {"n": 1, "path": str(gate)})
    worker = watch_stderr(project.start("consume", "slow", "--prefetch", 2))
    try:
        wait_until(lambda: len(project.handled("start")) == 2, message="the gate to start")
        # the first message's acknowledgement is written by the heartbeat while the second handler still runs
        wait_until(lambda: project.query("SELECT id FROM messenger_messages") == [(done + 1,)], timeout=5,
                   message="the first message acknowledged")
    finally:
        gate.touch()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
    assert project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)]


@pytest.mark.parametrize("options", [("--prefetch", 4), ("--threads", 2, "--prefetch", 2)], ids=["alone", "threads"])
def test_a_killed_prefetching_worker_has_its_whole_batch_back_at_the_normal_release(project, app, sups, options):
    gate = project.path / "open"
    app.dispatch_many("gate", [{"n": i, "path": str(gate)} for i in range(4)])
    sups.start("slow", *options)
    victim = wait_running(project, sups, ["slow_00"])["slow_00"]["pid"]
    wait_until(lambda: len(running(project)) == 4, message="four messages claimed by one worker")
    os.kill(victim, signal.SIGKILL)
    replaced = wait_running(project, sups, ["slow_00"], exclude=(victim,))["slow_00"]["pid"]
    assert "released 4 message(s) held by dead worker(s) %d" % victim in log_text(project, "supervisor.log")
    gate.touch()
    wait_until(lambda: len(project.values()) == 4, message="the four to be handled by the new worker")
    assert sorted(int(v) for v in project.values()) == list(range(4))
    assert {pid for _, pid in project.handled()} == {replaced}
    wait_until(lambda: project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)], timeout=10,
               message="the four acknowledged")
    assert not alive(victim)


def test_prefetch_out_of_range_or_with_consume_failed_is_refused_in_one_line(project):
    for args in (["async", "--prefetch", 0], ["async", "--prefetch", 1001], ["failed", "--prefetch", 2]):
        result = project.cli("consume", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "prefetch" in result.stderr
    (project.path / "w.ini").write_text("[program:w]\ncommand = consume async\nthreads = 4\nprefetch = 1001\n")
    result = project.cli("supervise", "--config", "w.ini")
    assert result.returncode == 2 and "prefetch of program w" in result.stderr


def test_a_message_cancelled_while_it_waits_in_a_batch_never_runs(project, app):
    gate = project.path / "open"
    app.dispatch("gate", {"n": 0, "path": str(gate)})
    waiting = app.dispatch("slow", {"n": 1, "seconds": 0})
    quick = project.dsn_with(heartbeat_interval=0.1)
    worker = watch_stderr(project.start("consume", "slow", "--prefetch", 2, env={"JOBRUNNER_DSN": quick}))
    try:
        wait_until(lambda: len(project.handled("start")) == 1 and len(running(project)) == 2,
                   message="the first handler to start with the second claimed behind it")
        result = project.cli("cancel", waiting)
        assert result.returncode == 0 and "cancelled: its worker stops it" in result.stdout, result.stderr
        time.sleep(1.0)  # ten heartbeats: the worker learns it before the gate opens
        gate.touch()
        wait_for_stderr(worker, "message %d was cancelled before it started" % waiting)
    finally:
        gate.touch()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
    assert [value for value, _ in project.handled("start")] == ["0"]  # the cancelled one never ran
    assert project.values() == ["0"]
    assert project.query("SELECT COUNT(*) FROM messenger_messages") == [(0,)]
