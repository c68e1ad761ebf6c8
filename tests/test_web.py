"""`jobrunner web` and `jobrunner metrics`: the JSON API and its tokens with real HTTP requests, the page in a real
headless Chromium (Debian's, driven by Playwright, no browser download), /metrics through prometheus_client's
parser.  The browser tests skip when no Chromium is found, unless JOBRUNNER_TEST_BROWSER is set (as CI does)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import JOBRUNNER, REPO, wait_until

pytestmark = pytest.mark.backends

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "t0k3n-for-the-tests"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web(project, app):
    """A `jobrunner web` on a database holding queued, delayed and failed messages and some counted history."""
    app.dispatch_many("note", [{"n": i} for i in range(3)])
    app.dispatch("note_high", {"n": "h"}, delay=600)
    for n in range(3):
        app.dispatch("unrecoverable", {"n": "<img src=x onerror=alert(%d)>" % n})
    app.dispatch("always_fails", {"n": "<script>document.title='pwned'</script>"})
    assert app.run_pending(["async"]) == 7  # 3 notes, 3 unrecoverables failed at once, a first always_fails attempt
    project.execute("UPDATE messenger_messages SET available_at = ? WHERE queue_name = 'async'", time.time() + 600)
    port = free_port()
    proc = subprocess.Popen([sys.executable, JOBRUNNER, "web", "--port", str(port), "--token", TOKEN],
                            cwd=project.path, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    url = proc.stdout.readline().strip()
    assert first.startswith("jobrunner web on ") and url == "http://127.0.0.1:%d/?token=%s" % (port, TOKEN), (first, url)
    yield {"base": "http://127.0.0.1:%d" % port, "url": url, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)


def call(base, path, method="GET", body=None, token=None, host=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    if host:
        headers["Host"] = host
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read().decode()
            return response.status, (json.loads(raw) if "json" in response.headers["Content-Type"] else raw)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_the_api_answers_what_the_command_line_says(project, web):
    base = web["base"]
    status, stats = call(base, "/api/stats")
    assert status == 200 and stats == json.loads(project.cli("stats", "--json").stdout)
    assert stats["failed"] == 3
    status, failed = call(base, "/api/failed?limit=2")
    assert status == 200 and failed["total"] == 3 and len(failed["failed"]) == 2
    assert call(base, "/api/failed?error=UnrecoverableError")[1]["total"] == 3
    assert call(base, "/api/failed?handler=note")[1]["total"] == 0
    one = failed["failed"][0]["id"]
    status, detail = call(base, "/api/failed/%d" % one)
    assert status == 200 and detail["payload"]["n"].startswith("<img") and "Traceback" in detail["headers"]["traceback"]
    status, series = call(base, "/api/throughput?range=1h")
    assert status == 200 and series["step_s"] == 60 and sum(p[1] for p in series["points"]) == 3
    assert sum(p[2] for p in series["points"]) == 3
    assert call(base, "/api/throughput?range=24h")[1]["step_s"] == 600
    assert call(base, "/api/throughput?range=1y")[0] == 400
    assert call(base, "/api/status")[1] == {"processes": []}
    assert call(base, "/api/failed/999999")[0] == 404


def test_changes_need_the_bearer_token_always_and_do_what_they_say(project, web):
    base = web["base"]
    ids = [e["id"] for e in call(base, "/api/failed")[1]["failed"]]
    for path, body in (("/api/failed/retry", {"ids": ids[:1]}), ("/api/queues/async/pause", None),
                       ("/api/stop-workers", None), ("/api/messages/1/cancel", None)):
        assert call(base, path, "POST", body)[0] == 401  # no token
        assert call(base, path, "POST", body, token="wrong")[0] == 403
    assert call(base, "/api/failed/retry?token=%s" % TOKEN, "POST", {"ids": ids[:1]})[0] == 401  # never from the URL
    # a body that could be read wider than meant is refused: a filter dropped would remove every failed message
    for body in ({"all": True, "handler": 5}, {"all": True, "handler": "  "}, {"all": True, "handlers": "x"},
                 {"all": True, "ids": [424242]}, {"ids": ids[:1], "handler": "x"}, {"all": "yes"}):
        status, answer = call(base, "/api/failed/remove", "POST", body, token=TOKEN)
        assert status == 400 and "error" in answer, body
    assert sorted(e["id"] for e in call(base, "/api/failed")[1]["failed"]) == sorted(ids)
    assert call(base, "/api/failed/retry", "POST", {"ids": ids[:1]}, token=TOKEN) == (200, {"requeued": 1})
    assert call(base, "/api/failed/remove", "POST", {"ids": ids[1:2]}, token=TOKEN) == (200, {"removed": 1})
    assert call(base, "/api/failed/remove", "POST", {"all": True, "handler": "unrecoverable"}, token=TOKEN) == (
        200, {"removed": 1})
    assert json.loads(project.cli("stats", "--json").stdout)["failed"] == 0
    assert call(base, "/api/queues/async/pause", "POST", token=TOKEN) == (200, {"queue": "async", "paused": True})
    assert [q["paused"] for q in json.loads(project.cli("stats", "--json").stdout)["queues"] if q["queue"] == "async"] \
        == [True]
    assert call(base, "/api/queues/async/resume", "POST", token=TOKEN)[1]["paused"] is False
    assert call(base, "/api/queues/asnyc/pause", "POST", token=TOKEN)[0] == 404  # a typo pauses nothing
    assert not any(q["paused"] for q in json.loads(project.cli("stats", "--json").stdout)["queues"])
    delayed = project.query("SELECT id FROM messenger_messages WHERE queue_name = 'high'")[0][0]
    assert call(base, "/api/messages/%d/cancel" % delayed, "POST", token=TOKEN) == (
        200, {"id": delayed, "cancelled": "waiting"})
    assert call(base, "/api/messages/%d/cancel" % delayed, "POST", token=TOKEN)[0] == 404
    assert call(base, "/api/stop-workers", "POST", token=TOKEN) == (200, {"asked": 0})
    assert call(base, "/api/failed/retry", "POST", {"ids": "all"}, token=TOKEN)[0] == 400
    assert call(base, "/api/stats", host="evil.example:80")[0] == 421  # a rebound name is not ours


def test_off_loopback_every_request_needs_the_token_and_none_given_is_refused(project, app):
    app.setup()
    refused = project.cli("web", "--host", "0.0.0.0", "--port", free_port(), env={"JOBRUNNER_WEB_TOKEN": ""})
    assert refused.returncode == 2
    assert refused.stderr == ("jobrunner: error: serving on 0.0.0.0, off loopback, needs a token: --token or "
                              "JOBRUNNER_WEB_TOKEN\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, JOBRUNNER, "web", "--host", "0.0.0.0", "--port", str(port)],
                            cwd=project.path, env=dict(project.env, JOBRUNNER_WEB_TOKEN=TOKEN),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert proc.stdout.readline().strip() == "http://0.0.0.0:%d/?token=%s" % (port, TOKEN)
        base = "http://127.0.0.1:%d" % port
        assert call(base, "/api/stats")[0] == 401
        assert call(base, "/metrics")[0] == 401
        assert call(base, "/api/stats?token=%s" % TOKEN)[0] == 200
        assert call(base, "/api/stats", token=TOKEN)[0] == 200
        status, page = call(base, "/?token=%s" % TOKEN)
        assert status == 200 and "<title>jobrunner</title>" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_a_loopback_server_makes_up_a_token_when_none_is_given(project, app):
    app.setup()
    proc = subprocess.Popen([sys.executable, JOBRUNNER, "web", "--port", str(free_port())], cwd=project.path,
                            env=dict(project.env, JOBRUNNER_WEB_TOKEN=""), stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[A-Za-z0-9_-]{32}", proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_metrics_are_valid_prometheus_text_with_counters_that_survive_worker_restarts(project, app, web):
    from prometheus_client.parser import text_string_to_metric_families

    def families(text):
        return {f.name: f for f in text_string_to_metric_families(text)}

    cli = project.cli("metrics")
    assert cli.returncode == 0, cli.stderr
    status, served = call(web["base"], "/metrics")
    assert status == 200
    for text in (cli.stdout, served):
        found = families(text)
        ready = {s.labels["queue"]: s.value for s in found["jobrunner_queue_ready_messages"].samples}
        assert ready == {"async": 0, "high": 0}
        assert found["jobrunner_queue_delayed_messages"].type == "gauge"
        assert [s.value for s in found["jobrunner_failed_messages"].samples] == [3]
        handled = {(s.labels["queue"], s.labels["handler"]): s.value
                   for s in found["jobrunner_messages_handled"].samples if s.name.endswith("_total")}
        assert handled == {("async", "always_fails"): 0, ("async", "note"): 3, ("async", "unrecoverable"): 0}
        failed = {s.labels["handler"]: s.value for s in found["jobrunner_messages_failed"].samples
                  if s.name.endswith("_total")}
        assert failed["unrecoverable"] == 3
        retried = {s.labels["handler"]: s.value for s in found["jobrunner_messages_retried"].samples
                   if s.name.endswith("_total")}
        assert retried["always_fails"] == 1
    # another worker, in another process, later: the counters go on from where they were
    app.dispatch_many("note", [{"n": i} for i in range(2)])
    assert project.cli("consume", "async", "--limit", "2", "--time-limit", "20").returncode == 0
    found = families(project.cli("metrics").stdout)
    handled = {(s.labels["queue"], s.labels["handler"]): s.value
               for s in found["jobrunner_messages_handled"].samples if s.name.endswith("_total")}
    assert handled[("async", "note")] == 5


def test_two_standalone_workers_are_two_series_in_the_metrics(project, app):
    from prometheus_client.parser import text_string_to_metric_families

    app.setup()
    workers = [project.start("consume", "async") for _ in range(2)]  # both named "consume"
    wait_until(lambda: len(json.loads(project.cli("status", "--json").stdout)["processes"]) == 2,
               message="both workers registered")
    samples = [(s.name, tuple(sorted(s.labels.items())))
               for f in text_string_to_metric_families(project.cli("metrics").stdout) for s in f.samples]
    states = [dict(labels) for name, labels in samples if name == "jobrunner_process_state"]
    assert sorted(int(s["pid"]) for s in states) == sorted(w.pid for w in workers)
    assert len(samples) == len(set(samples)), "a scrape drops every sample but one of a repeated series"
    for worker in workers:
        worker.terminate()
        worker.wait(10)


# --- in a real browser ----------------------------------------------------------------------------


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("JOBRUNNER_TEST_BROWSER"):
            pytest.fail("JOBRUNNER_TEST_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium: the browser tests need Debian's chromium (CI installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("JOBRUNNER_TEST_BROWSER"):
            raise
        pytest.skip("no playwright (pip install '.[test]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


@pytest.mark.sqlite  # the page is the page; the API it calls is tested on both backends above
def test_the_page_draws_the_chart_retries_a_failed_message_and_pauses_a_queue(project, web, browser, tmp_path):
    # the screenshots land in the test's directory; JOBRUNNER_SCREENSHOTS=docs refreshes the README's
    shots = REPO / "docs" if os.environ.get("JOBRUNNER_SCREENSHOTS") == "docs" else tmp_path
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    alerts = []
    page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.accept()))
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(web["url"])
    assert "token=" not in page.url  # the token left the address bar (and so the history)
    page.wait_for_selector("#chart svg rect.bar-handled")
    # the stats and the chart load side by side: either may land first
    page.wait_for_function("document.getElementById('failed-count').textContent.trim() === '3'")
    page.wait_for_selector("#failed-body input.select")
    assert page.locator("#failed-body tr").count() == 3
    # hostile text is shown as text: nothing it holds ran
    assert page.title() == "jobrunner"
    assert page.evaluate("typeof window.alert === 'function'") and not [a for a in alerts if "pwned" in a]
    body = page.locator("#failed-body").inner_text()
    assert "unrecoverable" in body
    # one message's detail, then retried from the page
    # the message's answer is held back, so the page is seen while it loads: its buttons must not act
    # on whatever it showed before
    held, one_message = [], re.compile(r".*/api/failed/\d+$")

    def hold(route):
        held.append(route)
    page.route(one_message, hold)
    page.locator("#failed-body button.show").first.click()
    page.wait_for_selector("#detail:not([hidden])[aria-busy=true]")
    wait_until(lambda: held or page.wait_for_timeout(20), timeout=10, message="the detail request")
    assert page.locator("#detail-retry").is_disabled() and page.locator("#detail-remove").is_disabled()
    held.pop().continue_()
    page.unroute(one_message, hold)
    page.wait_for_selector("#detail:not([hidden])[aria-busy=false]")
    assert page.locator("#detail-retry").is_enabled()
    assert "<img src=x onerror=alert(" in page.locator("#detail-payload").inner_text()
    assert "Traceback (most recent call last)" in page.locator("#detail-traceback").inner_text()
    page.screenshot(path=str(shots / "dashboard-detail.png"))
    page.locator("#detail-retry").click()
    wait_until(lambda: json.loads(project.cli("stats", "--json").stdout)["failed"] == 2, timeout=10,
               message="the retry from the page")
    page.wait_for_function("document.querySelectorAll('#failed-body tr').length === 2")
    assert "requeued 1" in page.locator("#message").inner_text()
    # a queue paused from the page
    page.locator("button[data-action=pause][data-queue=async]").click()
    wait_until(lambda: [q["paused"] for q in json.loads(project.cli("stats", "--json").stdout)["queues"]
                        if q["queue"] == "async"] == [True], timeout=10, message="the pause from the page")
    page.wait_for_selector("button[data-action=resume][data-queue=async]")
    page.locator("button[data-range='24h']").click()
    page.wait_for_selector("button[data-range='24h'][aria-pressed=true]")
    page.locator("button[data-range='1h']").click()
    page.wait_for_selector("#chart svg rect.bar-handled")
    page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
    assert (shots / "dashboard.png").stat().st_size > 10000
    assert errors == []
    assert not any("pwned" in a or a.isdigit() for a in alerts)


def raw_request(base, text):
    """Send ``text`` as written (what urllib would not send) and read the whole answer."""
    host, port = base.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(text.encode())
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    return int(head.split()[1]), head, body


def test_odd_requests_get_a_json_answer_and_rows_with_nan_still_give_valid_json(project, web):
    base = web["base"]
    for length in ("abc", "-5", "-1"):  # -1 made the server read until the client closed
        status, _, body = raw_request(base, "POST /api/stop-workers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                                            "Bearer %s\r\nContent-Length: %s\r\nConnection: close\r\n\r\n" % (TOKEN, length))
        assert status == 400 and "Content-Length must be a number of bytes" in json.loads(body)["error"]
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        status, head, body = raw_request(base, "%s /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                                         % method)
        assert status == 405 and "Allow: GET, POST" in head and method in json.loads(body)["error"]
    status, head, body = raw_request(base, "HEAD /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 405 and body == ""  # a HEAD answer has no body
    failed = call(base, "/api/failed")[1]["failed"][0]["id"]
    project.execute("UPDATE messenger_messages SET body = '{\"n\": NaN, \"m\": [Infinity]}' WHERE id = ?", failed)
    status, detail = call(base, "/api/failed/%d" % failed)
    assert status == 200 and detail["payload"] == {"n": "nan", "m": ["inf"]}  # NaN is not JSON: JSON.parse refuses it
    assert web["proc"].poll() is None


def test_with_the_app_the_api_and_metrics_list_its_queues_as_stats_does(project, app):
    env = {"JOBRUNNER_DSN": ""}  # the app names the database (./jobrunner.db, as it runs here): its queues are known
    assert project.cli("setup", env=env).returncode == 0
    port = free_port()
    proc = project.start("web", "--port", port, "--token", TOKEN, env=env)
    try:
        assert proc.stdout.readline().startswith("jobrunner web on ")
        base = "http://127.0.0.1:%d" % port
        stats = json.loads(project.cli("stats", "--json", env=env).stdout)
        assert "empty" in [q["queue"] for q in stats["queues"]]  # declared by the app, never used
        assert call(base, "/api/stats")[1] == stats
        assert 'jobrunner_queue_ready_messages{queue="empty"} 0' in call(base, "/metrics")[1]
        assert call(base, "/api/queues/empty/pause", "POST", token=TOKEN) == (200, {"queue": "empty", "paused": True})
        assert call(base, "/api/queues/emtpy/pause", "POST", token=TOKEN)[0] == 404
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_body_left_unread_is_never_taken_for_the_next_request(project, web):
    smuggled = "GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for first in ("POST /api/failed/remove HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n",  # 403
                  "PUT /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n"):  # 405
        host, port = web["base"].rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall((first + "Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled).encode())
            answer = b""
            while chunk := conn.recv(65536):  # the server closes: no second answer follows
                answer += chunk
        assert answer.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in answer


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here (some containers)")
def test_the_printed_link_carries_any_token_and_an_ipv6_loopback_serves(project, app):
    app.setup()
    port = free_port()
    proc = project.start("web", "--host", "::1", "--port", port, "--token", "a+b&c#d")
    try:
        assert proc.stdout.readline().startswith("jobrunner web on ")
        url = proc.stdout.readline().strip()
        assert url == "http://[::1]:%d/?token=a%%2Bb%%26c%%23d" % port
        status, stats = call("http://[::1]:%d" % port, "/api/stats?token=a%2Bb%26c%23d")
        assert status == 200 and "queues" in stats
    finally:
        proc.terminate()
        proc.wait(10)
