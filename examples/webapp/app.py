"""A tiny web app that queues work with jobrunner: the standard library's wsgiref, no framework.

    POST /signup   (form field ``email``)  -> 201 {"user_id": 1, "message_id": 1}, or 409 if the email is taken
    GET  /users                            -> 200 [{"id": 1, "email": "...", "welcomed": false, "created_at": ...}]

A signup stores the user and dispatches ``send_welcome`` inside one ``jobs.transaction()``: both commit together
or neither does, so no user goes unwelcomed and no mail goes to a user who was never stored.

Vendored, the whole deployment is this directory with jobrunner.py copied next to app.py (Python puts the
script's directory first on sys.path, so that copy is the one imported).  Installed (``pip install .`` in a
jobrunner checkout), nothing is copied.  Either way:

    python app.py --port 8000                          # serves until SIGTERM or Ctrl-C
    python jobrunner.py consume --app jobs -v          # a worker, vendored (installed: jobrunner consume --app jobs -v)
    curl -si -d email=ann@example.com localhost:8000/signup && curl -s localhost:8000/users

The database is $JOBRUNNER_DSN, default sqlite:///var/webapp.db (relative to the working directory): the web
app, its workers and every jobrunner command must be started where they resolve it to the same file.
"""

import argparse
import json
import signal
import sqlite3
import threading
import time
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

import jobrunner
from jobs import create_tables, jobs

MAX_FORM_BYTES = 64 * 1024  # a signup form is tiny; never read an unbounded body into memory


def respond(start_response, status, data):
    body = json.dumps(data).encode("utf-8")
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def signup(environ, start_response):
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 <= length <= MAX_FORM_BYTES:
        return respond(start_response, "400 Bad Request", {"error": "a form of at most %d bytes" % MAX_FORM_BYTES})
    form = parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
    email = (form.get("email") or [""])[0].strip().lower()
    if "@" not in email or len(email) > 254:
        return respond(start_response, "400 Bad Request", {"error": "a valid email is required"})
    try:
        with jobs.transaction() as db:
            user_id = db.execute("INSERT INTO users (email, created_at) VALUES (?, ?)", (email, time.time())).lastrowid
            # joins the transaction above: stored, and visible to workers, only when the INSERT commits
            message_id = jobs.dispatch("send_welcome", {"user_id": user_id})
    # Any other failure (the message refused, a full disk) rolls both back as well and propagates: wsgiref
    # answers 500 and logs the traceback on stderr.
    except sqlite3.IntegrityError:
        # the UNIQUE constraint: the transaction rolled back, so no second user and no second message exist
        return respond(start_response, "409 Conflict", {"error": "%s is already signed up" % email})
    return respond(start_response, "201 Created", {"user_id": user_id, "message_id": message_id})


def users(environ, start_response):
    with jobs.transaction() as db:  # a short transaction: one consistent read, on jobrunner's own connection
        rows = db.execute("SELECT id, email, welcomed, created_at FROM users ORDER BY id").fetchall()
    return respond(start_response, "200 OK", [{"id": r[0], "email": r[1], "welcomed": bool(r[2]), "created_at": r[3]}
                                               for r in rows])


ROUTES = {("POST", "/signup"): signup, ("GET", "/users"): users}


def application(environ, start_response):
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
    view = ROUTES.get((method, path))
    if view is not None:
        return view(environ, start_response)
    if any(p == path for _, p in ROUTES):
        return respond(start_response, "405 Method Not Allowed", {"error": "%s is not allowed on %s" % (method, path)})
    return respond(start_response, "404 Not Found", {"error": "no route %s" % path})


def main(argv=None):
    parser = argparse.ArgumentParser(description="jobrunner's example web app")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    args = parser.parse_args(argv)

    create_tables()
    server = make_server(args.host, args.port, application)  # logs each request on stderr
    # Requests are served by a thread; the main thread only waits for SIGTERM or SIGINT.  Blocked before the
    # thread starts (which inherits the mask), the signals can only reach sigwait() below, and shutdown() then
    # lets the request being answered finish instead of interrupting it halfway through its transaction.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    serving = threading.Thread(target=server.serve_forever, name="http")
    serving.start()
    # the first line says where everything is: which jobrunner was imported (the vendored copy?) and which database
    print("listening on http://%s:%d (jobrunner %s, database %s)"
          % (args.host, server.server_port, jobrunner.__file__, jobs.transport.where), flush=True)
    signum = signal.sigwait(stop_signals)
    server.shutdown()
    serving.join()
    server.server_close()
    jobs.close()
    print("stopped on %s" % signal.Signals(signum).name, flush=True)


if __name__ == "__main__":
    main()
