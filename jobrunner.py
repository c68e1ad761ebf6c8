"""jobrunner: a durable SQLite job queue, its workers and their supervisor, in one file.

Register handlers on a :class:`JobRunner`, dispatch messages to them, and run
``python jobrunner.py consume async`` (one worker) or ``python jobrunner.py
supervise`` (several, kept alive).  Messages live in Symfony Messenger's
``messenger_messages`` table; failed ones in the same table under the queue
name ``failed``.  Importing this module and dispatching needs only the standard
library; the command line needs click, the supervisor filelock, and memory
figures prefer psutil.
"""

__version__ = "0.1.0"

__all__ = [
    "JobRunner",
    "Handler",
    "FAILED_QUEUE",
    "RetryStrategy",
    "Envelope",
    "Settings",
    "Transport",
    "SqliteTransport",
    "PostgresTransport",
    "Worker",
    "Scheduler",
    "Supervisor",
    "ProgramConfig",
    "JobRunnerError",
    "ConfigurationError",
    "StorageError",
    "DatabaseLocked",
    "InvalidMessage",
    "UnknownMessage",
    "UnrecoverableError",
    "RecoverableError",
    "HandlerTimeout",
    "main",
]

import collections
import contextlib
import dataclasses
import errno
import functools
import inspect
import json
import logging
import math
import os
import re
import select
import signal
import sqlite3
import sys
import threading
import time
import traceback

# socket, urllib.parse, ctypes and random are imported where they are used: every `consume` starts cold, and its start
# is part of the drain it runs (together ~8 ms of ~80).
_log = logging.getLogger("jobrunner")
_SQL_TRACE = 5  # -vvv: every SQL statement


# --- Errors -----------------------------------------------------------------


class JobRunnerError(Exception):
    """Base class of every error jobrunner raises on purpose."""

    #: what the command line exits with when this error reaches it
    exit_code = 2


class ConfigurationError(JobRunnerError):
    """The app, the DSN, a handler definition or an option is wrong."""


class StorageError(JobRunnerError):
    """The database cannot be used: missing, unwritable, not SQLite, broken."""


class DatabaseLocked(StorageError):
    """Another connection held the write lock for longer than the busy timeout."""

    exit_code = 1


class InvalidMessage(JobRunnerError, ValueError):
    """A message that cannot be dispatched: unknown handler, bad payload, too big, bad queue."""


class UnknownMessage(JobRunnerError, LookupError):
    """No message with that id (in the failure queue, where that is asked)."""


class UnrecoverableError(JobRunnerError):
    """Raise from a handler to fail the message now, without retries."""


class RecoverableError(JobRunnerError):
    """Raise from a handler to retry the message whatever ``max_retries`` says.

    ``retry_after`` (seconds) overrides the strategy's delay for this retry.
    """

    def __init__(self, message="", retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class HandlerTimeout(JobRunnerError):
    """A handler ran past its ``timeout``; the attempt counts as failed."""


def _ended_its_transaction():
    # its writes may be committed by now, without the acknowledgement: running it again would write them twice
    return UnrecoverableError("the handler ended the transaction that acknowledges its message (a COMMIT or ROLLBACK "
                              "of its own); not retried, as what it wrote before may be committed")


def _error_class(exc):
    """The name an error is recorded under: ``ValueError``, ``jobrunner.HandlerTimeout``, ``requests.Timeout``."""
    cls = type(exc)
    module = "jobrunner" if cls.__module__ == __name__ else cls.__module__  # also when run as a script (__main__)
    return cls.__qualname__ if module in ("builtins", "__main__") else "%s.%s" % (module, cls.__qualname__)


def _format_exception(exc):
    return _storable("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def _storable_key(key):
    """A key both databases store as given: PostgreSQL's text refuses NUL, and UTF-8 lone surrogates."""
    if not (isinstance(key, str) and 0 < len(key) <= 255) or "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(text):
    """Text with any lone surrogate spelled out: an error naming a file by os.fsdecode() has them, and UTF-8 can't."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- DSN and settings ---------------------------------------------------------

_KIB, _MIB = 1024, 1024 * 1024
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_TABLE_NAME_MAX = 63 - len("_claimed")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the database is and how jobrunner uses it.

    Every field but ``path`` and ``url`` can be set in the DSN's query string,
    e.g. ``sqlite:///var/jobs.db?synchronous=FULL&busy_timeout=30`` or
    ``postgresql://app@db/jobs?table=jobs&heartbeat_timeout=20``.
    """

    #: the SQLite file (None for a PostgreSQL database)
    path: str
    #: seconds a connection waits for another one's write lock before giving up
    busy_timeout: float = 10.0
    #: NORMAL survives any process crash; FULL also survives power loss
    synchronous: str = "NORMAL"
    #: the WAL is truncated back to this size after a checkpoint
    journal_size_limit: int = 64 * _MIB
    #: seconds between a worker's heartbeats
    heartbeat_interval: float = 1.0
    #: a worker silent this long is dead and its message is released
    heartbeat_timeout: float = 30.0
    #: largest accepted JSON body, in bytes
    max_body_bytes: int = 1 * _MIB
    #: claims with no known worker (written by other tools) are redelivered after this
    redeliver_timeout: float = 3600.0
    #: the messages table, as Symfony's ``table_name``
    table: str = "messenger_messages"
    #: a PostgreSQL database: its URL, with jobrunner's options taken out (libpq's stay)
    url: str = None
    #: PostgreSQL: the schema of every jobrunner table (default: the search path's first)
    schema: str = None
    #: PostgreSQL behind PgBouncer in transaction mode: no prepared statements
    pgbouncer: bool = False

    @property
    def dsn(self):
        """The database, as a DSN another process can be given (the options that say where the tables are kept)."""
        if not self.url:
            return self.path
        import urllib.parse

        extra = [(key, getattr(self, key)) for key in ("table", "schema") if getattr(self, key) not in (None, "messenger_messages")]
        if self.pgbouncer:
            extra.append(("pgbouncer", "1"))
        if not extra:
            return self.url
        return self.url + ("&" if "?" in self.url else "?") + urllib.parse.urlencode(extra)

    def __post_init__(self):
        sync = str(self.synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise ConfigurationError("synchronous must be one of %s, not %r" % (", ".join(_SYNCHRONOUS), self.synchronous))
        object.__setattr__(self, "synchronous", sync)
        for name in ("busy_timeout", "heartbeat_interval", "heartbeat_timeout", "redeliver_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError("%s must be a positive number of seconds" % name)
        if self.heartbeat_timeout < 3 * self.heartbeat_interval:
            raise ConfigurationError("heartbeat_timeout must be at least three heartbeat_interval")
        if self.max_body_bytes <= 0 or self.journal_size_limit < 0:
            raise ConfigurationError("max_body_bytes and journal_size_limit must be positive")
        if not isinstance(self.table, str) or not _IDENTIFIER.match(self.table) or self.table.startswith("jobrunner_"):
            raise ConfigurationError("table must be a lowercase SQL name (letters, digits, _), not %r" % (self.table,))
        if len(self.table) > _TABLE_NAME_MAX:  # the same limit on both databases, so a table moves between them
            raise ConfigurationError("table name %r is %d characters: at most %d (PostgreSQL names its indexes "
                                     "after it, in 63)" % (self.table, len(self.table), _TABLE_NAME_MAX))
        if self.schema is not None and not (isinstance(self.schema, str) and _IDENTIFIER.match(self.schema)):
            raise ConfigurationError("schema must be a lowercase SQL name (letters, digits, _), not %r" % (self.schema,))

    @classmethod
    def from_dsn(cls, dsn, **overrides):
        """Parse ``sqlite:///relative.db``, ``sqlite:////absolute.db``, a plain path, or ``postgresql://...``."""
        if isinstance(dsn, os.PathLike):
            dsn = os.fspath(dsn)
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError("the DSN must be a non-empty string, like sqlite:///var/jobs.db")
        options = {}
        if "://" in dsn:
            scheme, _, rest = dsn.partition("://")
            if scheme.lower() in _SERVER_SCHEMES:
                return cls._from_server_url(dsn, overrides)
            if scheme.lower() not in ("sqlite", "sqlite3"):
                raise ConfigurationError("unsupported DSN scheme %r: use sqlite:///path.db or postgresql://user@host/db"
                                         % scheme)
            if not rest.startswith("/"):
                raise ConfigurationError("a SQLite DSN has three slashes: sqlite:///relative.db or sqlite:////absolute.db")
            import urllib.parse

            path, _, query = rest[1:].partition("?")
            path = urllib.parse.unquote(path)
            options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        else:
            path = dsn
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigurationError("the DSN must name a database file that workers in other processes can open, not %r" % path)
        values = cls._options(options, overrides, "SQLite", _SERVER_ONLY)
        return cls(path=os.path.abspath(os.path.expanduser(path)), **values)

    @classmethod
    def _from_server_url(cls, dsn, overrides):
        """A PostgreSQL URL: jobrunner's options out of its query string, libpq's left in it."""
        import urllib.parse

        try:
            parts = urllib.parse.urlsplit(dsn)
            parts.port  # noqa: B018 -- parsed here, where a bad one can still be told apart from a lost server
        except ValueError as exc:  # the DSN itself is not repeated: it may hold a password
            raise ConfigurationError("malformed PostgreSQL DSN: %s" % exc) from None
        ours, theirs = {}, []
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key in names:
                ours[key] = value
            else:
                theirs.append((key, value))
        # libpq decodes %20 but not '+': a space (options=-c statement_timeout=5000) must stay %20
        query = urllib.parse.urlencode(theirs, quote_via=urllib.parse.quote)
        url = urllib.parse.urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))
        values = cls._options(ours, overrides, "PostgreSQL", _SQLITE_ONLY)
        return cls(path=None, url=url, **values)

    @classmethod
    def _options(cls, options, overrides, backend, not_here):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("path", "url")}
        values = {}
        for key, raw in options.items():
            field = fields.get(key)
            if field is None:
                raise ConfigurationError("unknown DSN option %r (known: %s)" % (key, ", ".join(sorted(fields))))
            if key in not_here:
                raise ConfigurationError("DSN option %r does not apply to %s" % (key, backend))
            kind = bool if key == "pgbouncer" else str if key == "schema" else type(field.default)
            values[key] = _convert_option(key, raw, kind)
        values.update({k: v for k, v in overrides.items() if v is not None and k not in ("path", "url")})
        return values


_SERVER_SCHEMES = ("postgresql", "postgres")
_SQLITE_ONLY = ("synchronous", "journal_size_limit")
_SERVER_ONLY = ("schema", "pgbouncer")


def _convert_option(key, raw, kind):
    try:
        if kind is bool:
            if str(raw).lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return str(raw).lower() in ("1", "true", "yes", "on")
        if kind is int:
            return _parse_size(raw) if key.endswith("bytes") or key.endswith("limit") else int(raw)
        if kind is float:
            value = float(raw)
            if math.isnan(value) or math.isinf(value):
                raise ValueError(raw)
            return value
        return raw
    except (ValueError, TypeError):
        raise ConfigurationError("DSN option %s=%r is not a valid %s" % (key, raw, kind.__name__)) from None


_SIZE_UNITS = {"": 1, "B": 1, "K": _KIB, "KB": _KIB, "M": _MIB, "MB": _MIB, "G": 1024 * _MIB, "GB": 1024 * _MIB}


def _parse_size(text):
    """Bytes from ``128M``, ``1G``, ``512kb`` or a plain number; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in _SIZE_UNITS:
        raise ValueError("not a size: %r (use a number of bytes or 128M, 1G...)" % (text,))
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _host_identity():
    """Hostname, boot and pid namespace: two processes that share it see each other's pids."""
    parts = [os.uname().nodename]  # gethostname(), without importing socket
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")
    return "/".join(parts)


_own_pid = os.getpid()  # getpid() is a system call; the hot path asks once per message, a fork updates this


def _forked():
    global _own_pid
    _own_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Serialization and the message envelope ------------------------------------

_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,189}\Z")
FAILED_QUEUE = "failed"


def _check_queue_name(queue):
    """Return ``queue`` if it is a usable queue name, else raise InvalidMessage."""
    if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
        raise InvalidMessage(
            "invalid queue name %r: use 1 to 190 letters, digits, '_', '.', ':' or '-', starting with a letter or digit" % (queue,)
        )
    return queue


_MAX_NESTING = 100


def _encode_json(value):
    """Compact JSON; raises InvalidMessage for what JSON cannot carry (NaN, objects, lone surrogates, deep nesting)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")  # SQLite stores UTF-8: a lone surrogate would fail later, in sqlite3
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMessage("payload is not JSON-serializable: %s" % exc) from None
    if text.count("[") + text.count("{") > _MAX_NESTING:  # cheap bound first; walk only when it could be deep
        _check_nesting(value)
    return text


def _check_nesting(value):
    """Refuse what a worker could not decode at any stack depth; iterative, so it cannot overflow itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise InvalidMessage("payload is nested deeper than %d levels" % _MAX_NESTING)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))


@dataclasses.dataclass
class Envelope:
    """A stored message: its payload and the metadata in its headers."""

    id: int
    queue: str
    handler: str
    payload: dict
    headers: dict
    attempts: int
    created_at: float
    available_at: float
    delivered_at: float = None

    @property
    def error(self):
        """``ErrorClass: message`` for a failed message, else None."""
        if "error_class" not in self.headers:
            return None
        return "%s: %s" % (self.headers.get("error_class"), self.headers.get("error_message", ""))


@dataclasses.dataclass
class _Delivery:
    """A claimed row, still raw: decoding it can fail and that is the worker's business."""

    id: int
    body: str
    headers: str
    queue: str
    created_at: float
    available_at: float
    attempts: int
    worker_id: int


def _text_or_bytes(data):
    """A TEXT value as str; one that is not UTF-8 (written by another tool) as bytes, so reading it cannot fail."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


@contextlib.contextmanager
def _tolerant_text(conn):
    """Read TEXT that is not UTF-8 (written by another tool) as bytes instead of failing; off the hot path."""
    conn.text_factory = _text_or_bytes
    try:
        yield conn
    finally:
        conn.text_factory = str


_scan_json = json.scanner.make_scanner(json.JSONDecoder())


def _loads(text):
    """json.loads, without its two whitespace regexes for the compact text we write ourselves."""
    if type(text) is str and text[:1] == "{":
        try:
            value, end = _scan_json(text, 0)
        except (StopIteration, ValueError, RecursionError):
            pass  # let json.loads say what is wrong
        else:
            if end == len(text):
                return value
    return json.loads(text)


def _decode_headers(text):
    try:
        headers = _loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    return headers if isinstance(headers, dict) else None


def _int_header(headers, key):
    """A count kept in the headers; 0 when absent or garbage."""
    value = headers.get(key)
    if value is None:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _encode_headers(headers):
    """Headers as stored: like encode_json, but tolerant of what a garbage row brought in (NaN, odd types)."""
    return json.dumps(headers, separators=(",", ":"), ensure_ascii=False, default=_json_safe)


def _json_safe(value):
    """A column value as JSON can carry it: text stays text, a BLOB becomes ``base64:...``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        import base64

        return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
    if value is None or isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return repr(value)


def _envelope_from_row(row):
    """Envelope from a (id, body, headers, queue, created, available, delivered, attempts) row, tolerating garbage."""
    id_, body, headers_text, queue, created, available, delivered, attempts = row
    headers = _decode_headers(headers_text)
    if headers is None:
        headers = {"original_headers": _json_safe(headers_text)}
    try:
        payload = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        payload = body
    handler = headers.get("handler")
    return Envelope(id_, queue, handler if isinstance(handler, str) else None, payload, headers, attempts, created, available, delivered)


# --- Transports -----------------------------------------------------------------
#
# One class owns the queue's flow and every SQL statement, written once with
# ``?`` placeholders and named; a subclass per database supplies connecting,
# transactions, the claim's lock clause and the way an idle worker waits.
# Nothing outside this section speaks SQL.

_SQL_TYPES = {
    "sqlite": {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "real": "REAL", "text": "TEXT"},
    "postgresql": {"pk": "BIGSERIAL PRIMARY KEY", "int": "BIGINT", "real": "DOUBLE PRECISION", "text": "TEXT"},
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {messages} (
    id {pk},
    body {text} NOT NULL,
    headers {text} NOT NULL,
    queue_name VARCHAR(190) NOT NULL,
    created_at {real} NOT NULL,
    available_at {real} NOT NULL,
    delivered_at {real},
    claimed_by {int},
    attempts {int} NOT NULL DEFAULT 0,
    priority {int} NOT NULL DEFAULT 0,
    unique_key {text}
);
{message_indexes}
CREATE UNIQUE INDEX IF NOT EXISTS {messages}_unique ON {messages} (unique_key) WHERE unique_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobrunner_workers (
    id {pk},
    name {text} NOT NULL,
    host {text} NOT NULL,
    pid {int} NOT NULL,
    ppid {int} NOT NULL,
    queues {text} NOT NULL,
    started_at {real} NOT NULL,
    beat_at {real} NOT NULL,
    beats {int} NOT NULL DEFAULT 0,
    handled {int} NOT NULL DEFAULT 0,
    failed {int} NOT NULL DEFAULT 0,
    rss_bytes {int},
    message_id {int}
);
CREATE TABLE IF NOT EXISTS jobrunner_processes (
    name {text} PRIMARY KEY,
    program {text} NOT NULL,
    host {text} NOT NULL,
    supervisor_pid {int} NOT NULL,
    state {text} NOT NULL,
    pid {int},
    state_since {real} NOT NULL,
    started_at {real},
    updated_at {real} NOT NULL,
    description {text} NOT NULL DEFAULT '',
    exit_status {int}
);
CREATE TABLE IF NOT EXISTS jobrunner_control (
    key {text} PRIMARY KEY,
    value {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS jobrunner_schedules (
    name {text} PRIMARY KEY,
    last_tick {real} NOT NULL
);
-- Messages handled, retried and failed per minute, queue and handler, added by each worker once a second;
-- rows older than a day are folded into the minute-0 rows, so the sums are all-time counters.
CREATE TABLE IF NOT EXISTS jobrunner_minutes (
    minute {real} NOT NULL,
    queue_name {text} NOT NULL,
    handler {text} NOT NULL,
    handled {int} NOT NULL DEFAULT 0,
    retried {int} NOT NULL DEFAULT 0,
    failed {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, queue_name, handler)
)
"""
# How each backend finds the next message and the claimed ones.
_MESSAGE_INDEXES = {
    # One index for both: per queue the claimed rows first (newest first), then the unclaimed in claim order (a NULL
    # sorts last when descending). A claim moves its row from the head of the unclaimed to the head of the claimed:
    # mostly within one page, so a commit writes one index page, not one per index (22 % less per message).
    "sqlite": "CREATE INDEX IF NOT EXISTS {messages}_queue ON {messages} "
              "(queue_name, delivered_at DESC, priority DESC, available_at, id, claimed_by)",
    # Only unclaimed rows, in claim order: claimed ones would sit in the claim's ORDER BY and force a sort.
    "postgresql": "CREATE INDEX IF NOT EXISTS {messages}_next ON {messages} (queue_name, priority DESC, available_at, id) "
                  "WHERE delivered_at IS NULL;\n"
                  "CREATE INDEX IF NOT EXISTS {messages}_claimed ON {messages} (claimed_by) WHERE delivered_at IS NOT NULL",
}
# Indexes of older jobrunners, replaced by the ones above.
_OLD_INDEXES = {"sqlite": ("{messages}_ready", "{messages}_next", "{messages}_claimed"),
                "postgresql": ("{messages}_ready",)}

# Columns added to tables that exist already: a table created by Symfony, or by an older jobrunner.
_ADDED_COLUMNS = {
    "{messages}": [("claimed_by", "{int}"), ("attempts", "{int} NOT NULL DEFAULT 0"),
                   ("priority", "{int} NOT NULL DEFAULT 0"), ("unique_key", "{text}")],
    "jobrunner_workers": [("beats", "{int} NOT NULL DEFAULT 0")],
    "jobrunner_processes": [("exit_status", "{int}")],
}
_OUR_TABLES = ("{messages}", "jobrunner_workers", "jobrunner_processes", "jobrunner_control", "jobrunner_schedules",
               "jobrunner_minutes")

_FENCE = " WHERE id = ? AND claimed_by = ? AND attempts = ?"
_MESSAGE_COLUMNS = "id, body, headers, queue_name, created_at, available_at, delivered_at, attempts"

_SQL = {
    "insert": "INSERT INTO {messages} (body, headers, queue_name, created_at, available_at, priority, unique_key) "
              "VALUES (?, ?, ?, ?, ?, ?, ?)",
    # while a message with this key is queued, delayed or in flight, a dispatch with the key stores nothing
    "insert_unique": "INSERT INTO {messages} (body, headers, queue_name, created_at, available_at, priority, unique_key) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING",
    "unique_holder": "SELECT id FROM {messages} WHERE unique_key = ?",
    # a paused queue gives nothing: its flag is read in the claim itself, so a pause is exact
    "claim": "UPDATE {messages} SET delivered_at = ?, claimed_by = ?, attempts = attempts + 1 "
             "WHERE id = (SELECT id FROM {messages} WHERE queue_name = ? AND delivered_at IS NULL AND available_at <= ? "
             "AND NOT EXISTS (SELECT 1 FROM jobrunner_control WHERE key = ?) "
             "ORDER BY priority DESC, available_at, id LIMIT 1{lock}) "
             "RETURNING id, body, headers, queue_name, created_at, available_at, attempts",
    # up to N messages at once, for the threads of one worker or a prefetch (the priority to sort them by)
    "claim_many": "UPDATE {messages} SET delivered_at = ?, claimed_by = ?, attempts = attempts + 1 "
                  "WHERE id IN (SELECT id FROM {messages} WHERE queue_name = ? AND delivered_at IS NULL "
                  "AND available_at <= ? AND NOT EXISTS (SELECT 1 FROM jobrunner_control WHERE key = ?) "
                  "ORDER BY priority DESC, available_at, id LIMIT ?{lock}) "
                  "RETURNING id, body, headers, queue_name, created_at, available_at, attempts, priority",
    # `consume failed`: one failed message at a time, by id, to run its handler once more
    "claim_failed": "UPDATE {messages} SET delivered_at = ?, claimed_by = ?, attempts = attempts + 1 "
                    "WHERE id = ? AND queue_name = 'failed' AND delivered_at IS NULL "
                    "RETURNING id, body, headers, queue_name, created_at, available_at, attempts",
    # The earliest unclaimed message of a queue: the index is ordered by priority first, so take the
    # earliest of each priority, one index seek per distinct priority.
    "next_due": "WITH RECURSIVE p(v) AS (SELECT MAX(priority) FROM {messages} WHERE queue_name = ? AND delivered_at IS NULL "
                "UNION ALL SELECT (SELECT MAX(priority) FROM {messages} WHERE queue_name = ? AND delivered_at IS NULL "
                "AND priority < p.v) FROM p WHERE p.v IS NOT NULL) "
                "SELECT MIN((SELECT MIN(available_at) FROM {messages} WHERE queue_name = ? AND delivered_at IS NULL "
                "AND priority = p.v)) FROM p WHERE p.v IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM jobrunner_control WHERE key = ?)",
    "ack": "DELETE FROM {messages}" + _FENCE,
    "retry": "UPDATE {messages} SET delivered_at = NULL, claimed_by = NULL, available_at = ?, headers = ?" + _FENCE,
    "fail": "UPDATE {messages} SET queue_name = 'failed', delivered_at = NULL, claimed_by = NULL, unique_key = NULL, "
            "available_at = ?, headers = ?" + _FENCE,
    # a release gives back an attempt the worker never really made (it was told to stop, or the lock was busy)
    "release": "UPDATE {messages} SET delivered_at = NULL, claimed_by = NULL, attempts = attempts - 1" + _FENCE,
    "release_worker": "UPDATE {messages} SET delivered_at = NULL, claimed_by = NULL, available_at = ? "
                      "WHERE claimed_by = ? AND delivered_at IS NOT NULL",
    # claims a worker never saw: committed while its connection was lost before the answer came back
    "release_own": "UPDATE {messages} SET delivered_at = NULL, claimed_by = NULL, attempts = attempts - 1 "
                   "WHERE claimed_by = ? AND delivered_at IS NOT NULL AND NOT (id {in_ids})",
    # Claims with no worker: another tool's (no claimed_by), after redeliver_timeout as Symfony does; a forgotten
    # worker's at once. On PostgreSQL a claim sent by a worker killed mid-statement still commits after its death,
    # so after the release of its claims: it would wait for redeliver_timeout otherwise.
    "any_unowned": "SELECT 1 FROM {messages} WHERE delivered_at IS NOT NULL AND (claimed_by IS NULL AND delivered_at < ? "
                   "OR claimed_by NOT IN (SELECT id FROM jobrunner_workers)) LIMIT 1",
    "release_unowned": "UPDATE {messages} SET delivered_at = NULL, claimed_by = NULL, available_at = ? "
                       "WHERE delivered_at IS NOT NULL AND (claimed_by IS NULL AND delivered_at < ? "
                       "OR claimed_by NOT IN (SELECT id FROM jobrunner_workers))",
    "stats_waiting": "SELECT queue_name, SUM(CASE WHEN available_at <= ? THEN 1 ELSE 0 END), "
                     "SUM(CASE WHEN available_at > ? THEN 1 ELSE 0 END), MIN(available_at) "
                     "FROM {messages} WHERE delivered_at IS NULL GROUP BY queue_name",
    "stats_claimed": "SELECT queue_name, COUNT(*) FROM {messages} WHERE delivered_at IS NOT NULL GROUP BY queue_name",
    "consumed_queues": "SELECT DISTINCT queues FROM jobrunner_workers",
    "get": "SELECT " + _MESSAGE_COLUMNS + " FROM {messages} WHERE id = ?",
    "failed": "SELECT " + _MESSAGE_COLUMNS + " FROM {messages} WHERE queue_name = 'failed' "
              "ORDER BY available_at DESC, id DESC",
    "failed_in": "SELECT " + _MESSAGE_COLUMNS + " FROM {messages} WHERE queue_name = 'failed' AND id {in_ids} "
                 "ORDER BY available_at DESC, id DESC",
    "failed_count": "SELECT COUNT(*) FROM {messages} WHERE queue_name = 'failed'",
    "failed_ids": "SELECT id FROM {messages} WHERE queue_name = 'failed' ORDER BY id",
    "failed_found": "SELECT id FROM {messages} WHERE queue_name = 'failed' AND id {in_ids}",
    # a failed message that `consume failed` is replaying stays where it is: moved, another worker would run it too
    "requeue": "UPDATE {messages} SET queue_name = ?, headers = ?, attempts = 0, available_at = ?, delivered_at = NULL, "
               "claimed_by = NULL WHERE id = ? AND queue_name = 'failed' AND delivered_at IS NULL",
    "remove_failed": "DELETE FROM {messages} WHERE queue_name = 'failed' AND delivered_at IS NULL AND id {in_ids}",
    "worker_insert": "INSERT INTO jobrunner_workers (name, host, pid, ppid, queues, started_at, beat_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    "worker_beat": "UPDATE jobrunner_workers SET beat_at = ?, beats = beats + 1, handled = ?, failed = ?, rss_bytes = ?, "
                   "message_id = ? WHERE id = ?",
    "worker_delete": "DELETE FROM jobrunner_workers WHERE id = ?",
    # a frozen worker may hold its own row (PostgreSQL): its claims go back anyway, its row on a later round
    "worker_delete_dead": "DELETE FROM jobrunner_workers WHERE id = (SELECT id FROM jobrunner_workers WHERE id = ?{lock})",
    "workers": "SELECT id, host, pid, ppid, beats FROM jobrunner_workers",
    "workers_started_before": "SELECT COUNT(*) FROM jobrunner_workers WHERE started_at <= ?",
    "worker_children": "SELECT id, pid, beats FROM jobrunner_workers WHERE host = ? AND ppid = ?",
    "control_get": "SELECT value FROM jobrunner_control WHERE key = ?",
    "control_delete": "DELETE FROM jobrunner_control WHERE key = ?",
    "paused": "SELECT key, value FROM jobrunner_control WHERE key >= 'paused:' AND key < 'paused;'",
    # cancelling: a waiting message goes at once; one in flight is marked, for its worker to interrupt
    "cancel_waiting": "DELETE FROM {messages} WHERE id = ? AND delivered_at IS NULL "
                      "AND queue_name NOT IN ('failed', 'cancelled')",
    "cancel_running": "UPDATE {messages} SET queue_name = 'cancelled', unique_key = NULL WHERE id = ? "
                      "AND delivered_at IS NOT NULL AND queue_name NOT IN ('failed', 'cancelled')",
    "purge_cancelled": "DELETE FROM {messages} WHERE queue_name = 'cancelled' AND delivered_at IS NULL",
    "queue_of": "SELECT queue_name FROM {messages} WHERE id = ?",
    "cancelled_in": "SELECT id FROM {messages} WHERE queue_name = 'cancelled' AND id {in_ids}",
    "schedule_start": "INSERT INTO jobrunner_schedules (name, last_tick) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
    "schedule_advance": "UPDATE jobrunner_schedules SET last_tick = ? WHERE name = ? AND last_tick < ?",
    "schedule_last": "SELECT last_tick FROM jobrunner_schedules WHERE name = ?",
    "count_add": "INSERT INTO jobrunner_minutes (minute, queue_name, handler, handled, retried, failed) "
                 "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (minute, queue_name, handler) DO UPDATE SET "
                 "handled = jobrunner_minutes.handled + excluded.handled, "
                 "retried = jobrunner_minutes.retried + excluded.retried, "
                 "failed = jobrunner_minutes.failed + excluded.failed",
    "count_fold": "INSERT INTO jobrunner_minutes (minute, queue_name, handler, handled, retried, failed) "
                  "SELECT 0, queue_name, handler, SUM(handled), SUM(retried), SUM(failed) FROM jobrunner_minutes "
                  "WHERE minute > 0 AND minute < ? GROUP BY queue_name, handler "
                  "ON CONFLICT (minute, queue_name, handler) DO UPDATE SET "
                  "handled = jobrunner_minutes.handled + excluded.handled, "
                  "retried = jobrunner_minutes.retried + excluded.retried, "
                  "failed = jobrunner_minutes.failed + excluded.failed",
    "count_prune": "DELETE FROM jobrunner_minutes WHERE minute > 0 AND minute < ?",
    "count_totals": "SELECT queue_name, handler, SUM(handled), SUM(retried), SUM(failed) FROM jobrunner_minutes "
                    "GROUP BY queue_name, handler ORDER BY queue_name, handler",
    "count_series": "SELECT minute, SUM(handled), SUM(failed) FROM jobrunner_minutes WHERE minute >= ? "
                    "GROUP BY minute ORDER BY minute",
    "control_set": "INSERT INTO jobrunner_control (key, value) VALUES (?, ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    # a pause of a paused queue keeps its first time: `health --max-paused` measures from there
    "control_add": "INSERT INTO jobrunner_control (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
    "process_upsert": "INSERT INTO jobrunner_processes (name, program, host, supervisor_pid, state, pid, state_since, "
                      "started_at, updated_at, description, exit_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT (name) DO UPDATE SET program = excluded.program, host = excluded.host, "
                      "supervisor_pid = excluded.supervisor_pid, state = excluded.state, pid = excluded.pid, "
                      "state_since = excluded.state_since, started_at = excluded.started_at, "
                      "updated_at = excluded.updated_at, description = excluded.description, "
                      "exit_status = excluded.exit_status",
    "process_delete": "DELETE FROM jobrunner_processes WHERE name = ?",
    "program_delete": "DELETE FROM jobrunner_processes WHERE program = ?",
    "status_processes": "SELECT name, program, host, supervisor_pid, state, pid, state_since, started_at, updated_at, "
                        "description, exit_status FROM jobrunner_processes ORDER BY name",
    "status_workers": "SELECT name, host, pid, ppid, started_at, beat_at, handled, failed, rss_bytes, queues "
                      "FROM jobrunner_workers ORDER BY name",
}

# SQLite has no index of claimed rows of their own (see _MESSAGE_INDEXES): it finds them queue by queue, one seek
# per distinct queue name, the names found by seeks too.  The index covers what these statements read, so the
# planner keeps to it even once ANALYZE has seen that most rows of a queue are unclaimed.
_EACH_QUEUE = ("WITH RECURSIVE queues(name) AS (SELECT MIN(queue_name) FROM {messages} UNION ALL "
               "SELECT (SELECT MIN(queue_name) FROM {messages} WHERE queue_name > queues.name) FROM queues "
               "WHERE queues.name IS NOT NULL) ")


def _each_queue(statement):
    head, _, where = statement.partition(" WHERE ")
    if head.startswith("UPDATE"):  # the rows chosen on the index alone, then updated by id
        # (the WITH inside: Python's sqlite3 gives no rowcount for a statement that starts with one)
        return "%s WHERE id IN (%sSELECT id FROM {messages} WHERE queue_name IN (SELECT name FROM queues) AND %s)" % (
            head, _EACH_QUEUE, where)
    return _EACH_QUEUE + head + " WHERE queue_name IN (SELECT name FROM queues) AND " + where


_SQLITE_SQL = {name: _each_queue(_SQL[name])
               for name in ("release_worker", "release_own", "any_unowned", "release_unowned", "stats_claimed")}

_STOP_KEY = "stop_workers_at"
_COUNTS_KEPT_S = 25 * 3600  # per-minute counters kept for the dashboard's last 24 h; older ones are folded
_PAUSED = "paused:"  # + a queue name: the control row of a paused queue
_CANCELLED_QUEUE = "cancelled"  # where a running message waits, once cancelled, for its worker to stop it


def _check_own_queue(queue, what):
    """A queue an app may route to: a valid name, and not one of jobrunner's own."""
    _check_queue_name(queue)
    if queue in (FAILED_QUEUE, _CANCELLED_QUEUE):
        raise ConfigurationError("queue %r is jobrunner's own (%s); give %s another" % (
            queue, "failed messages" if queue == FAILED_QUEUE else "running messages being cancelled", what))
    return queue


@dataclasses.dataclass
class _Outcome:
    """What to do with a claimed message: ack, retry, fail or release; applied fenced."""

    kind: str
    delivery: _Delivery
    available_at: float = None
    headers: str = None

    def params(self):
        d = self.delivery
        fence = (d.id, d.worker_id, d.attempts)
        if self.kind in ("retry", "fail"):
            return (self.available_at, self.headers) + fence
        return fence


class Transport:
    """Where messages are stored, and the verbs every backend implements the same way.

    A *claim* marks a message as delivered to one worker; every later verb on
    that message (``ack``, ``retry``, ``fail``, ``release``) is fenced by the
    claim, so a worker whose claim was released (because it was thought dead)
    cannot settle a message that another worker now holds.  Subclasses supply
    connecting (:meth:`_open`), the schema check, transactions and waiting.
    """

    dialect = None
    #: statements of this backend's own, in place of the common ones of the same name
    own_sql = {}
    #: appended to the claim's sub-select; PostgreSQL skips rows other workers are claiming
    lock_clause = ""
    #: how a statement matches a list of ids given as one parameter
    in_ids = "IN (SELECT value FROM json_each(?))"
    begin_sql = "BEGIN"
    #: a transaction whose reads all see one snapshot
    begin_read_sql = "BEGIN"
    #: the errors of the driver, mapped by :meth:`_error`
    driver_errors = ()

    def __init__(self, settings):
        self.settings = settings
        self.table = settings.table
        self._local = threading.local()
        self._opened = []  # (pid, connection) of every thread, for close_all()
        self._schema_checked = None  # pid that saw our tables exist
        #: True when this transport created the database file (a worker should almost never have to)
        self.created = False
        names = {"messages": self.table, "lock": self.lock_clause, "in_ids": self.in_ids}
        self.sql = {name: self._placeholders(text.format(**names)) for name, text in dict(_SQL, **self.own_sql).items()}

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.where)

    @property
    def where(self):
        """The database, as messages and logs name it (no password)."""
        raise NotImplementedError

    @staticmethod
    def _placeholders(sql):
        return sql

    # Connections: one per thread, opened on first use, never carried across fork.

    def connection(self, create=True):
        """This thread's connection (autocommit; transactions are explicit).

        ``create`` makes the database and its tables if needed; without it a
        database lacking our tables is an error and nothing is written.
        """
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid != _own_pid:
            self._forget_inherited(conn)
            conn = None
        elif conn is not None and not self._usable(conn):
            self.reconnect()  # lost (a server restart, a network blip): the next statement gets a new one
            conn = None
        if conn is None:
            conn = self._open(create)
            local.conn, local.pid, local.ready = conn, _own_pid, False
            self._opened.append((_own_pid, conn))
        if not local.ready and self._schema_checked != (_own_pid, True) and (
                create or self._schema_checked is None or self._schema_checked[0] != _own_pid):
            try:
                if create:
                    self._ensure_schema(conn)
                else:
                    state = self._schema_state(conn)
                    if state == "none":
                        raise StorageError("%s has no jobrunner tables: run `jobrunner setup` (or dispatch a message) "
                                           "first" % self.where)
                    if state == "older" or self._missing_columns(conn):
                        raise StorageError("%s was set up by another jobrunner version: run `jobrunner setup` (or "
                                           "start a worker) to bring its tables up to date" % self.where)
            except self.driver_errors as exc:
                self.reconnect()
                raise self._error(exc) from None
            except BaseException:
                self.reconnect()
                raise
            self._schema_checked = (_own_pid, create)
            local.ready = create
        return conn

    def _forget_inherited(self, conn):
        """A connection inherited across fork must not be used (nor, for SQLite, closed)."""

    def _usable(self, conn):
        return True

    def reconnect(self):
        """Drop this thread's connection: after a failure the next use starts clean."""
        local = self._local
        conn = getattr(local, "conn", None)
        local.conn = None
        if conn is not None and local.pid == _own_pid:
            with contextlib.suppress(Exception):
                conn.close()
            with contextlib.suppress(ValueError):  # the web server opens one a request: forget each one closed
                self._opened.remove((_own_pid, conn))

    close = reconnect

    def close_all(self):
        """Close every connection this process opened, from any thread (when the app shuts down)."""
        self.reconnect()
        opened, self._opened = self._opened, []
        for pid, conn in opened:
            if pid == _own_pid:
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                self._forget_inherited(conn)

    def _ensure_schema(self, conn):
        with self.transaction(conn):
            self._create_schema(conn)

    def _create_schema(self, conn):
        """Create our tables, or add our columns to tables that exist (Symfony's, an older jobrunner's), then indexes."""
        types = dict(_SQL_TYPES[self.dialect], messages=self.table)
        schema = _SCHEMA.format(message_indexes=_MESSAGE_INDEXES[self.dialect].format(**types) + ";", **types)
        text = "\n".join(line for line in schema.splitlines() if not line.startswith("--"))
        statements = [s.strip() for s in text.split(";") if s.strip()]
        for statement in statements:
            if not statement.startswith(("CREATE INDEX", "CREATE UNIQUE INDEX")):
                conn.execute(statement)
        for table, columns in _ADDED_COLUMNS.items():
            table = table.format(**types)
            present = self._columns(conn, table)
            for column, ddl in columns:
                if column not in present:
                    conn.execute("ALTER TABLE %s ADD COLUMN %s %s" % (table, column, ddl.format(**types)))
        for statement in statements:
            if statement.startswith(("CREATE INDEX", "CREATE UNIQUE INDEX")):
                conn.execute(statement)
        for index in _OLD_INDEXES[self.dialect]:
            conn.execute("DROP INDEX IF EXISTS %s" % index.format(**types))

    def _has_schema(self, conn):
        return self._schema_state(conn) == "complete"

    def _schema_state(self, conn):
        """``complete``, ``older`` (some of our tables: another jobrunner version made them) or ``none``."""
        names = self._table_names(conn)
        ours = [t.format(messages=self.table) for t in _OUR_TABLES]
        if all(t in names for t in ours):
            return "complete"
        return "older" if ours[0] in names and "jobrunner_workers" in names else "none"

    def _table_names(self, conn):
        raise NotImplementedError

    def _missing_columns(self, conn):
        for table, columns in _ADDED_COLUMNS.items():
            present = self._columns(conn, table.format(messages=self.table))
            if any(column not in present for column, _ in columns):
                return True
        return False

    def _columns(self, conn, table):
        raise NotImplementedError

    def _error(self, exc):
        """A driver error as a one-line StorageError that names the database."""
        return StorageError("database %s: %s" % (self.where, exc))

    @contextlib.contextmanager
    def transaction(self, conn=None, user_code=False):
        """A write transaction, rolled back on any exception.

        Driver errors become StorageError, except those of ``user_code``.
        """
        conn = conn or self.connection()
        try:
            conn.execute(self.begin_sql)
        except self.driver_errors as exc:
            self.reconnect()
            raise self._error(exc) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, self.driver_errors) and not user_code:
                raise self._error(exc) from exc
            raise

    def _rollback(self, conn):
        """Roll back if a transaction is open; a connection that cannot is dropped."""
        try:
            if self._in_transaction(conn):
                conn.execute("ROLLBACK")
        except self.driver_errors:
            self.reconnect()

    def _in_transaction(self, conn):
        raise NotImplementedError

    def _rows(self, name, params=(), conn=None, create=False):
        """All rows of a named read, driver errors mapped."""
        try:
            return (conn or self.connection(create=create)).execute(self.sql[name], params).fetchall()
        except self.driver_errors as exc:
            raise self._error(exc) from None

    def setup(self):
        """Create the database and its tables (idempotent); return where it is."""
        self.connection()
        return self.where

    # Messages

    def send(self, messages, conn=None):
        """Store ``(queue, body, headers, available_at, priority, unique_key)`` tuples; return their ids.

        With ``conn`` inside an open transaction the rows join it; otherwise
        they commit before this returns.  A message whose unique key is held
        by a queued, delayed or running one is not stored: its id is that one's.
        """
        now = time.time()
        rows = [(body, headers, queue, now, now if available_at is None else available_at, priority, key)
                for queue, body, headers, available_at, priority, key in messages]
        if conn is None:
            conn = self.connection()
        try:
            if len(rows) == 1:
                return [self._insert_unique(conn, rows[0]) if rows[0][6] is not None else self._insert_one(conn, rows[0])]
            if self._in_transaction(conn):
                return self._insert_rows(conn, rows)
            with self.transaction(conn):
                return self._insert_rows(conn, rows)
        except self.driver_errors as exc:
            raise self._error(exc) from None

    def _insert_rows(self, conn, rows):
        if any(row[6] is not None for row in rows):
            return [self._insert_unique(conn, row) if row[6] is not None else self._insert_one(conn, row) for row in rows]
        return self._insert_many(conn, rows)

    def _insert_unique(self, conn, row):
        """Insert unless the key is held; the check and the insert are one statement (the unique index decides)."""
        for _ in range(100):
            inserted = self._try_insert_unique(conn, row)
            if inserted is not None:
                return inserted
            holder = conn.execute(self.sql["unique_holder"], (row[6],)).fetchall()
            if holder:
                return holder[0][0]
            # the holder was handled between the two statements: the key is free again, try anew
        raise StorageError("unique key %r: could not insert nor find its holder" % (row[6],))

    def _try_insert_unique(self, conn, row):
        """The new message's id, or None when the key is held."""
        rows = conn.execute(self.sql["insert_unique"] + " RETURNING id", row).fetchall()
        return rows[0][0] if rows else None

    def _insert_one(self, conn, row):
        return conn.execute(self.sql["insert"] + " RETURNING id", row).fetchall()[0][0]

    def _insert_many(self, conn, rows):
        return [self._insert_one(conn, row) for row in rows]

    def claim(self, queues, worker_id, settle=None):
        """Settle ``settle`` (the previous message's outcome), then claim the next message.

        Both happen in one transaction, so a busy worker writes once per
        message.  Returns ``(delivery, settled, token, due)``: ``settled`` is
        False when the previous claim had been lost and its outcome refused;
        with no delivery, ``token`` is what :meth:`waiter` waits on and
        ``due`` when the next delayed message becomes available.
        """
        return self._claim_on_connection(self._claim, queues, worker_id, settle)

    def _claim_on_connection(self, claim, *args):
        """Run ``claim`` on this thread's connection; a row that is not UTF-8 is claimed again as bytes."""
        conn = self.connection()
        try:
            return claim(conn, *args)
        except StorageError as exc:
            if not self._is_decode_error(exc.__cause__):
                raise
            with self._tolerant_text(conn):  # claimed as bytes, it will fail as poison
                return claim(conn, *args)

    def _claim(self, conn, queues, worker_id, settle):
        settled = True
        token = due = row = None
        sql = self.sql
        try:
            conn.execute(self.begin_sql)
            try:
                if settle is not None:
                    settled = conn.execute(sql[settle.kind], settle.params()).rowcount == 1
                now = time.time()
                for queue in queues:
                    rows = conn.execute(sql["claim"], (now, worker_id, queue, now, _PAUSED + queue)).fetchall()
                    if rows:
                        row = rows[0]
                        break
                else:
                    token = self._wait_token(conn)  # read under the lock: any later commit changes it
                    due = self._next_due(conn, queues)
                conn.execute("COMMIT")
            except BaseException:
                self._rollback(conn)
                raise
        except self.driver_errors as exc:
            raise self._error(exc) from exc
        if row is None:
            return None, settled, token, due
        return _Delivery(*row, worker_id), settled, None, None

    def _wait_token(self, conn):
        return None

    def claim_batch(self, queues, worker_id, settles, wanted):
        """:meth:`claim` for several messages at once (a worker's threads, or ``--prefetch``), in one transaction.

        Settles each outcome of ``settles`` (None: nothing to settle), then
        claims up to ``wanted`` messages, in the order as many claims one
        after another would take them.  Returns ``(deliveries, settled,
        token, due)``: what was claimed, and for each entry of ``settles``
        whether it was applied; ``token`` and ``due`` as :meth:`claim` gives
        them when fewer than ``wanted`` were found.
        """
        return self._claim_on_connection(self._claim_batch, queues, worker_id, settles, wanted)

    def _claim_batch(self, conn, queues, worker_id, settles, wanted):
        sql = self.sql
        token = due = None
        rows = []
        with self.transaction(conn):
            settled = [conn.execute(sql[s.kind], s.params()).rowcount == 1 if s is not None else True
                       for s in settles]
            now = time.time()
            for queue in queues:  # as many claims one after another would take, in the same order
                while len(rows) < wanted:
                    found = conn.execute(sql["claim"], (now, worker_id, queue, now, _PAUSED + queue)).fetchall()
                    if not found:
                        break
                    rows.append(found[0])
            if len(rows) < wanted:
                token = self._wait_token(conn)
                due = self._next_due(conn, queues)
        return [_Delivery(*row, worker_id) for row in rows], settled, token, due

    def claim_failed(self, message_id, worker_id, settle=None):
        """Settle ``settle``, then claim failed message ``message_id`` (None: retried or removed meanwhile)."""
        settled = True
        try:
            with self.transaction() as conn:
                if settle is not None:
                    settled = conn.execute(self.sql[settle.kind], settle.params()).rowcount == 1
                if message_id is None:
                    return None, settled
                rows = conn.execute(self.sql["claim_failed"], (time.time(), worker_id, message_id)).fetchall()
        except self.driver_errors as exc:
            raise self._error(exc) from None
        return (_Delivery(*rows[0], worker_id) if rows else None), settled

    def next_due(self, queues):
        """When the earliest unclaimed message of these queues becomes available (None if none)."""
        try:
            return self._next_due(self.connection(), queues)
        except self.driver_errors as exc:
            raise self._error(exc) from None

    def _next_due(self, conn, queues):
        """When the earliest unclaimed message of these queues (those not paused) becomes available."""
        due = None
        for queue in queues:
            value = conn.execute(self.sql["next_due"], (queue, queue, queue, _PAUSED + queue)).fetchall()[0][0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (due is None or value < due):
                due = value
        return due

    def settle(self, outcome, conn=None):
        """Apply one outcome; False when the claim had been lost (the outcome is refused)."""
        try:
            if conn is not None:
                return conn.execute(self.sql[outcome.kind], outcome.params()).rowcount == 1
            with self.transaction() as conn:
                return conn.execute(self.sql[outcome.kind], outcome.params()).rowcount == 1
        except self.driver_errors as exc:
            raise self._error(exc) from None

    # Transactional handlers: their writes, their dispatches and the ack commit together.

    def begin_handler(self):
        """A connection inside a new write transaction for a transactional handler.

        StorageError (DatabaseLocked when another connection held the write
        lock too long; a lost connection, reopened for the next statement):
        the message goes back to the queue without spending an attempt.
        """
        conn = self.connection()
        try:
            conn.execute(self.begin_sql)
        except self.driver_errors as exc:
            self.reconnect()
            raise self._error(exc) from None
        self._guard_transaction(conn, True)
        return conn

    def finish_handler(self, conn, delivery, ok):
        """Ack and commit (``ok``), or roll back; True when acknowledged, False when the claim was lost.

        Any failure rolls back and drops the connection, so the next message
        starts on a clean one; errors of the commit itself propagate as they are.
        """
        try:
            self._guard_transaction(conn, False)
            if ok:
                if not self._in_transaction(conn):  # ended by the handler; raises if it closed the connection
                    raise _ended_its_transaction()
                if conn.execute(self.sql["ack"], _Outcome("ack", delivery).params()).rowcount == 1:
                    conn.execute("COMMIT")
                    return True
        except BaseException:
            self._rollback(conn)
            self.reconnect()
            raise
        self._rollback(conn)
        if not ok:
            self.reconnect()
        return False

    def _guard_transaction(self, conn, on):
        """Keep a handler from ending the transaction that also acks its message."""

    # Waiting for work

    def waiter(self):
        """What an idle worker sleeps on until a commit, a wake-up or a timeout."""
        raise NotImplementedError

    # Workers, heartbeats and the supervisor's processes

    def register_worker(self, name, host, queues, started_at):
        """Record a running worker; return its id (the claims it makes carry it)."""
        with self.transaction() as conn:
            return conn.execute(self.sql["worker_insert"], (name, host, os.getpid(), os.getppid(), ",".join(queues),
                                                            started_at, started_at)).fetchall()[0][0]

    def beat(self, worker_id, handled, failed, rss, message_id):
        """Record a heartbeat; return ``(alive, stop_requested_at)``.

        ``alive`` is False when the worker's row is gone: it was declared dead
        and its claim released, so its acknowledgement would be refused.
        """
        # Two statements, each its own transaction: a process frozen between them holds no lock.
        conn = self.connection()
        try:
            alive = conn.execute(self.sql["worker_beat"], (time.time(), handled, failed, rss, message_id,
                                                           worker_id)).rowcount == 1
            stop = conn.execute(self.sql["control_get"], (_STOP_KEY,)).fetchall()
        except self.driver_errors as exc:
            raise self._error(exc) from None
        return alive, stop[0][0] if stop else None

    def unregister_worker(self, worker_id, keep_row=False):
        """A worker leaves: what it still holds goes back on the queue.

        ``keep_row`` leaves its row for its supervisor to remove when it reaps
        the process, so that `status` never shows a RUNNING process with no worker.
        """
        with self.transaction() as conn:
            self._release_claims(conn, [worker_id])
            if not keep_row:
                conn.execute(self.sql["worker_delete"], (worker_id,))

    def workers(self):
        """``(id, host, pid, ppid, beats)`` of every registered worker."""
        return self._rows("workers", create=True)

    def release_workers(self, seen):
        """Release the claims of dead workers and forget them; return how many messages went back.

        ``seen`` maps worker ids to the beat count that showed them silent; a
        worker that beat since (the count moved) is spared.  Claims of a
        worker no longer registered are released too, and claims of no
        worker (written by another tool) once older than ``redeliver_timeout``.
        """
        now = time.time()
        with self.transaction() as conn:
            beats = {row[0]: row[4] for row in conn.execute(self.sql["workers"]).fetchall()}
            dead = [wid for wid, count in seen.items() if wid in beats and (count is None or beats[wid] == count)]
            released = self._release_claims(conn, dead)
            forgotten = [wid for wid in dead if conn.execute(self.sql["worker_delete_dead"], (wid,)).rowcount]
            released += conn.execute(self.sql["release_unowned"], (now, now - self.settings.redeliver_timeout)).rowcount
        return forgotten, released

    def release_own(self, worker_id, keep=()):
        """Give back every claim of this worker but ``keep`` (messages whose outcome it still has to settle).

        After a lost connection a worker cannot know whether its last claim
        committed; what it holds and does not know about goes back, its
        attempt given back too.  Returns how many.
        """
        try:
            return self.connection().execute(self.sql["release_own"], (worker_id, self._ids_param(list(keep)))).rowcount
        except self.driver_errors as exc:
            raise self._error(exc) from None

    def has_unowned_claims(self):
        """Whether some claim's worker is no longer registered, or another tool's is older than ``redeliver_timeout``."""
        return bool(self._rows("any_unowned", (time.time() - self.settings.redeliver_timeout,), create=True))

    def _release_claims(self, conn, worker_ids):
        now = time.time()
        released = sum(conn.execute(self.sql["release_worker"], (now, wid)).rowcount for wid in worker_ids)
        if released:  # a cancelled message whose worker died is not run again
            released -= conn.execute(self.sql["purge_cancelled"]).rowcount
        return released

    # Control: pause, resume, cancel

    def pause(self, queues):
        """Stop workers taking messages from these queues; dispatches still store them.  Survives restarts."""
        now = time.time()
        with self.transaction(self.connection()) as conn:
            for queue in queues:
                conn.execute(self.sql["control_add"], (_PAUSED + queue, now))

    def resume(self, queues):
        with self.transaction(self.connection()) as conn:
            for queue in queues:
                conn.execute(self.sql["control_delete"], (_PAUSED + queue,))
            self._notify(conn, queues)

    def _notify(self, conn, queues):
        """Wake the idle workers of these queues (where waking needs more than a commit)."""

    def paused(self):
        """``{queue: paused_since}`` of every paused queue."""
        return {key[len(_PAUSED):]: since for key, since in self._rows("paused")}

    def cancel(self, message_id):
        """``"waiting"`` (removed) or ``"running"`` (its worker interrupts it); UnknownMessage otherwise."""
        if not 0 < message_id < 2 ** 63:  # no row has it, and SQLite cannot even compare it
            raise UnknownMessage("no message %d: unknown, or handled already" % message_id)
        with self.transaction(self.connection(create=False)) as conn:
            if conn.execute(self.sql["cancel_waiting"], (message_id,)).rowcount:
                return "waiting"
            if conn.execute(self.sql["cancel_running"], (message_id,)).rowcount:
                return "running"
            where = conn.execute(self.sql["queue_of"], (message_id,)).fetchall()
        if where and where[0][0] == FAILED_QUEUE:
            raise UnknownMessage("message %d is in the failure queue: `jobrunner failed remove %d` deletes it"
                                 % (message_id, message_id))
        if where:
            raise UnknownMessage("message %d is being cancelled already" % message_id)
        raise UnknownMessage("no message %d: unknown, or handled already" % message_id)

    def is_cancelled(self, message_id):
        """Whether this claimed message was cancelled while it ran."""
        rows = self._rows("queue_of", (message_id,), create=True)
        return bool(rows) and rows[0][0] == _CANCELLED_QUEUE

    def cancelled_among(self, message_ids):
        """Which of these claimed messages were cancelled (a prefetching worker's, before they start)."""
        if not message_ids:
            return set()
        return {row[0] for row in self._rows("cancelled_in", (self._ids_param(message_ids),), create=True)}

    # Schedules: each periodic message once per tick, whatever the number of schedulers

    def enqueue_tick(self, name, tick, message):
        """Store ``message`` for schedule ``name``'s ``tick`` unless that tick (or a later one) was enqueued.

        The first time a schedule is seen, its latest tick is recorded and
        nothing is enqueued.  Returns the message id, or None.
        """
        with self.transaction() as conn:
            if not conn.execute(self.sql["schedule_last"], (name,)).fetchall():
                conn.execute(self.sql["schedule_start"], (name, tick))
                return None
            if conn.execute(self.sql["schedule_advance"], (tick, name, tick)).rowcount != 1:
                return None
            return self.send([message], conn)[0]

    # Counters: handled, retried and failed per minute

    def add_counts(self, counts):
        """Add ``{(minute, queue, handler): [handled, retried, failed]}`` to the per-minute counters."""
        with self.transaction() as conn:
            for (minute, queue, handler), (handled, retried, failed) in counts.items():
                conn.execute(self.sql["count_add"], (minute, queue, handler, handled, retried, failed))

    def fold_counts(self, keep=_COUNTS_KEPT_S):
        """Fold the minutes older than ``keep`` seconds into the all-time rows (minute 0)."""
        before = math.floor((time.time() - keep) / 60) * 60
        with self.transaction() as conn:
            conn.execute(self.sql["count_fold"], (before,))
            conn.execute(self.sql["count_prune"], (before,))

    def count_totals(self):
        """``(queue, handler, handled, retried, failed)`` since the database began."""
        return [(q, h, int(a), int(b), int(c)) for q, h, a, b, c in self._rows("count_totals")]

    def count_series(self, since):
        """``(minute, handled, failed)`` of every minute since ``since`` that saw messages."""
        return [(m, int(a), int(b)) for m, a, b in self._rows("count_series", (since,))]

    def last_tick(self, name):
        rows = self._rows("schedule_last", (name,), create=True)
        return rows[0][0] if rows else None

    def request_stop(self):
        """Ask every worker started before now to stop after its current message; return how many run."""
        now = time.time()
        with self.transaction(self.connection(create=False)) as conn:
            conn.execute(self.sql["control_set"], (_STOP_KEY, now))
            return conn.execute(self.sql["workers_started_before"], (now,)).fetchall()[0][0]

    def sync_processes(self, host, rows, clear_programs=(), remove=(), reaped=()):
        """The supervisor's view: upsert its process rows, drop old ones; return its children's beats.

        ``rows`` are ``(name, program, state, pid, state_since, started_at,
        description, exit_status)``.  The claims of ``reaped`` children go
        back on the queue in the same transaction, so `status` never sees a
        process still RUNNING whose worker is gone.  Returns ``(released,
        {worker_id: (pid, beats)})`` for the workers this process forked.
        """
        now = time.time()
        me = os.getpid()
        with self.transaction() as conn:
            released = self._release_children(conn, host, reaped) if reaped else 0
            for program in clear_programs:
                conn.execute(self.sql["program_delete"], (program,))
            for name in remove:
                conn.execute(self.sql["process_delete"], (name,))
            for name, program, state, pid, since, started, description, exit_status in rows:
                conn.execute(self.sql["process_upsert"], (name, program, host, me, state, pid, since, started, now,
                                                          description, exit_status))
            children = conn.execute(self.sql["worker_children"], (host, me)).fetchall()
        return released, {wid: (pid, beats) for wid, pid, beats in children}

    def _release_children(self, conn, host, pids):
        ids = [wid for wid, pid, _ in conn.execute(self.sql["worker_children"], (host, os.getpid())).fetchall()
               if pid in pids]
        released = self._release_claims(conn, ids)
        for wid in ids:
            conn.execute(self.sql["worker_delete"], (wid,))
        return released

    def status_rows(self):
        """``(processes, workers)`` rows, as ``status`` reads them: one snapshot, so they agree."""
        conn = self.connection(create=False)
        try:
            conn.execute(self.begin_read_sql)
            try:
                return self._rows("status_processes", conn=conn), self._rows("status_workers", conn=conn)
            finally:
                self._rollback(conn)
        except self.driver_errors as exc:
            raise self._error(exc) from None

    def maintain(self):
        """Periodic housekeeping, run by one process per database (the supervisor, or one worker)."""
        if time.monotonic() >= getattr(self, "_next_fold", 0.0):
            self._next_fold = time.monotonic() + 600
            self.fold_counts()

    def program_lock(self, program):
        """The lock that lets one supervisor at a time run ``program`` on this database."""
        raise NotImplementedError

    # Reading

    def stats(self):
        """``{"queues": [{queue, ready, delayed, in_flight, oldest_ready_age_s}], "failed": n}``."""
        conn = self.connection(create=False)
        now = time.time()
        waiting = self._rows("stats_waiting", (now, now), conn=conn)
        claimed = dict(self._rows("stats_claimed", conn=conn))
        paused = {key[len(_PAUSED):] for key, _ in self._rows("paused", conn=conn)}
        claimed.pop(_CANCELLED_QUEUE, None)
        failed = int(claimed.pop(FAILED_QUEUE, 0))  # replayed by `consume failed` right now: still failed messages
        queues = {}
        for (consumed,) in self._rows("consumed_queues", conn=conn):  # listed even when empty
            for queue in str(consumed).split(","):
                if queue and queue != FAILED_QUEUE:
                    queues[queue] = {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None}
        for queue in paused:
            queues[queue] = {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None}
        for queue, ready, delayed, oldest in waiting:
            ready, delayed = int(ready or 0), int(delayed or 0)
            if queue == FAILED_QUEUE:
                failed += ready + delayed
                continue
            if queue == _CANCELLED_QUEUE:
                continue
            age = round(max(0.0, now - oldest), 3) if ready and isinstance(oldest, (int, float)) else None
            queues[queue] = {"queue": queue, "ready": ready, "delayed": delayed, "in_flight": 0, "oldest_ready_age_s": age}
        for queue, count in claimed.items():
            entry = queues.setdefault(queue, {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0,
                                              "oldest_ready_age_s": None})
            entry["in_flight"] = int(count)
        for queue, entry in queues.items():
            entry["paused"] = queue in paused
        return {"queues": [queues[q] for q in sorted(queues)], "failed": failed}

    def get(self, message_id):
        """One message by id, any queue, or None."""
        rows = self._read_envelopes("get", (message_id,))
        return rows[0] if rows else None

    def failed(self, ids=None, limit=None):
        """Failed messages, newest first: all of them, or those with these ids."""
        if ids is None:
            envelopes = self._read_envelopes("failed", (), limit)
        else:
            envelopes = self._read_envelopes("failed_in", (self._ids_param(ids),), limit)
        return envelopes

    def _read_envelopes(self, name, params, limit=None):
        conn = self.connection(create=False)
        try:
            with self._tolerant_text(conn):
                cursor = conn.execute(self.sql[name], params)
                rows = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        except self.driver_errors as exc:
            raise self._error(exc) from None
        return [_envelope_from_row(row) for row in rows]

    def failed_count(self):
        return self._rows("failed_count")[0][0]

    def failed_ids(self):
        return [row[0] for row in self._rows("failed_ids")]

    def check_failed_ids(self, ids, conn=None):
        """Sorted unique ids; UnknownMessage naming those not in the failure queue."""
        ids = sorted(set(int(i) for i in ids))
        found = {row[0] for row in self._rows("failed_found", (self._ids_param(ids),), conn=conn)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownMessage("no failed message with id %s" % ", ".join(map(str, missing)))
        return ids

    def requeue_failed(self, ids, conn, queue_of=None):
        """Move these failed messages back to their original queues with a fresh attempt count.

        Returns ``(moved, left)``: ``left`` maps the ids that stay failed to why
        (no original queue in their headers, and no handler to route them).
        """
        now = time.time()
        moved, left = 0, {}
        with self._tolerant_text(conn):
            rows = conn.execute(self.sql["failed_in"], (self._ids_param(ids),)).fetchall()
        for envelope in map(_envelope_from_row, rows):
            headers = {k: v for k, v in envelope.headers.items()
                       if k not in _FAILURE_HEADERS and k not in ("attempts", "free_retries", "last_error")}
            headers["redelivered_from_failed"] = _int_header(headers, "redelivered_from_failed") + 1
            queue = envelope.headers.get("original_queue")
            if not isinstance(queue, str) or not _QUEUE_NAME.match(queue) or queue in (FAILED_QUEUE, _CANCELLED_QUEUE):
                queue = queue_of(envelope.handler) if queue_of and envelope.handler else None
            if queue is None:
                left[envelope.id] = "its original queue is unknown and no registered handler %r routes it" % (
                    envelope.handler,)
                continue
            if conn.execute(self.sql["requeue"], (queue, _encode_headers(headers), now, envelope.id)).rowcount:
                moved += 1
            else:
                left[envelope.id] = "`consume failed` is replaying it right now"
        return moved, left

    def remove_failed(self, ids, conn):
        return conn.execute(self.sql["remove_failed"], (self._ids_param(ids),)).rowcount

    def _ids_param(self, ids):
        return json.dumps([int(i) for i in ids])

    def abandon_transaction(self):
        """Roll back a transaction that handler code left open on this thread's connection; True if there was one."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != _own_pid:
            return False
        try:
            if not self._in_transaction(conn):
                return False
        except Exception:
            pass
        self._rollback(conn)
        self.reconnect()
        return True

    def identity(self):
        """What changes when the database is deleted or replaced under us (None: nothing to watch)."""
        return None

    def save_unlinked(self):
        """Save what an open connection still sees of a deleted database; return where (None: nothing saved)."""
        return None

    # Hooks for drivers whose text can be something else than UTF-8

    def _tolerant_text(self, conn):
        return contextlib.nullcontext(conn)

    def _is_decode_error(self, exc):
        return False


def _makedirs_private(directory):
    """Like os.makedirs(directory, 0o700), but every directory it creates is 0700, not only the last."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent and parent != directory:
        _makedirs_private(parent)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None


def _warn_if_shared_directory(directory, what):
    """An existing directory others can write to lets them swap our files: say so."""
    with contextlib.suppress(OSError):
        mode = os.stat(directory).st_mode
        if mode & 0o022 and not mode & 0o1000:  # group/world-writable and not sticky
            _log.warning("%s directory %s is writable by group or others (mode %o): they could replace its files",
                         what, directory, mode & 0o777)


def _create_private_file(path):
    """Create the database file 0600 (SQLite gives its -wal and -shm files the same mode)."""
    directory = os.path.dirname(path) or "."
    try:
        existed = os.path.isdir(directory)
        _makedirs_private(directory)
        if existed:
            _warn_if_shared_directory(directory, "database")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError("cannot create database %s: %s" % (path, exc.strerror or exc)) from None


_FAILURE_HEADERS = ("original_queue", "error_class", "error_message", "traceback", "failed_at", "reason", "first_failed_at",
                    "previous_errors")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# SQLite

# Connections inherited across fork.  SQLite forbids using them in the child and
# closing one could checkpoint and delete the parent's WAL, so they are kept
# referenced here and never touched again.
_INHERITED_CONNECTIONS = []
_SQLITE_MIN_VERSION = (3, 35, 0)  # UPDATE ... RETURNING
_SQLITE_TRANSACTION = 22  # authorizer action code of BEGIN, COMMIT and ROLLBACK


def _sqlite_error(exc, path):
    """Turn a sqlite3 error into a one-line StorageError that names the database."""
    text = str(exc)
    lower = text.lower()
    if "locked" in lower or "busy" in lower:
        return DatabaseLocked("database %s is locked: another connection held its write lock past the busy timeout" % path)
    if "not a database" in lower:
        return StorageError("%s is not a SQLite database" % path)
    if "readonly" in lower or "read-only" in lower:
        return StorageError("database %s is read-only: check the file's and its directory's permissions" % path)
    if "unable to open" in lower:
        return StorageError("cannot open database %s: check that its directory exists and is writable" % path)
    if "malformed" in lower or "corrupt" in lower:
        return StorageError("database %s is corrupted (%s)" % (path, text))
    if "disk i/o" in lower or "full" in lower:
        return StorageError("cannot write database %s: %s" % (path, text))
    return StorageError("database %s: %s" % (path, text))


def _deny_transaction_control(action, *args):
    return sqlite3.SQLITE_DENY if action == _SQLITE_TRANSACTION else sqlite3.SQLITE_OK


def _allow_all(*args):
    return sqlite3.SQLITE_OK


class SqliteTransport(Transport):
    """Messages in Symfony's ``messenger_messages`` table, in one SQLite file in WAL mode.

    ``BEGIN IMMEDIATE`` takes the write lock up front: a deferred transaction
    that upgrades to a write fails with SQLITE_BUSY under WAL whatever the timeout.
    """

    dialect = "sqlite"
    own_sql = _SQLITE_SQL
    begin_sql = "BEGIN IMMEDIATE"
    driver_errors = (sqlite3.Error,)

    def __init__(self, settings):
        if sqlite3.sqlite_version_info < _SQLITE_MIN_VERSION:
            raise StorageError("jobrunner needs SQLite %s or newer; this Python has SQLite %s"
                               % (".".join(map(str, _SQLITE_MIN_VERSION)), sqlite3.sqlite_version))
        super().__init__(settings)
        self.path = settings.path

    @property
    def where(self):
        return self.path

    def _forget_inherited(self, conn):
        _INHERITED_CONNECTIONS.append(conn)

    def _open(self, create):
        path = self.path
        if not os.path.exists(path):
            if not create:
                raise StorageError("no database at %s (run `jobrunner setup` or dispatch a message first)" % path)
            self.created = _create_private_file(path) or self.created
        try:
            conn = sqlite3.connect(path, timeout=self.settings.busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _sqlite_error(exc, path) from None
        try:
            if _log.isEnabledFor(_SQL_TRACE):
                conn.set_trace_callback(functools.partial(_log.log, _SQL_TRACE, "sql: %s"))
            # validated values, not user text: PRAGMA takes no parameters; both are settings of this connection only
            conn.execute("PRAGMA synchronous = %s" % self.settings.synchronous)
            conn.execute("PRAGMA journal_size_limit = %d" % int(self.settings.journal_size_limit))
        except sqlite3.Error as exc:
            conn.close()
            raise _sqlite_error(exc, path) from None
        return conn

    def _error(self, exc):
        return _sqlite_error(exc, self.path)

    def _table_names(self, conn):
        # Our tables, from sqlite_master: the app's PRAGMA user_version is the app's, never ours.
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}

    def _columns(self, conn, table):
        return {row[1] for row in conn.execute("PRAGMA table_info(%s)" % table).fetchall()}

    def _ensure_schema(self, conn):
        """Switch to WAL and create what is missing.

        Two processes opening a new file at once can get SQLITE_BUSY at once,
        without the busy handler (SQLite refuses to wait where waiting could
        deadlock while the file is still in rollback mode): retry a while.
        """
        deadline = time.monotonic() + self.settings.busy_timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchall()[0][0].lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
                    if mode.lower() != "wal":
                        _log.warning("database %s could not switch to WAL mode (journal_mode=%s); workers will contend "
                                     "more", self.path, mode)
                if self._has_schema(conn) and not self._missing_columns(conn) and self._indexes_current(conn):
                    return
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._create_schema(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return
            except sqlite3.OperationalError as exc:
                if not ("locked" in str(exc) or "busy" in str(exc)) or time.monotonic() > deadline:
                    raise
                import random

                time.sleep(random.uniform(0.005, 0.02))

    def _indexes_current(self, conn):
        """Whether the messages table has this version's indexes, not an older jobrunner's (they are replaced)."""
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
        return (self.table + "_queue" in names
                and not any(old.format(messages=self.table) in names for old in _OLD_INDEXES[self.dialect]))

    def _in_transaction(self, conn):
        return conn.in_transaction

    def _insert_one(self, conn, row):
        return conn.execute(self.sql["insert"], row).lastrowid

    def _try_insert_unique(self, conn, row):
        cursor = conn.execute(self.sql["insert_unique"], row)
        return cursor.lastrowid if cursor.rowcount == 1 else None

    def _insert_many(self, conn, rows):
        # Inside the write lock AUTOINCREMENT hands out consecutive ids, so the
        # ids are known without a RETURNING round trip per row.
        sequence = "SELECT seq FROM sqlite_sequence WHERE name = '%s'" % self.table
        before = conn.execute(sequence).fetchall()
        first = (before[0][0] if before else 0) + 1
        conn.executemany(self.sql["insert"], rows)
        last = conn.execute(sequence).fetchall()[0][0]
        if last - first + 1 != len(rows):
            raise StorageError("unexpected message ids after a batch insert")
        return list(range(first, last + 1))

    def _wait_token(self, conn):
        return conn.execute("PRAGMA data_version").fetchall()[0][0]

    def data_version(self):
        """Changes whenever another connection commits; reading it costs no disk I/O."""
        return self.connection().execute("PRAGMA data_version").fetchall()[0][0]

    def _guard_transaction(self, conn, on):
        with contextlib.suppress(sqlite3.ProgrammingError):  # the handler closed it
            conn.set_authorizer(_deny_transaction_control if on else None if sys.version_info >= (3, 11) else _allow_all)

    def _tolerant_text(self, conn):
        return _tolerant_text(conn)

    def _is_decode_error(self, exc):
        return isinstance(exc, sqlite3.OperationalError) and "decode" in str(exc).lower()

    def waiter(self):
        return _CommitWaiter(self)

    def maintain(self):
        """Keep the WAL bounded without stalling writers.

        Readers that never pause starve automatic checkpoints.  A PASSIVE
        checkpoint never waits; a TRUNCATE is tried only when the passive one
        copied everything, with no busy wait, so it gives up at once rather
        than hold writers back while readers finish.
        """
        super().maintain()
        wal = self.path + "-wal"
        try:
            size = os.stat(wal).st_size
        except OSError:
            return
        if size <= max(self.settings.journal_size_limit, 4 * _MIB):
            return
        conn = self.connection()
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0]
        if not busy and frames == copied:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.execute("PRAGMA busy_timeout = %d" % int(self.settings.busy_timeout * 1000))

    def save_unlinked(self):
        """Back up what this thread's connection still sees of a deleted database; return the copy's path."""
        target = "%s.saved-%s" % (self.path, time.strftime("%Y%m%dT%H%M%S"))
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError:
            return None  # another worker is saving it this very second, or the directory is gone
        os.close(fd)
        try:
            source = getattr(self._local, "conn", None)
            if source is None:
                raise StorageError("no open connection to the old file")
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
            return target
        except (sqlite3.Error, JobRunnerError) as exc:
            _log.error("could not save the deleted database to %s: %s", target, exc)
            return None

    def identity(self):
        """What changes when the database file is deleted or replaced under us."""
        return _inode(self.path)

    def program_lock(self, program):
        """A file lock in ``<database>.locks/``, one directory for every program's lock."""
        directory = self.path + ".locks"
        try:
            _makedirs_private(directory)
        except OSError as exc:
            raise StorageError("cannot create lock directory %s: %s" % (directory, exc.strerror or exc)) from None
        _FileLock.clean_stale(directory)
        return _FileLock(os.path.join(directory, program + ".lock"))


class _FileLock:
    """An flock held by this process; its file is removed when released, so none piles up.

    Removing a lock file is safe only while holding it, and whoever then
    locks an old, removed file must notice and try the new one: hence the
    inode check after locking.
    """

    def __init__(self, path):
        self.name = path
        self._fd = None

    def acquire(self):
        """Take the lock without waiting; False when another process holds it."""
        import fcntl

        while True:
            try:
                fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise StorageError("cannot open lock %s: %s" % (self.name, exc.strerror or exc)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if _inode(self.name) == _fd_inode(fd):
                os.ftruncate(fd, 0)
                os.write(fd, b"%d\n" % os.getpid())
                self._fd = fd
                return True
            os.close(fd)  # its last holder removed it: lock the file that is there now

    def release(self):
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name)
            os.close(self._fd)
            self._fd = None

    @classmethod
    def clean_stale(cls, directory):
        """Remove the lock files a supervisor that was killed left behind."""
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.endswith(".lock"):
                    lock = cls(os.path.join(directory, name))
                    if lock.acquire():
                        lock.release()


def _fd_inode(fd):
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class _CommitWaiter:
    """Sleeps until another connection commits, the worker is woken, or a timeout.

    On Linux it waits on inotify for writes to the ``-wal`` file (every
    commit appends frames to it), so an idle worker costs no CPU and wakes
    within a millisecond; elsewhere it polls ``PRAGMA data_version`` every
    2 ms.  ``wake()`` is safe from signal handlers and other threads.
    """

    poll_interval = 0.002

    def __init__(self, transport):
        self.transport = transport
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._inotify = None
        self._watching = None

    def wake(self):
        with contextlib.suppress(OSError, TypeError):
            os.write(self._write_fd, b"!")

    def close(self):
        for fd in (self._read_fd, self._write_fd, self._inotify):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = self._inotify = None

    def sleep(self, timeout):
        """Sleep up to ``timeout`` seconds unless woken."""
        if select.select([self._read_fd], [], [], max(0.0, timeout))[0]:
            _drain_fd(self._read_fd)

    def wait(self, version, timeout, stopped, queues):
        """Return once a message of ``queues`` may be ready, ``stopped()`` is true, or ``timeout`` passes.

        Every commit (heartbeats included) changes data_version; a cheap read
        of the queues' earliest message decides whether to go back to sleep,
        so an idle worker does not take the write lock for nothing.
        """
        deadline = time.monotonic() + timeout
        inotify = self._watch_wal()
        if inotify is not None:
            _drain_fd(inotify)
        transport = self.transport
        while not stopped():
            current = transport.data_version()
            if current != version:
                version = current
                due = transport.next_due(queues)
                if due is not None:
                    wait = due - time.time()
                    if wait <= 0:
                        return
                    deadline = min(deadline, time.monotonic() + wait)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            fds = [self._read_fd] if inotify is None else [self._read_fd, inotify]
            ready = select.select(fds, [], [], left if inotify is not None else min(self.poll_interval, left))[0]
            for fd in ready:
                _drain_fd(fd)
            if self._read_fd in ready:
                return

    def _watch_wal(self):
        wal = self.transport.path + "-wal"
        if self._watching == wal:
            return self._inotify
        if self._watching is False or not sys.platform.startswith("linux"):
            return None
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0 or libc.inotify_add_watch(fd, os.fsencode(wal), 0x2) < 0:  # IN_MODIFY
                if fd >= 0:
                    os.close(fd)
                raise OSError(ctypes.get_errno(), "inotify")
        except (OSError, AttributeError):
            self._watching = False
            return None
        self._inotify, self._watching = fd, wal
        return fd


def _drain_fd(fd):
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 65536):
            pass


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# PostgreSQL


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ConfigurationError("a postgresql:// DSN needs psycopg 3: pip install 'jobrunner[postgres]'") from None
    return psycopg


def _channel_name(schema, table):
    """The LISTEN/NOTIFY channel of one table: its names when they fit PostgreSQL's 63 bytes, else a digest of them."""
    name = "jobrunner_%s" % (table if schema is None else "%s_%s" % (schema, table))
    if len(name) <= 63:
        return name
    import hashlib

    return "jobrunner_%s" % hashlib.sha256(name.encode()).hexdigest()[:32]


def _postgres_error(exc, where):
    """Turn a psycopg error into a one-line StorageError that names the database (never its password)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    state = getattr(exc, "sqlstate", None) or ""
    if state in ("55P03", "40P01"):  # lock_not_available, deadlock_detected
        return DatabaseLocked("database %s is locked: %s" % (where, text))
    if state.startswith("08") or type(exc).__name__ in ("OperationalError", "ConnectionTimeout"):
        return StorageError("cannot reach database %s: %s" % (where, text))
    return StorageError("database %s: %s" % (where, text))


class PostgresTransport(Transport):
    """The same table and the same verbs on PostgreSQL, for workers on several hosts.

    Claims skip rows other workers are claiming (``FOR UPDATE SKIP LOCKED``),
    the previous message's outcome and the next claim go in one statement,
    and an idle worker waits on LISTEN/NOTIFY: a dispatch notifies the
    message's queue name when it commits.
    """

    dialect = "postgresql"
    lock_clause = " FOR UPDATE SKIP LOCKED"
    in_ids = "= ANY(?)"
    begin_read_sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(self, settings):
        self.psycopg = _psycopg()
        self.driver_errors = (self.psycopg.Error,)
        super().__init__(settings)
        self.channel = _channel_name(settings.schema, settings.table)
        import urllib.parse

        self._connect_options = {"prepare_threshold": None} if settings.pgbouncer else {}
        if "connect_timeout" not in dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(settings.url).query)):
            self._connect_options["connect_timeout"] = max(1, int(settings.busy_timeout))  # unless the DSN gives one
        settle_claim = ("WITH settled AS ({settle} RETURNING 1), claimed AS ({claim}) "
                        "SELECT (SELECT COUNT(*) FROM settled), claimed.* FROM (SELECT 1) AS one "
                        "LEFT JOIN claimed ON true")
        self.settle_and_claim = {kind: settle_claim.format(settle=self.sql[kind], claim=self.sql["claim"])
                                 for kind in ("ack", "retry", "fail", "release")}
        # a worker's threads: the fenced acknowledgement of many messages, and the claim of up to N
        self.ack_and_claim = ("WITH acked AS (DELETE FROM %s WHERE (id, claimed_by, attempts) IN "
                              "(SELECT * FROM unnest(%%s::bigint[], %%s::bigint[], %%s::bigint[])) "
                              "RETURNING id, claimed_by, attempts), claimed AS (%s) "
                              "SELECT (SELECT array_agg(ARRAY[id::bigint, claimed_by::bigint, attempts::bigint]) "
                              "FROM acked), claimed.* FROM (SELECT 1) AS one LEFT JOIN claimed ON true"
                              % (self.table, self.sql["claim_many"]))
        self.insert_notify = ("INSERT INTO %s (id, body, headers, queue_name, created_at, available_at, priority, "
                              "unique_key) SELECT %%s, %%s, %%s, %%s, %%s, %%s, %%s, %%s FROM pg_notify(%%s, %%s)"
                              % self.table)

    @staticmethod
    def _placeholders(sql):
        return sql.replace("?", "%s")

    @property
    def where(self):
        import urllib.parse

        parts = urllib.parse.urlsplit(self.settings.url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            netloc = "%s@%s" % (user.partition(":")[0], host)
        where = urllib.parse.urlunsplit(("postgresql", netloc, parts.path, "", ""))
        if self.settings.schema:
            where += " (schema %s)" % self.settings.schema
        return where if self.settings.table == "messenger_messages" else "%s (table %s)" % (where, self.settings.table)

    def _open(self, create):
        settings = self.settings
        try:
            conn = self.psycopg.connect(settings.url, autocommit=True, **self._connect_options)
        except self.psycopg.Error as exc:
            raise self._error(exc) from None
        try:
            if _log.isEnabledFor(_SQL_TRACE):
                conn.add_notice_handler(lambda diag: _log.log(_SQL_TRACE, "notice: %s", diag.message_primary))
            # validated identifiers and numbers, not user text
            conn.execute("SET lock_timeout = %d" % int(settings.busy_timeout * 1000))
            conn.execute("SET client_min_messages = warning")  # no "already exists, skipping" notices on stderr
            if settings.schema:
                conn.execute("SET search_path TO %s" % settings.schema)
        except self.psycopg.Error as exc:
            conn.close()
            raise self._error(exc) from None
        return conn

    def _usable(self, conn):
        return not (conn.closed or conn.broken)

    def _forget_inherited(self, conn):
        # its socket is the parent's: closing it here would end the parent's session
        _INHERITED_CONNECTIONS.append(conn)

    def _error(self, exc):
        return _postgres_error(exc, self.where)

    def _in_transaction(self, conn):
        return conn.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    def _table_names(self, conn):
        return {row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()").fetchall()}

    def _columns(self, conn, table):
        return {row[0]: row[1] for row in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s", (table,)).fetchall()}

    def _ensure_schema(self, conn):
        if self._has_schema(conn) and not self._missing_columns(conn):
            return  # DDL, even IF NOT EXISTS, would wait for the table locks of running transactions
        with self.transaction(conn):
            # one creator at a time: CREATE ... IF NOT EXISTS races on the catalogs
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_advisory_key("schema", self.table),))
            if self.settings.schema:
                conn.execute("CREATE SCHEMA IF NOT EXISTS %s" % self.settings.schema)
            kind = self._columns(conn, self.table).get("available_at")
            if kind is not None and kind not in ("double precision", "numeric", "real", "bigint"):
                raise StorageError("table %s has available_at of type %s (Symfony's timestamps): jobrunner stores Unix "
                                   "seconds; give it another table with ?table=" % (self.table, kind))
            self._create_schema(conn)

    def _insert_one(self, conn, row):
        message_id = self._next_id(conn)
        self._cursor(conn).execute(self.insert_notify, (message_id,) + row + (self.channel, row[2]), prepare=True)
        return message_id

    def _try_insert_unique(self, conn, row):
        message_id = self._next_id(conn)
        cursor = self._cursor(conn).execute(self.insert_notify + _UNIQUE_CONFLICT, (message_id,) + row + (self.channel, row[2]),
                                            prepare=True)
        return message_id if cursor.rowcount == 1 else None

    def _next_id(self, conn):
        """An id from a block this thread reserved: a dispatch needs no RETURNING round trip of its own.

        Ids stay unique and increase within a process; across processes they
        interleave by blocks, which the claim order (``available_at``, then
        ``id``) does not mind.
        """
        local = self._local
        block = getattr(local, "ids", None)
        if not block or local.ids_pid != _own_pid:  # a fork copies the block: parent and child would share its ids
            block = local.ids = [row[0] for row in conn.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                (self.table, _ID_BLOCK)).fetchall()][::-1]
            local.ids_pid = _own_pid
        return block.pop()

    def _insert_many(self, conn, rows):
        bodies, headers, queues, created, available, priorities, _ = (list(column) for column in zip(*rows))
        ids = conn.execute(
            "INSERT INTO %s (body, headers, queue_name, created_at, available_at, priority) SELECT * FROM "
            "unnest(%%s::text[], %%s::text[], %%s::text[], %%s::float8[], %%s::float8[], %%s::bigint[]) RETURNING id"
            % self.table, (bodies, headers, queues, created, available, priorities)).fetchall()
        for queue in set(queues):  # one notification per queue, delivered at commit
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, queue))
        return sorted(row[0] for row in ids)  # a sequence hands out ids in insertion order

    def _ids_param(self, ids):
        return [int(i) for i in ids]

    def _cursor(self, conn):
        """A cursor kept with its connection: the hot statements run prepared, without a cursor per call."""
        local = self._local
        if getattr(local, "cursor_of", None) is not conn:
            local.cursor, local.cursor_of = conn.cursor(), conn
        return local.cursor

    def _claim(self, conn, queues, worker_id, settle):
        """One statement settles the previous outcome and claims from the first queue: one round trip.

        A worker's bookkeeping (claims, acknowledgements, retries) commits
        without waiting for the WAL flush: a PostgreSQL crash can only undo
        some of it, and every undone claim or outcome means a message is
        delivered again, never lost.  Dispatches and transactional handlers
        stay synchronous.
        """
        settled = True
        now = time.time()
        try:
            cursor = self._relaxed_cursor(conn)
            if settle is not None:
                row = cursor.execute(self.settle_and_claim[settle.kind], settle.params() + (
                    now, worker_id, queues[0], now, _PAUSED + queues[0]), prepare=True).fetchall()[0]
                settled, row = row[0] == 1, (row[1:] if row[1] is not None else None)
                rest = queues[1:]
            else:
                row, rest = None, queues
            for queue in rest if row is None else ():
                rows = cursor.execute(self.sql["claim"], (now, worker_id, queue, now, _PAUSED + queue),
                                      prepare=True).fetchall()
                if rows:
                    row = rows[0]
                    break
            due = self._next_due(conn, queues) if row is None else None
        except self.psycopg.Error as exc:
            raise self._error(exc) from exc
        if row is None:
            return None, settled, None, due
        return _Delivery(*row, worker_id), settled, None, None

    def send(self, messages, conn=None):
        conn = conn or self.connection()
        if getattr(self._local, "relaxed", None) is not conn or self._in_transaction(conn):
            return super().send(messages, conn)
        # a handler dispatching on its worker's connection, whose bookkeeping commits without waiting for the WAL
        # flush: a dispatch is the app's own write, and waits for it
        with self.transaction(conn):
            try:
                conn.execute("SET LOCAL synchronous_commit = on")
            except self.psycopg.Error as exc:
                raise self._error(exc) from None
            return super().send(messages, conn)

    def _relaxed_cursor(self, conn):
        """The hot cursor of a connection whose commits do not wait for the WAL flush (see :meth:`_claim`)."""
        if getattr(self._local, "relaxed", None) is not conn:
            conn.execute("SET synchronous_commit = off")
            self._local.relaxed = conn
        return self._cursor(conn)

    def _claim_batch(self, conn, queues, worker_id, settles, wanted):
        """A worker's threads (or a prefetch) settle and claim together, in one round trip when every outcome is an ack.

        One statement acknowledges every ack of the batch (fenced, as alone)
        and claims from the first queue up to as many messages as there are
        threads asking; the rarer outcomes go first, a statement each.
        Sixteen threads make one round trip where they made sixteen, and
        wake one server process instead of sixteen.
        """
        if wanted == 1 and len(settles) == 1:  # most batches of threads whose handlers take about as long
            delivery, settled, token, due = self._claim(conn, queues, worker_id, settles[0])
            return [delivery] if delivery is not None else [], [settled], token, due
        now = time.time()
        try:
            cursor = self._relaxed_cursor(conn)
            refused = {id(s) for s in settles if s is not None and s.kind != "ack"
                       and cursor.execute(self.sql[s.kind], s.params(), prepare=True).rowcount != 1}
            acks = [s.params() for s in settles if s is not None and s.kind == "ack"]
            ids, workers, attempts = (list(column) for column in zip(*acks)) if acks else ([], [], [])
            found = cursor.execute(self.ack_and_claim, (ids, workers, attempts, now, worker_id, queues[0], now,
                                                        _PAUSED + queues[0], wanted), prepare=True).fetchall()
            acked = {tuple(fence) for fence in found[0][0] or ()}
            rows = _in_claim_order([row[1:] for row in found if row[1] is not None])
            for queue in queues[1:]:
                if len(rows) == wanted:
                    break
                rows += _in_claim_order(cursor.execute(self.sql["claim_many"], (
                    now, worker_id, queue, now, _PAUSED + queue, wanted - len(rows)), prepare=True).fetchall())
            due = self._next_due(conn, queues) if len(rows) < wanted else None
        except self.psycopg.Error as exc:
            raise self._error(exc) from exc
        settled = [s is None or (s.params() in acked if s.kind == "ack" else id(s) not in refused) for s in settles]
        return [_Delivery(*row, worker_id) for row in rows], settled, None, due

    # A transactional handler's transaction is a psycopg Transaction: its
    # connection then refuses commit() and rollback() from handler code.

    def begin_handler(self):
        conn = self.connection()
        try:
            transaction = conn.transaction()
            transaction.__enter__()
            conn.execute("SET LOCAL synchronous_commit = on")  # the handler's writes are the app's: durable
        except self.psycopg.Error as exc:
            self.reconnect()
            raise self._error(exc) from None
        self._local.handler_transaction = transaction
        return conn

    def finish_handler(self, conn, delivery, ok):
        transaction, self._local.handler_transaction = self._local.handler_transaction, None
        try:
            if ok:
                if not self._in_transaction(conn):
                    raise _ended_its_transaction()
                if conn.execute(self.sql["ack"], _Outcome("ack", delivery).params()).rowcount == 1:
                    transaction.__exit__(None, None, None)  # commits
                    return True
            transaction.__exit__(self.psycopg.Rollback, self.psycopg.Rollback(transaction), None)
        except BaseException:
            self.reconnect()
            raise
        if not ok:
            self.reconnect()
        return False

    def _notify(self, conn, queues):
        for queue in queues:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, queue))

    def requeue_failed(self, ids, conn, queue_of=None):
        moved, left = super().requeue_failed(ids, conn, queue_of)
        if moved:
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, "*"))
        return moved, left

    def waiter(self):
        return _NotifyWaiter(self)

    def program_lock(self, program):
        return _AdvisoryLock(self, program)


_ID_BLOCK = 64
_UNIQUE_CONFLICT = " ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING"


def _in_claim_order(rows):
    """Rows of one ``claim_many``, whose RETURNING comes in no order, as the claim took them (priority dropped)."""
    return [row[:-1] for row in sorted(rows, key=lambda row: (-row[-1], row[5], row[0]))]


def _advisory_key(*parts):
    """A signed 64-bit key for pg_advisory_lock, stable across processes and hosts."""
    import hashlib

    digest = hashlib.sha1("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _AdvisoryLock:
    """One supervisor per program across hosts: a session advisory lock on a connection of its own."""

    def __init__(self, transport, program):
        self.transport = transport
        self.name = "advisory lock %s/%s/%s" % (transport.settings.schema or "", transport.table, program)
        self.key = _advisory_key(transport.settings.schema or "", transport.table, program)
        self._conn = None

    def acquire(self):
        conn = self.transport._open(create=True)
        try:
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchall()[0][0]:
                self._conn = conn
                return True
        except self.transport.psycopg.Error as exc:
            conn.close()
            raise self.transport._error(exc) from None
        conn.close()
        return False

    def release(self):
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # the session ends, and its lock with it
            self._conn = None


class _NotifyWaiter:
    """Sleeps until a dispatch to one of the worker's queues is notified, the worker is woken, or a timeout.

    A connection of its own LISTENs for the whole life of the worker, so a
    notification sent while the worker was busy waits in its socket.  After
    a lost connection it listens again and returns at once (the worker
    claims, in case something was dispatched meanwhile).
    """

    def __init__(self, transport):
        self.transport = transport
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._conn = None

    def wake(self):
        with contextlib.suppress(OSError, TypeError):
            os.write(self._write_fd, b"!")

    def close(self):
        for fd in (self._read_fd, self._write_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def sleep(self, timeout):
        if select.select([self._read_fd], [], [], max(0.0, timeout))[0]:
            _drain_fd(self._read_fd)

    def _listen(self):
        transport = self.transport
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
        conn = transport._open(create=False)
        try:
            conn.execute("LISTEN %s" % transport.channel)  # a validated identifier
        except transport.psycopg.Error as exc:
            conn.close()
            raise transport._error(exc) from None
        self._conn = conn
        return True

    def wait(self, token, timeout, stopped, queues):
        deadline = time.monotonic() + timeout
        try:
            if self._listen():
                return  # (re)connected: what was notified meanwhile is lost, so look now
        except JobRunnerError as exc:
            _log.error("listening for messages: %s", exc)
            self.sleep(min(timeout, 1.0))
            return
        pgconn = self._conn.pgconn
        wanted = {queue.encode() for queue in queues} | {b"*"}
        while not stopped():
            if self._notified(pgconn, wanted):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready = select.select([self._read_fd, self._conn.fileno()], [], [], left)[0]
            if self._read_fd in ready:
                _drain_fd(self._read_fd)
                return

    def _notified(self, pgconn, wanted):
        try:
            pgconn.consume_input()
        except Exception:
            with contextlib.suppress(Exception):
                self._conn.close()
            return True  # the connection is gone: listen again on the next wait, and claim now
        found = False
        while True:
            notice = pgconn.notifies()
            if notice is None:
                return found
            found = found or notice.extra in wanted


def _open_transport(settings):
    """The transport for these settings' database."""
    return PostgresTransport(settings) if settings.url else SqliteTransport(settings)


# --- The app: registry, routing, dispatch, retry strategy ---------------------------


@dataclasses.dataclass(frozen=True)
class RetryStrategy:
    """Exponential backoff: ``delay * multiplier ** (retry - 1)`` seconds, capped, with jitter."""

    max_retries: int = 3
    delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = None
    jitter: float = 0.1

    def __post_init__(self):
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise ConfigurationError("max_retries must be a whole number >= 0, not %r" % (self.max_retries,))
        for name in ("delay", "multiplier", "jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ConfigurationError("%s must be a number >= 0, not %r" % (name, value))
        if self.multiplier < 1:
            raise ConfigurationError("multiplier must be >= 1, not %r" % (self.multiplier,))
        if self.max_delay is not None and not (isinstance(self.max_delay, (int, float)) and self.max_delay >= 0):
            raise ConfigurationError("max_delay must be None or a number >= 0, not %r" % (self.max_delay,))
        if self.jitter >= 1:
            raise ConfigurationError("jitter is a fraction of the delay, below 1, not %r" % (self.jitter,))

    def wait(self, retry):
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        try:
            seconds = self.delay * self.multiplier ** max(0, retry - 1)
        except OverflowError:
            seconds = float("inf")
        if self.max_delay is not None:
            seconds = min(seconds, self.max_delay)
        seconds = min(seconds, 365 * 86400.0)
        if self.jitter:
            import random

            seconds *= 1 + random.uniform(-self.jitter, self.jitter)
            if self.max_delay is not None:
                seconds = min(seconds, self.max_delay)
        return max(0.0, seconds)


class Handler:
    """A registered function, callable as before, that also knows how to dispatch to itself."""

    def __init__(self, app, fn, name, queue, retry, timeout, transactional):
        self.app = app
        self.fn = fn
        self.name = name
        self.queue = queue
        self.retry = retry
        self.timeout = timeout
        self.transactional = transactional
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # calling one only creates a generator: the body would never run and the message would be lost
            raise ConfigurationError("handler %s is a generator function (it uses yield); a handler must return, "
                                     "not yield" % name)
        #: a coroutine function: the worker runs it on an event loop of its own
        self.is_async = inspect.iscoroutinefunction(fn)
        self._accepts_any, self._allowed, self._required = _payload_signature(fn, name, transactional)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return "<Handler %s -> %s queue=%s>" % (self.name, getattr(self.fn, "__qualname__", self.fn), self.queue)

    def dispatch(self, *, _delay=0, _queue=None, _priority=0, _unique_key=None, **payload):
        """Dispatch a message to this handler; the keywords are its payload. Returns the message id."""
        return self.app.dispatch(self.name, payload, queue=_queue, delay=_delay, priority=_priority,
                                 unique_key=_unique_key)

    def dispatch_many(self, payloads, *, queue=None, delay=0):
        """Dispatch one message per payload in one transaction; returns their ids."""
        return self.app.dispatch_many(self.name, payloads, queue=queue, delay=delay)

    def check(self, payload):
        """Raise InvalidMessage unless ``handler(**payload)`` would bind."""
        if type(payload) is dict and payload.keys() == self._allowed and not self._accepts_any:
            return  # the common case, on every message a worker runs: every argument given, nothing more
        if type(payload) is not dict:
            raise InvalidMessage("the payload of %s must be a JSON object (a dict), not %s" % (self.name, type(payload).__name__))
        if any(type(k) is not str for k in payload):
            raise InvalidMessage("payload does not fit handler %s: argument names must be strings, not %s"
                                 % (self.name, ", ".join(sorted(repr(k) for k in payload if type(k) is not str))))
        keys = payload.keys()
        if not self._accepts_any and not keys <= self._allowed:
            unknown = sorted(str(k) for k in keys - self._allowed)
            raise InvalidMessage("payload does not fit handler %s: unexpected argument %s" % (self.name, ", ".join(map(repr, unknown))))
        if not self._required <= keys:
            missing = sorted(self._required - keys)
            raise InvalidMessage("payload does not fit handler %s: missing argument %s" % (self.name, ", ".join(map(repr, missing))))

    def describe(self):
        fn = self.fn
        schedule = self.app.schedules.get(self.name)
        return {
            "name": self.name,
            "queue": self.queue,
            "function": "%s.%s" % (getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn))),
            "max_retries": self.retry.max_retries,
            "delay": self.retry.delay,
            "multiplier": self.retry.multiplier,
            "max_delay": self.retry.max_delay,
            "timeout": self.timeout,
            "transactional": self.transactional,
            "async": self.is_async,
            "schedule": str(schedule) if schedule else None,
            "next_run_at": schedule.next_after(time.time()) if schedule else None,
        }


def _payload_signature(fn, name, transactional):
    """(accepts any keyword, allowed names, required names) of ``fn`` called with ``**payload``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True, frozenset(), frozenset()
    accepts_any = False
    allowed, required = set(), set()
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            accepts_any = True
        elif p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise ConfigurationError("handler %s takes positional-only parameter %r: a payload can only pass keywords" % (name, p.name))
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            allowed.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    if transactional:
        if "db" not in allowed and not accepts_any:
            raise ConfigurationError("transactional handler %s must accept a keyword argument db" % name)
        allowed.discard("db")
        required.discard("db")
    return accepts_any, frozenset(allowed), frozenset(required)


_HANDLER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,189}\Z")


class JobRunner:
    """The app: handlers registered by name, each routed to a queue, and the database they share.

    ``JobRunner("sqlite:///var/jobs.db")`` or ``JobRunner("var/jobs.db")``;
    with no DSN, ``$JOBRUNNER_DSN`` or ``jobrunner.db`` in the working directory.
    The keyword arguments are the app's default retry strategy and queue.
    """

    def __init__(self, dsn=None, *, queue="async", queues=(), max_retries=3, delay=1.0, multiplier=2.0, max_delay=None,
                 jitter=0.1, eager=False, **settings):
        #: run handlers inside dispatch() instead of storing messages: for an app's own tests
        self.eager = bool(eager)
        self._hooks = {"before": [], "success": [], "retry": [], "failure": []}
        #: the schedules of periodic handlers, by handler name
        self.schedules = {}
        self.default_queue = _check_own_queue(queue, "the default queue")
        self.retry = RetryStrategy(max_retries, delay, multiplier, max_delay, jitter)
        self.handlers = {}
        self._declared_queues = [_check_own_queue(q, "a declared queue") for q in queues]
        unknown = set(settings) - {f.name for f in dataclasses.fields(Settings)} | ({"path"} & set(settings))
        if unknown:
            raise ConfigurationError("JobRunner() got unknown setting(s): %s" % ", ".join(sorted(unknown)))
        self._settings_overrides = settings
        self._dsn = dsn or os.environ.get("JOBRUNNER_DSN") or "jobrunner.db"
        self.settings = Settings.from_dsn(self._dsn, **settings)
        self.transport = _open_transport(self.settings)
        self._tx = threading.local()

    def __repr__(self):
        return "<JobRunner %s, %d handlers>" % (self.transport.where, len(self.handlers))

    def use_dsn(self, dsn=None, **settings):
        """Point the app at another database or settings (the command line's ``--dsn``)."""
        if dsn:
            self._dsn = dsn
        self._settings_overrides = dict(self._settings_overrides, **{k: v for k, v in settings.items() if v is not None})
        self.settings = Settings.from_dsn(self._dsn, **self._settings_overrides)
        self.transport.close_all()
        self.transport = _open_transport(self.settings)

    def close(self):
        """Close every database connection this app opened in this process (it reopens on next use)."""
        self.transport.close_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def queues(self):
        """Every queue a handler is routed to, then the declared ones, in order."""
        seen = []
        for q in [h.queue for h in self.handlers.values()] + self._declared_queues:
            if q not in seen:
                seen.append(q)
        return seen

    # Registry

    def handler(self, name=None, *, queue=None, max_retries=None, delay=None, multiplier=None, max_delay=None,
                jitter=None, timeout=None, transactional=False):
        """Register a function as the handler of ``name`` (default: the function's name).

        Usable bare (``@jobs.handler``) or with options.  Retry options left
        out take the app's defaults.  A ``transactional`` handler is called
        with ``db``, a connection inside the transaction that also
        acknowledges its message.
        """
        if callable(name) and not isinstance(name, str):
            return self.handler()(name)

        def register(fn):
            handler_name = name or getattr(fn, "__name__", None)
            if not isinstance(handler_name, str) or not _HANDLER_NAME.match(handler_name):
                raise ConfigurationError("invalid handler name %r" % (handler_name,))
            if handler_name in self.handlers:
                raise ConfigurationError("a handler named %r is already registered" % handler_name)
            if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
                raise ConfigurationError("timeout must be a positive number of seconds, not %r" % (timeout,))
            retry = dataclasses.replace(
                self.retry,
                **{k: v for k, v in dict(max_retries=max_retries, delay=delay, multiplier=multiplier, max_delay=max_delay,
                                          jitter=jitter).items() if v is not None},
            )
            target = _check_own_queue(queue or self.default_queue, "handler %s" % handler_name)
            handler = Handler(self, fn, handler_name, target, retry, timeout, bool(transactional))
            self.handlers[handler_name] = handler
            return handler

        return register

    def periodic(self, cron=None, *, every=None, tz="UTC", queue=None, name=None, **options):
        """Register a handler that a scheduler enqueues on a schedule: ``cron`` (5 fields, minute resolution,
        in ``tz``) or ``every`` seconds.

        ``supervise`` runs the scheduler (``--no-scheduler`` to turn it off),
        or ``jobrunner schedule`` alone.  Each tick is enqueued once whatever
        the number of schedulers; a tick missed while none ran is enqueued
        once when one comes back.  The handler takes no payload, or a
        ``scheduled_at`` keyword (the tick, Unix seconds).  Other keywords are
        those of :meth:`handler` (retries, timeout...).
        """
        def register(fn):
            handler_name = name or getattr(fn, "__name__", None)
            schedule = _Schedule(handler_name, cron, every, tz)
            handler = self.handler(handler_name, queue=queue, **options)(fn)
            if handler._required - {"scheduled_at"}:
                del self.handlers[handler_name]
                raise ConfigurationError("periodic handler %s takes required arguments %s: a scheduled message has no "
                                         "payload (only scheduled_at)" % (handler_name, ", ".join(sorted(handler._required))))
            self.schedules[handler_name] = schedule
            return handler

        return register

    def _tick_message(self, name, tick):
        """The message a schedule's tick enqueues."""
        handler = self.handlers[name]
        payload = {"scheduled_at": tick} if handler._accepts_any or "scheduled_at" in handler._allowed else {}
        return self._encode(name, payload, None, 0, time.time())

    def get_handler(self, name):
        handler = self.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none registered"
            raise InvalidMessage("unknown handler %r (known: %s)" % (name, known))
        return handler

    def check_queues(self, queues):
        """Raise InvalidMessage for a queue no handler is routed to (``failed`` is always known)."""
        known = self.queues
        for queue in queues:
            _check_queue_name(queue)
            if queue not in known and queue != FAILED_QUEUE:
                raise InvalidMessage("unknown queue %r (known: %s; a queue no handler uses is declared with "
                                 "JobRunner(queues=[...]))" % (queue, ", ".join(known) or "none"))
        return list(queues)

    # Dispatch

    def _encode(self, name, payload, queue, delay, now, priority=0, unique_key=None):
        handler = self.get_handler(name)
        if payload is None:
            payload = {}
        handler.check(payload)
        body = _encode_json(payload)
        if len(body) > self.settings.max_body_bytes and len(body.encode("utf-8")) > self.settings.max_body_bytes:
            raise InvalidMessage("payload of %s is %d bytes, over the %d-byte limit (max_body_bytes)"
                                 % (name, len(body.encode("utf-8")), self.settings.max_body_bytes))
        if queue is None:
            queue = handler.queue
        elif queue != handler.queue:
            self.check_queues([queue])
            if queue in (FAILED_QUEUE, _CANCELLED_QUEUE):
                raise InvalidMessage("messages cannot be dispatched to the %r queue" % queue)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay >= 0 or delay == float("inf"):
            raise InvalidMessage("delay must be a number of seconds >= 0, not %r" % (delay,))
        if type(priority) is not int or not -2 ** 31 <= priority < 2 ** 31:
            raise InvalidMessage("priority must be a whole number between -2**31 and 2**31-1, not %r" % (priority,))
        if unique_key is not None and not _storable_key(unique_key):
            raise InvalidMessage("unique_key must be a string of 1 to 255 characters, without NUL or lone surrogates, "
                                 "not %r" % (unique_key,))
        return queue, body, _headers_for(name), now + delay, priority, unique_key

    def dispatch(self, name, payload=None, queue=None, delay=0, *, priority=0, unique_key=None):
        """Store a message for handler ``name``; return its id.

        Inside a transactional handler or ``with jobs.transaction()``, the
        message joins that transaction; otherwise it is committed (and visible
        to workers) before this returns.  ``priority``: higher first within a
        queue.  ``unique_key``: while a message with that key is queued,
        delayed or running, nothing is stored and its id is returned.
        """
        message = self._encode(name, payload, queue, delay, time.time(), priority, unique_key)
        if self.eager:
            return self._run_eagerly(name, message)
        return self.transport.send([message], self._current_conn())[0]

    def dispatch_many(self, name_or_messages, payloads=None, *, queue=None, delay=0, priority=0):
        """Store many messages in one transaction; return their ids.

        ``dispatch_many("send_email", [{...}, {...}])`` or
        ``dispatch_many([("send_email", {...}), ("resize", {...})])``.
        """
        now = time.time()
        if isinstance(name_or_messages, str):
            if payloads is None:
                raise InvalidMessage("dispatch_many(name, payloads) needs an iterable of payloads")
            pairs = ((name_or_messages, p) for p in payloads)
        else:
            if payloads is not None:
                raise InvalidMessage("dispatch_many takes (name, payloads) or a list of (name, payload) pairs")
            pairs = name_or_messages
        messages = []
        for pair in pairs:
            try:
                name, payload = pair
            except (TypeError, ValueError):
                raise InvalidMessage("dispatch_many expects (name, payload) pairs, got %r" % (pair,)) from None
            messages.append(self._encode(name, payload, queue, delay, now, priority))
        if not messages:
            return []
        if self.eager:
            return [self._run_eagerly(json.loads(message[2])["handler"], message) for message in messages]
        return self.transport.send(messages, self._current_conn())

    def _run_eagerly(self, name, message):
        """Test mode: run the handler now, as a worker would (the payload through JSON), and let it raise."""
        handler = self.handlers[name]
        payload = json.loads(message[1])
        if handler.transactional:
            with self.transaction() as db:
                result = handler.fn(**dict(payload, db=db))
                if inspect.iscoroutine(result):
                    import asyncio

                    asyncio.run(result)
        elif handler.is_async:
            import asyncio

            asyncio.run(handler.fn(**payload))
        else:
            handler.fn(**payload)
        return None

    def _current_conn(self):
        return getattr(self._tx, "conn", None)

    @contextlib.contextmanager
    def transaction(self):
        """A write transaction on the jobs database: your writes and the messages dispatched inside commit together."""
        conn = self._current_conn()
        if conn is not None:  # nested: a savepoint, so this block rolls back alone when it raises
            conn.execute("SAVEPOINT jobrunner_nested")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO jobrunner_nested")
                conn.execute("RELEASE jobrunner_nested")
                raise
            conn.execute("RELEASE jobrunner_nested")
            return
        with self.transport.transaction(user_code=True) as conn:
            self._tx.conn = conn
            try:
                yield conn
            finally:
                self._tx.conn = None

    # Operations, for the command line and for scripts

    def setup(self):
        """Create the database and its tables (idempotent); return its path."""
        return self.transport.setup()

    def stats(self):
        """Queue counts; every queue a handler is routed to is listed, even when empty."""
        stats = self.transport.stats()
        listed = {q["queue"] for q in stats["queues"]}
        for queue in self.queues:
            if queue not in listed:
                stats["queues"].append({"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None,
                                        "paused": False})
        stats["queues"].sort(key=lambda q: q["queue"])
        return stats

    def worker(self, queues=None, **options):
        """A :class:`Worker` for these queues (default: every known queue in order)."""
        return Worker(self, queues or self.queues, **options)

    def run_pending(self, queues=None, limit=None):
        """Test mode: handle what is ready now in this process, with the real retry and failure rules.

        A retry that is not due yet is not waited for.  Returns how many
        messages were handled (successes and failed attempts alike).
        """
        worker = Worker(self, list(queues) if queues else self.queues, limit=limit, install_signals=False,
                        until_empty=True, name="run_pending")
        worker.run()
        return worker.processed

    # Lifecycle hooks: for metrics and error reporting; one that raises is logged, never loses a message

    def before(self, fn):
        """Register ``fn(message)``, called before each handler runs (``message`` is an :class:`Envelope`)."""
        self._hooks["before"].append(fn)
        return fn

    def on_success(self, fn):
        """Register ``fn(message)``, called after a handler returned."""
        self._hooks["success"].append(fn)
        return fn

    def on_retry(self, fn):
        """Register ``fn(message, error)``, called when a failed attempt will be retried."""
        self._hooks["retry"].append(fn)
        return fn

    def on_failure(self, fn):
        """Register ``fn(message, error)``, called when a message moves to the failure queue."""
        self._hooks["failure"].append(fn)
        return fn

    def _call_hooks(self, kind, *args):
        for hook in self._hooks[kind]:
            try:
                hook(*args)
            except Exception as exc:
                _log.error("%s hook %s raised %s: %s (ignored)", kind, getattr(hook, "__qualname__", hook),
                           _error_class(exc), exc)

    def consume(self, *queues, **options):
        """Run a worker in this process until a limit or a signal stops it; return the reason."""
        return self.worker(list(queues) or None, **options).run()

    def stop_workers(self):
        """Ask every worker on this database to finish its current message and exit."""
        return self.transport.request_stop()

    def pause(self, *queues):
        """Workers take nothing more from these queues (dispatches still store); lasts until :meth:`resume`."""
        self.transport.pause(self.check_queues(list(queues)))

    def resume(self, *queues):
        """Workers take messages from these queues again."""
        self.transport.resume(self.check_queues(list(queues)))

    def cancel(self, message_id):
        """Remove a queued or delayed message, or interrupt a running one (its worker stops it within seconds).

        Returns ``"waiting"`` or ``"running"``; UnknownMessage for an unknown,
        handled or failed message.
        """
        if type(message_id) is not int:
            raise InvalidMessage("a message id is a whole number, not %r" % (message_id,))
        return self.transport.cancel(message_id)

    def failed(self, ids=None, limit=None):
        """Envelopes in the failure queue, newest first."""
        return self.transport.failed(ids, limit)

    def retry_failed(self, ids):
        """Put these failed messages back on their queues; return how many moved.

        Unknown ids raise UnknownMessage and change nothing.  A message whose
        original queue is unknown goes to its handler's queue; with no handler
        either, it stays in the failure queue (and is not counted).
        """
        return self._on_failed(ids, lambda ids, conn: self.transport.requeue_failed(ids, conn, self.queue_of)[0])

    def queue_of(self, handler_name):
        """The queue a handler is routed to, or None for a handler this app does not have."""
        handler = self.handlers.get(handler_name)
        return handler.queue if handler else None

    def remove_failed(self, ids):
        """Delete these failed messages; unknown ids raise UnknownMessage and change nothing."""
        return self._on_failed(ids, self.transport.remove_failed)

    def _on_failed(self, ids, action):
        with self.transport.transaction(self.transport.connection(create=False)) as conn:
            ids = self.transport.check_failed_ids(ids, conn)
            return action(ids, conn)


@functools.lru_cache(maxsize=1024)
def _headers_for(name):
    return _encode_json({"handler": name})


def _find_app_spec(app=None):
    """The app as ``module[:attr]``: ``--app``, else ``$JOBRUNNER_APP``, else ``[tool.jobrunner] app`` in ./pyproject.toml."""
    if app:
        return app
    if os.environ.get("JOBRUNNER_APP"):
        return os.environ["JOBRUNNER_APP"]
    try:
        with open("pyproject.toml", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError("cannot read ./pyproject.toml: %s" % (exc.strerror or exc)) from None
    spec = _pyproject_app(text)
    if spec is not None and not isinstance(spec, str):
        raise ConfigurationError("[tool.jobrunner] app in ./pyproject.toml must be a string like \"myapp.jobs:jobs\"")
    return spec


def _pyproject_app(text):
    """``[tool.jobrunner] app`` from a pyproject.toml's bytes (tomllib, else tomli, else the one line we need)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            tomllib = None
    if tomllib is not None:
        try:
            config = tomllib.loads(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigurationError("cannot read ./pyproject.toml: %s" % exc) from None
        tool = config.get("tool")
        section = tool.get("jobrunner") if isinstance(tool, dict) else None
        return section.get("app") if isinstance(section, dict) else None
    # No TOML parser: read the table header and the one key, in the forms a person writes them.
    section = None
    for line in text.decode("utf-8", "replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[] \t").replace(" ", "")
        elif section == "tool.jobrunner":
            match = re.fullmatch(r"app\s*=\s*(\"[^\"]*\"|'[^']*')", line)
            if match:
                return match.group(1)[1:-1]
    return None


class _AppImportError(ConfigurationError):
    """The app module raised while it was imported; ``details`` holds the traceback (shown with -v)."""

    def __init__(self, summary, details):
        super().__init__(summary + " (-v shows the traceback)")
        self.summary, self.details = summary, details


def _load_app(spec):
    """Import ``module[:attr]`` and return its JobRunner; with no attr, the module's only JobRunner."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module_name) or (attr and not re.fullmatch(r"[A-Za-z_][\w.]*", attr)):
        raise ConfigurationError("--app must look like module or module:attribute, not %r" % spec)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except ImportError as exc:
        if getattr(exc, "name", None) and module_name.startswith(exc.name):
            raise ConfigurationError("cannot import app module %r: %s" % (module_name, exc)) from None
        raise _AppImportError("app module %r failed to import: %s: %s" % (module_name, _error_class(exc), exc),
                              _format_exception(exc)) from None
    except BaseException as exc:  # the app's own code raised (or exited) while it was imported
        raise _AppImportError("app module %r failed to import: %s: %s" % (module_name, _error_class(exc), exc),
                              _format_exception(exc)) from None
    if attr:
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigurationError("app module %r has no attribute %r" % (module_name, attr))
            obj = getattr(obj, part)
        if not isinstance(obj, JobRunner):
            raise ConfigurationError("%s is a %s, not a JobRunner" % (spec, type(obj).__name__))
        return obj
    found = {name: value for name, value in vars(module).items() if isinstance(value, JobRunner)}
    if len(found) != 1:
        what = "no JobRunner" if not found else "several JobRunners (%s)" % ", ".join(sorted(found))
        raise ConfigurationError("app module %r has %s: name one with --app %s:NAME" % (module_name, what, module_name))
    return next(iter(found.values()))



# Schedules: cron expressions and fixed intervals

_CRON_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
                 "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_CRON_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
                ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
                ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")))


def _cron_field(text, name, low, high, names):
    """The set of values a cron field allows: ``*``, ``5``, ``1-5``, ``*/15``, ``1-10/2``, ``mon-fri``, lists of those."""
    values = set()
    for part in text.split(","):
        spec, _, step = part.partition("/")
        try:
            step = int(step) if step else 1
            if spec == "*":
                first, last = low, high
            else:
                bounds = [_cron_value(v, low, names) for v in spec.split("-")]
                if len(bounds) > 2:
                    raise ValueError(spec)
                # "5/15" runs from 5 to the end, as cronie reads it; "5/1" too (it ran only at 5)
                first, last = bounds[0], bounds[-1] if len(bounds) == 2 else (high if "/" in part else bounds[0])
        except ValueError:
            raise ConfigurationError("cron %s field %r is not valid" % (name, text)) from None
        if step < 1 or not low <= first <= last <= high:
            raise ConfigurationError("cron %s field %r is out of range %d-%d" % (name, text, low, high))
        values.update(range(first, last + 1, step))
    return values


def _cron_value(text, low, names):
    text = text.strip().lower()
    if names and text in names:
        return names.index(text) + (1 if low == 1 else 0)
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


class _Cron:
    """A five-field cron expression (minute resolution), evaluated in a time zone.

    As in Vixie cron, when both day of month and day of week are restricted
    a day matching either runs.  A wall-clock time that a DST change skips
    does not run that day; one that it repeats runs once, the first time.
    """

    def __init__(self, expression, tz="UTC"):
        self.expression = expression
        text = _CRON_ALIASES.get(expression.strip().lower(), expression) if isinstance(expression, str) else ""
        fields = text.split()
        if len(fields) != 5:
            raise ConfigurationError("cron expression %r needs 5 fields (minute hour day-of-month month day-of-week) "
                                     "or one of %s" % (expression, ", ".join(sorted(_CRON_ALIASES))))
        (self.minutes, self.hours, self.days, self.months, weekdays) = (
            _cron_field(field, *spec) for field, spec in zip(fields, _CRON_FIELDS))
        self.weekdays = {d % 7 for d in weekdays}  # 7 is Sunday too
        self.any_day, self.any_weekday = fields[2] == "*", fields[4] == "*"
        self.tz = _zone(tz)

    def _day_matches(self, day):
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_after(self, after):
        """The first run time (Unix seconds) strictly after ``after``."""
        import datetime

        local = datetime.datetime.fromtimestamp(after, self.tz).replace(second=0, microsecond=0, tzinfo=None)
        day = local.date()
        start = (local.hour, local.minute)
        for _ in range(366 * 8):  # a valid expression (Feb 29 on a Monday...) matches within 8 years
            if day.month in self.months and self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        if (hour, minute) < start:
                            continue
                        moment = self._exists(datetime.datetime.combine(day, datetime.time(hour, minute)))
                        if moment is not None and moment > after:
                            return moment
            day += datetime.timedelta(days=1)
            start = (0, 0)
        raise ConfigurationError("cron expression %r never runs" % (self.expression,))

    def _exists(self, wall):
        """Unix seconds of a local wall-clock time, or None when a DST change skips it."""
        moment = wall.replace(tzinfo=self.tz, fold=0)
        back = moment.astimezone(_utc()).astimezone(self.tz).replace(tzinfo=None)
        return moment.timestamp() if back == wall else None


def _utc():
    import datetime

    return datetime.timezone.utc


def _zone(name):
    if name in (None, "UTC", "utc"):
        return _utc()
    try:
        import zoneinfo

        return zoneinfo.ZoneInfo(name)
    except Exception:
        raise ConfigurationError("unknown time zone %r (an IANA name like Europe/Paris)" % (name,)) from None


class _Schedule:
    """When a periodic handler runs: a cron expression, or every N seconds (ticks at multiples of N)."""

    def __init__(self, name, cron=None, every=None, tz="UTC"):
        if (cron is None) == (every is None):
            raise ConfigurationError("periodic handler %s needs a cron expression or every=SECONDS, not both" % name)
        if every is not None and not (isinstance(every, (int, float)) and not isinstance(every, bool) and
                                      0.001 <= every < 1e12):  # past 30,000 years is no schedule (10**400: no float)
            raise ConfigurationError("every must be a number of seconds from 0.001 to 1e12, not %.20r" % (every,))
        self.name, self.every, self.tz = name, every, tz
        self.cron = _Cron(cron, tz) if cron is not None else None
        if self.cron is not None:
            self.cron.next_after(time.time())  # one that never runs (30 2: February 30th) is refused here, not at a tick

    def __str__(self):
        return "every %gs" % self.every if self.every else "%s (%s)" % (self.cron.expression, self.tz)

    def next_after(self, after):
        if self.every:
            return (math.floor(after / self.every) + 1) * self.every
        return self.cron.next_after(after)

    def latest_at_or_before(self, now):
        """The latest tick not after ``now``, or None (a cron that has not run for two years)."""
        if self.every:
            return math.floor(now / self.every) * self.every
        window = 3600.0  # look back an hour, then four times further, until a tick is found
        while window <= 800 * 86400:
            moment = self.cron.next_after(now - window)
            if moment <= now:
                while True:
                    following = self.cron.next_after(moment)
                    if following > now:
                        return moment
                    moment = following
            window *= 4
        return None


# --- The worker loop ----------------------------------------------------------------

_VERBOSE = 15  # one line per message: shown with -v
logging.addLevelName(_VERBOSE, "VERBOSE")
logging.addLevelName(_SQL_TRACE, "SQL")

_LEVELS = {0: logging.INFO, 1: _VERBOSE, 2: logging.DEBUG, 3: _SQL_TRACE}
_TRACEBACK_LIMIT = 20000
_STUCK_GRACE_S = 5.0  # past its timeout, a handler Python could not interrupt gets this long before the worker exits
_MAX_THREADS = 256  # handler threads per worker process
_MAX_PREFETCH = 1000  # messages a worker claims at once with --prefetch
_REFILL_WAIT = 0.02  # threads with --prefetch: longest a finished message's outcome waits for the next claim


_LOG_FORMATS = ("text", "json")


def _log_formatter(name, log_format="text"):
    if log_format == "json":
        return _JsonFormatter(name)
    return logging.Formatter("%(asctime)s.%(msecs)03d " + name.replace("%", "%%")
                             + "[%(process)d] %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, process, pid, event, message_id, handler, message."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def format(self, record):
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "process": self.name,
                 "pid": record.process, "event": getattr(record, "event", None),
                 "message_id": getattr(record, "message_id", None), "handler": getattr(record, "handler", None),
                 "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _configure_logging(verbosity, name="worker", stream=None, log_format="text"):
    """Log lines on stderr: lifecycle and errors; each message with -v; details with -vv; everything with -vvv."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_log_formatter(name, log_format))
    root = logging.getLogger("jobrunner")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(verbosity, _SQL_TRACE))
    root.propagate = False


class _SilenceJudge:
    """Which workers stopped beating, judged by their beat counters on this process's monotonic clock.

    A worker is silent when its counter has not moved for ``timeout``
    seconds of our own clock: a wall-clock step (NTP) cannot make a live
    worker look dead.  Shared by the heartbeat's reaper and the supervisor.
    """

    def __init__(self, timeout):
        self.timeout = timeout
        self._seen = {}  # worker id -> (beats, monotonic time the count was first seen)

    def silent(self, counters, now=None):
        """Ids in ``counters`` (id -> beat count) whose count has not moved for the timeout."""
        now = time.monotonic() if now is None else now
        seen = self._seen
        for key in list(seen):
            if key not in counters:
                del seen[key]
        for key, beats in counters.items():
            old = seen.get(key)
            if old is None or old[0] != beats:
                seen[key] = (beats, now)
        return [key for key, (_, since) in seen.items() if now - since > self.timeout]

    def forgive(self, now=None):
        """Nobody could beat meanwhile (the write lock was held): start every count's clock again."""
        now = time.monotonic() if now is None else now
        self._seen = {key: (beats, now) for key, (beats, _) in self._seen.items()}


class _RssReader:
    """This process's resident memory, cheap enough to read after every message.

    On Linux a pread of /proc/self/statm on a file kept open; elsewhere psutil.
    """

    def __init__(self):
        self._pid = None
        self._fd = None
        self._psutil = None

    def __call__(self):
        if self._pid != os.getpid():
            self._open()
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 64, 0).split()[1]) * _PAGE_SIZE
            except (OSError, ValueError, IndexError):
                pass
        if self._psutil:
            return self._psutil.memory_info().rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB

    def _open(self):
        self._pid = os.getpid()
        self._fd = self._psutil = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            try:
                import psutil
            except ImportError:
                return
            self._psutil = psutil.Process()


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_rss_bytes = _RssReader()


class _Interrupted(BaseException):
    """Raised inside a handler to end it (its timeout passed).

    Not an Exception, so a handler's own ``except Exception:`` cannot swallow
    it by accident; the worker records it as :class:`HandlerTimeout`.
    """

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class _Cancelled(JobRunnerError):
    """The message was cancelled while its handler ran."""


class _ForcedStop(BaseException):
    """A second SIGINT/SIGTERM: stop now, even in the middle of a handler."""


class _TimedOutInThread(BaseException):
    """Raised by the heartbeat into a handler thread that ran past its timeout."""


class _CancelledInThread(BaseException):
    """Raised by the heartbeat into a handler thread whose message was cancelled."""


def _raise_in_thread(thread_id, exc_class):
    """Raise ``exc_class`` in another thread at its next Python instruction (None: forget a pending one).

    A thread blocked in C (a socket read, time.sleep) sees it when that call
    returns; the heartbeat ends a process whose handler stays stuck past that.
    """
    import ctypes

    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_class) if exc_class is not None else None)


class _ClaimRequest:
    """A thread's turn in a combined claim: the outcome to settle, then what it got."""

    __slots__ = ("outcome", "lane", "result", "error", "done")

    def __init__(self, outcome, lane):
        self.outcome, self.lane, self.result, self.error, self.done = outcome, lane, None, None, False


class _Lane:
    """One handler slot of a worker, and how to interrupt what runs in it; ``--threads N`` gives N."""

    def __init__(self, alarm=True):
        #: runs in the main thread, where SIGALRM interrupts a handler at its timeout
        self.alarm = alarm
        self.thread_id = None
        self.current = None  # (delivery, handler, headers) while a handler runs
        self.holding = None  # the id of the claimed message not yet settled
        self.interrupted = None  # the delivery a forced stop cut short
        self.deadline = None  # monotonic time past which the running handler is stuck
        self.alarm_armed = self.alarm_fired = False
        self.call_frame = None
        self.cancelled = None  # the id of the running message, once it is cancelled
        self.task = None  # the running coroutine handler's task
        self.event_loop = None
        # threads: the heartbeat raises into a handler at most once per message, and only while it runs
        self.lock = threading.Lock()
        self.interruptible = False
        self.interrupted_by = None  # the exception class raised into it

    def open_interrupts(self):
        with self.lock:
            self.interruptible, self.interrupted_by = True, None

    def close_interrupts(self):
        """No exception may land in the worker's own code: forget one raised but not yet seen."""
        with self.lock:
            self.interruptible = False
            if self.interrupted_by is not None:
                _raise_in_thread(self.thread_id, None)

    def interrupt(self, exc_class):
        """Raise ``exc_class`` into the handler running in this lane's thread (once per message)."""
        with self.lock:
            if not self.interruptible or self.interrupted_by is not None or self.thread_id is None:
                return False
            self.interrupted_by = exc_class
            return _raise_in_thread(self.thread_id, exc_class) == 1


class Worker:
    """Claims messages from its queues in priority order and runs their handlers.

    Stops after the current message when a limit is reached, on SIGTERM or
    SIGINT, or when ``stop-workers`` is requested; :meth:`run` returns why.
    Limits: ``limit`` messages, ``failure_limit`` failed attempts,
    ``memory_limit`` bytes of RSS, ``time_limit`` seconds.  ``sleep`` is the
    longest idle wait between polls; a committed message wakes it at once.
    ``owns_process`` (the command line, the supervisor's children) lets it exit
    the process when a handler is stuck where Python cannot interrupt it.
    ``threads`` runs that many handlers at once, each in its own thread
    claiming its own messages (for handlers that wait on the network).
    ``prefetch`` claims up to that many messages in one write and settles
    their outcomes together with the next claim (for fast handlers; a kill
    then costs up to that many duplicates).  With ``threads`` it is how many
    claimed messages wait for a free thread, kept topped up by the main
    thread, so that no thread waits for a claim.
    """

    def __init__(self, app, queues, *, limit=None, failure_limit=None, memory_limit=None, time_limit=None, sleep=1.0,
                 name=None, install_signals=True, parent_pid=None, stop_timeout=10.0, owns_process=False,
                 on_ready=None, until_empty=False, replay_filter=None, ping_file=None, threads=1, prefetch=1):
        if not queues:
            raise ConfigurationError("a worker needs at least one queue")
        #: `consume failed`: each failed message (oldest first) runs its handler once more; one pass
        self.replay = list(queues) == [FAILED_QUEUE]
        if FAILED_QUEUE in queues and not self.replay:
            raise ConfigurationError("consume failed replays the failure queue in a run of its own: give it alone")
        if replay_filter is not None and not self.replay:
            raise ConfigurationError("--handler and --error choose failed messages: they go with consume failed")
        self.replay_filter = replay_filter
        self.ping_file = ping_file
        self.queues = [FAILED_QUEUE] if self.replay else app.check_queues(list(queues))
        self._check_numbers(limit, failure_limit, memory_limit, time_limit, sleep, threads, prefetch)
        self.app = app
        self.transport = app.transport
        self.limit, self.failure_limit, self.memory_limit, self.time_limit = limit, failure_limit, memory_limit, time_limit
        self.sleep = sleep if sleep is not None else 1.0
        self.name = name or "worker"
        self.parent_pid = parent_pid
        self.stop_timeout = stop_timeout
        self.install_signals = install_signals
        self.owns_process = owns_process
        self.on_ready = on_ready
        self.until_empty = until_empty
        self.host = _host_identity()
        self.worker_id = None
        self.started_at = None
        self.processed = self.handled = self.failed = 0
        self.exit_code = 0
        self._stop_reason = None
        self._stop_logged = False
        self._waiter = None
        self.threads = threads
        self.prefetch = prefetch
        self._prefetched = collections.deque()  # --prefetch: claimed, not yet started, in claim order
        self._buffer_changed = threading.Condition()  # threads with --prefetch: a message in, or an outcome out
        self._refiller_idle = False  # threads with --prefetch: the main thread waits for a commit
        self._unsettled = []  # --prefetch: outcomes to write with the next claim (or the next heartbeat)
        self._unsettled_lock = threading.RLock()
        self._cancelled_ahead = set()  # --prefetch: ids cancelled while they waited in a batch (seen by the heartbeat)
        self._lanes = [_Lane(alarm=threads == 1)] if threads == 1 else [_Lane(alarm=False) for _ in range(threads)]
        self._idle_lock = threading.Lock()  # threads: one idle lane waits for commits, the others for it
        self._idle_turn = threading.Condition()
        self._idle_generation = 0
        # threads: the one that holds this claims for all that wait (one write, one round trip)
        self._claim_lock = threading.Lock() if threads > 1 else None
        self._claims_wanted = []  # _ClaimRequest, appended under _claims_lock
        self._claims_lock = threading.Lock()
        self._forced = False  # threads abandoned by a second signal
        self._minute = 0.0  # the start of the minute the counts below are for
        self._counts = {}  # (minute, queue, handler) -> [handled, retried, failed], flushed by the heartbeat
        self._counts_lock = threading.Lock()
        self._signals_installed = False
        self._signals_seen = 0
        self._stop_announced = False

    def _check_numbers(self, limit, failure_limit, memory_limit, time_limit, sleep, threads, prefetch):
        """Refuse limits, waits, threads and prefetch out of range or that do not go together, in one line."""
        for option, value in (("limit", limit), ("failure_limit", failure_limit), ("memory_limit", memory_limit)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigurationError("%s must be a whole number >= 0, not %r" % (option, value))
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= _MAX_THREADS:
            raise ConfigurationError("threads must be a whole number from 1 to %d, not %r" % (_MAX_THREADS, threads))
        if threads > 1 and self.replay:
            raise ConfigurationError("consume failed replays one message at a time: it takes no --threads")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 1 <= prefetch <= _MAX_PREFETCH:
            raise ConfigurationError("prefetch must be a whole number from 1 to %d, not %r" % (_MAX_PREFETCH, prefetch))
        if prefetch > 1 and self.replay:
            raise ConfigurationError("consume failed replays one message at a time: it takes no --prefetch")
        for option, value in (("time_limit", time_limit), ("sleep", sleep)):
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
                raise ConfigurationError("%s must be a number of seconds >= 0, not %r" % (option, value))

    def __repr__(self):
        return "<Worker %s queues=%s id=%s>" % (self.name, ",".join(self.queues), self.worker_id)

    # Stopping

    def stop(self, reason="asked to stop", exit_code=0):
        """Finish the current message, then return from :meth:`run`."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self.exit_code = exit_code
        if self._waiter is not None:
            self._waiter.wake()

    def _busy(self):
        """What the first busy lane runs: ``(delivery, handler, headers)``, or None."""
        for lane in self._lanes:
            current = lane.current
            if current is not None:
                return current
        return None

    def _on_signal(self, signum, frame):
        self._signals_seen += 1
        name = signal.Signals(signum).name
        current = self._busy()
        if self._signals_seen > 1 and current is not None:
            raise _ForcedStop(name)
        self.stop("received %s" % name)
        if current is not None and _stderr_is_a_terminal():
            # os.write, not logging: this runs inside a signal handler
            self._stop_announced = True
            with contextlib.suppress(OSError):
                os.write(2, ("finishing message %d (%s); %s again to abort it\n" % (
                    current[0].id, current[1].name, "Ctrl-C" if signum == signal.SIGINT else name)).encode())

    def _announce_stop(self):
        """Say that a stop waits for the running handler (from the heartbeat: never from a signal handler)."""
        current = self._busy()
        if self._stop_reason is not None and current is not None and not self._stop_announced:
            self._stop_announced = True
            _log.info("%s: finishing message %d (%s) first; a second signal aborts it", self._stop_reason,
                      current[0].id, current[1].name)

    def _on_alarm(self, signum, frame):
        # Only the one lane of a worker without threads runs in the main thread, where alarms land.
        lane = self._lanes[0]
        # An alarm that lands after the handler returned (we are back in _call's own frame) changes nothing.
        if frame is lane.call_frame or lane.current is None or not lane.alarm:
            return
        if lane.cancelled is not None and lane.cancelled == lane.current[0].id:
            lane.alarm_fired = True
            raise _Interrupted(_Cancelled("message %d was cancelled while it ran" % lane.cancelled))
        if lane.alarm_armed:
            lane.alarm_armed = False
            lane.alarm_fired = True
            raise _Interrupted(HandlerTimeout("handler ran past its timeout of %gs" % lane.current[1].timeout))

    def cancel_current(self, message_id):
        """Interrupt the handler running ``message_id``, if one still does (from the heartbeat thread)."""
        for lane in self._lanes:
            current = lane.current
            if current is None or current[0].id != message_id or lane.cancelled == message_id:
                continue
            lane.cancelled = message_id
            task, loop = lane.task, lane.event_loop
            if task is not None and loop is not None:
                loop.call_soon_threadsafe(task.cancel)
            elif lane.alarm and self._signals_installed:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
            elif not lane.interrupt(_CancelledInThread):
                _log.warning("message %d was cancelled; its handler could not be interrupted, so it runs to its end, "
                             "and the message is not retried", message_id)

    def _install_signals(self):
        if not self.install_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        wanted = [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
            wanted.append(signal.SIGHUP)
        for sig in wanted:
            previous[sig] = signal.signal(sig, self._on_signal)
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        self._signals_installed = True
        return previous

    def _limit_reached(self, started, ahead=0):
        """Why the worker should stop now, if it should; ``ahead``: messages counted, claimed and not yet run."""
        if self.limit is not None and self.processed - ahead >= self.limit:
            return "message limit of %d reached" % self.limit
        if self.failure_limit is not None and self.failed >= self.failure_limit:
            return "failure limit of %d reached" % self.failure_limit
        if self.time_limit is not None and time.monotonic() - started >= self.time_limit:
            return "time limit of %gs reached" % self.time_limit
        if self.memory_limit is not None:  # after every message, as messenger:consume does
            rss = _rss_bytes()
            if rss > self.memory_limit:
                return "memory limit of %s exceeded (RSS %s)" % (_format_bytes(self.memory_limit), _format_bytes(rss))
        return None

    # The loop

    def run(self):
        """Consume until a limit, a signal or ``stop-workers``; return the reason."""
        self._waiter = self.transport.waiter()
        previous_signals = self._install_signals()
        heartbeat = None
        started = time.monotonic()
        outcome = None
        try:
            self._register()
            heartbeat = _Heartbeat(self)
            heartbeat.start()
            _log.info("worker %s (pid %d) consuming %s from %s", self.name, os.getpid(), ", ".join(self.queues),
                      self.transport.where, extra={"event": "started"})
            if self.transport.created and not self.until_empty:
                _log.warning("created a new, empty database at %s: is it the one your app dispatches to? (check --dsn, "
                             "JOBRUNNER_DSN and the directory this runs in)", self.transport.where)
            if not self._over_memory_limit_at_start():
                if self.on_ready is not None:
                    self.on_ready()
                outcome = self._loop(started)
        except _ForcedStop as forced:
            self._stop_reason = "received %s twice: stopped in the middle of a message" % forced
            self.exit_code = 1
            lane = self._lanes[0]
            if self.threads > 1:  # the threads are abandoned mid-handler: all they hold goes back, attempts given back
                self._forced = True
                with self._unsettled_lock:  # what they finished is written first
                    finished, self._unsettled = self._unsettled, []
                self._settle_last(finished)
                self._prefetched.clear()
                with contextlib.suppress(JobRunnerError):
                    self.transport.release_own(self.worker_id)
            elif lane.interrupted is not None:  # not its fault: the attempt is given back
                outcome = _Outcome("release", lane.interrupted)
        finally:
            if self.threads == 1:
                self._lanes[0].current = None
            if heartbeat is not None:
                heartbeat.stop()
            self._finish(outcome)
            for sig, handler in previous_signals.items():
                signal.signal(sig, handler)
            self._signals_installed = False
            waiter, self._waiter = self._waiter, None
            waiter.close()
            for lane in self._lanes:
                if lane.event_loop is not None and not self._forced:
                    lane.event_loop.close()
                    lane.event_loop = None
        level = logging.INFO if self.exit_code == 0 else logging.ERROR
        _log.log(level, "worker %s stopped: %s (%d messages, %d failed attempts)", self.name, self._stop_reason,
                 self.processed, self.failed, extra={"event": "stopped"})
        return self._stop_reason

    def _over_memory_limit_at_start(self):
        """Over the memory limit before any message: the limit is below the worker's own footprint.

        Restarting cannot help, so this is a failed start (exit 1, never
        ready): the supervisor backs off to FATAL instead of forking in a loop.
        """
        rss = _rss_bytes() if self.memory_limit is not None else 0
        if rss > self.memory_limit if self.memory_limit is not None else False:
            self.stop("memory limit of %s is below this worker's own footprint (RSS %s at start)"
                      % (_format_bytes(self.memory_limit), _format_bytes(rss)), exit_code=1)
            return True
        return False

    def _replay_ids(self):
        """The failed messages to replay, oldest first (as they stand when the run starts)."""
        chosen = [e for e in self.transport.failed() if self.replay_filter is None or self.replay_filter(e)]
        return [e.id for e in sorted(chosen, key=lambda e: (e.available_at if isinstance(e.available_at, (int, float))
                                                            else 0, e.id))]

    def _loop(self, started):
        if self.replay:
            return self._replay_loop(started)
        if self.threads > 1:
            return self._run_lanes(started)
        if self.prefetch > 1:
            return self._prefetch_loop(self._lanes[0], started)
        return self._lane_loop(self._lanes[0], started)

    def _run_lanes(self, started):
        """Run each lane in a thread of its own; this (main) thread fills their buffer, or only waits.

        Signals land in the main thread, between its statements.
        """
        threads = [threading.Thread(target=self._lane_thread, args=(lane, started), name="jobrunner-lane-%d" % i,
                                    daemon=True) for i, lane in enumerate(self._lanes)]
        for thread in threads:
            thread.start()
        if self.prefetch > 1:
            try:
                self._refill_loop(started)
            finally:
                with self._buffer_changed:
                    self._buffer_changed.notify_all()
        for thread in threads:
            while thread.is_alive():
                thread.join(1.0)
        return None

    def _lane_thread(self, lane, started):
        outcome = None
        try:
            outcome = (self._buffered_lane_loop if self.prefetch > 1 else self._lane_loop)(lane, started)
        except BaseException as exc:  # a bug of ours: the worker stops, and says so
            _log.critical("handler thread crashed: %s", _format_exception(exc).rstrip())
            self.stop("a handler thread crashed: %s" % _error_class(exc), exit_code=1)
        finally:
            lane.current = None
            self._settle_last([outcome])
            self.transport.close()  # this thread's connection

    def _settle_last(self, outcomes):
        """Settle the last outcomes of the worker, or of one of its threads (None: none); never raises."""
        for outcome in outcomes:
            try:
                if outcome is not None and not self.transport.settle(outcome):
                    self._refused(outcome)
            except JobRunnerError as exc:
                _log.error("could not record the outcome of message %d: %s (it will be delivered again)",
                           outcome.delivery.id, exc)

    def _refused(self, outcome):
        _log.warning("message %d: claim was released while handling it (worker thought dead); outcome refused",
                     outcome.delivery.id)

    def _claim_together(self, outcome, lane):
        """Threads: settle and claim at once for every thread waiting to, whoever runs it.

        On SQLite one write per batch instead of one per thread, and no
        thread sleeps in SQLite's busy handler behind its own siblings; on
        PostgreSQL one round trip.  Each message is still claimed for the
        thread that runs it next, and each outcome settled fenced, as alone.
        """
        request = _ClaimRequest(outcome, lane)
        with self._claims_lock:
            self._claims_wanted.append(request)
        with self._claim_lock:
            if not request.done:  # nobody took ours while we waited: take every request waiting now
                with self._claims_lock:
                    batch, self._claims_wanted = self._claims_wanted, []
                try:
                    deliveries, settled, token, due = self.transport.claim_batch(
                        self.queues, self.worker_id, [r.outcome for r in batch], len(batch))
                    deliveries += [None] * (len(batch) - len(deliveries))
                    for r, delivery, settled in zip(batch, deliveries, settled):
                        r.result = (delivery, settled, None, None) if delivery is not None else (None, settled, token, due)
                        # held from the claim on, as seen by a thread giving back what nobody holds (_lane_loop)
                        r.lane.holding = delivery.id if delivery is not None else None
                except BaseException as exc:  # every thread of the batch sees it, and backs off as alone
                    for r in batch:
                        r.error = exc
                for r in batch:
                    r.done = True
        if request.error is not None:
            raise request.error
        return request.result

    def _take_slots(self, wanted=1):
        """Count up to ``wanted`` more messages before claiming them; how many (0 once ``limit`` were taken)."""
        with self._counts_lock:
            if self.limit is not None:
                wanted = max(0, min(wanted, self.limit - self.processed))
            self.processed += wanted
            return wanted

    def _give_back_slots(self, count=1):
        with self._counts_lock:
            self.processed -= count

    def _give_back_unseen(self, lane, outcomes):
        """Release what this worker claimed and no thread holds: claims a lost connection never answered.

        ``outcomes``: what this lane (None: the worker) has still to settle,
        whose claims it keeps, as it keeps those waiting in its buffer.  With
        threads, under the claim lock: a claim another thread has just made
        is then held already, not taken for an unseen one.
        """
        with self._claim_lock or contextlib.nullcontext(), self._counts_lock:  # a lane takes from the buffer under it
            keep = (self._held_elsewhere(lane) + [outcome.delivery.id for outcome in outcomes if outcome is not None]
                    + [delivery.id for delivery in self._prefetched])
            released = self.transport.release_own(self.worker_id, keep)
        if released:
            _log.warning("gave back %d message(s) claimed while the connection was lost", released)

    def _held_elsewhere(self, lane):
        """The messages other lanes hold: a lane that lost its connection must not give them back."""
        return [other.holding for other in self._lanes if other is not lane and other.holding is not None]

    def _lane_loop(self, lane, started):
        lane.thread_id = threading.get_ident()
        outcome = None
        backoff = 0.0
        while True:
            reason = self._limit_reached(started)
            if reason:
                self.stop(reason)
            if self._stop_reason is not None:
                return outcome
            if not self._take_slots():
                self.stop("message limit of %d reached" % self.limit)
                continue
            try:
                if backoff:  # the last claim failed: it may have committed all the same, unseen
                    self._give_back_unseen(lane, [outcome])
                if self._claim_lock is None:
                    delivery, settled, token, due = self.transport.claim(self.queues, self.worker_id, outcome)
                    lane.holding = delivery.id if delivery is not None else None
                else:
                    delivery, settled, token, due = self._claim_together(outcome, lane)
            except StorageError as exc:
                self._give_back_slots()
                backoff = self._back_off(exc, backoff, started)
                continue
            backoff = 0.0
            if not settled:
                self._refused(outcome)
            outcome = None
            if delivery is None:
                self._give_back_slots()
                if self.until_empty:
                    self.stop("no message is ready")
                    continue
                if self.threads == 1:
                    self._idle(token, due, started)
                else:
                    self._idle_lane(token, due, started)
                continue
            outcome = self._process(delivery, lane)

    def _back_off(self, exc, backoff, started):
        """After a failed claim: wait longer each time, up to 30 s (never past the time limit); the new wait."""
        backoff = min(30.0, max(0.5, backoff * 2))
        _log.error("%s; retrying in %gs", exc, backoff)
        if self.time_limit is not None:
            backoff = min(backoff, max(0.0, self.time_limit - (time.monotonic() - started)))
        self._waiter.sleep(backoff)
        return backoff

    def _prefetch_loop(self, lane, started):
        """``prefetch`` N: claim up to N messages in one write, run them in order, settle them in the next one.

        Settling waits for the next claim, or for the next heartbeat while a
        handler of the batch runs longer; a worker killed in between has
        those messages handled again (at-least-once, with up to N duplicates
        a kill instead of one).  At a stop, what it claimed and never
        started goes back with its attempt given back (:meth:`_finish`);
        a killed worker's goes back at the normal release.
        """
        ready, unsettled = self._prefetched, self._unsettled
        backoff = 0.0
        while True:
            reason = self._limit_reached(started, ahead=len(ready))
            if reason:
                self.stop(reason)
            if self._stop_reason is not None:
                return None
            if ready:
                delivery = ready.popleft()
                if delivery.id in self._cancelled_ahead:
                    outcome = self._cancelled_before_start(delivery)
                else:
                    outcome = self._process(delivery, lane)
                if outcome is not None:
                    with self._unsettled_lock:
                        unsettled.append(outcome)
                continue
            wanted = self._take_slots(self.prefetch)
            if not wanted:
                self.stop("message limit of %d reached" % self.limit)
                continue
            try:
                if backoff:  # the last claim failed: it may have committed all the same, unseen
                    self._give_back_unseen(lane, unsettled)
                claimed, token, due = self._settle_and_claim(unsettled, wanted)
            except StorageError as exc:
                self._give_back_slots(wanted)
                backoff = self._back_off(exc, backoff, started)
                continue
            self._give_back_slots(wanted - len(claimed))
            backoff = 0.0
            if claimed:
                ready.extend(claimed)
            elif self.until_empty:
                self.stop("no message is ready")
            else:
                self._idle(token, due, started)

    def _settle_and_claim(self, unsettled, wanted):
        """Settle ``unsettled`` (emptied once written) and claim up to ``wanted``: ``(claimed, token, due)``."""
        with self._unsettled_lock:
            claimed, settled, token, due = self.transport.claim_batch(self.queues, self.worker_id, unsettled, wanted)
            for outcome, ok in zip(unsettled, settled):
                if not ok:
                    self._refused(outcome)
            unsettled.clear()
        return claimed, token, due

    def _cancelled_before_start(self, delivery):
        """A prefetched message cancelled while it waited in its batch: it never runs, and is removed."""
        self._cancelled_ahead.discard(delivery.id)
        _log.warning("message %d was cancelled before it started", delivery.id,
                     extra={"event": "cancelled", "message_id": delivery.id})
        return _Outcome("ack", delivery)

    def look_for_cancels_ahead(self):
        """``--prefetch``: note which messages of the batch were cancelled before they started (from the heartbeat)."""
        waiting = list(self._prefetched)  # one C-level copy: the loop pops from it meanwhile
        if waiting:
            self._cancelled_ahead.update(self.transport.cancelled_among([delivery.id for delivery in waiting]))

    def settle_held(self):
        """``--prefetch``: write the outcomes held back while a handler runs long (from the heartbeat).

        Never waits for the loop, which writes them itself; a failure leaves them to its next claim.
        """
        if self.threads > 1:
            return  # the main thread writes them with its next claim
        if self._unsettled and self._unsettled_lock.acquire(blocking=False):
            try:
                if self._unsettled:
                    with contextlib.suppress(StorageError):
                        self._settle_and_claim(self._unsettled, 0)
            finally:
                self._unsettled_lock.release()

    def _buffered_lane_loop(self, lane, started):
        """Threads with ``prefetch``: run messages from the worker's buffer, which the main thread keeps filled.

        A lane never waits for a claim while the buffer holds a message; its
        outcome is written with the main thread's next claim.
        """
        lane.thread_id = threading.get_ident()
        while True:
            reason = self._limit_reached(started)  # counts the messages started, not those waiting
            if reason:
                self.stop(reason)
            if self._stop_reason is not None:
                return None
            delivery = self._take_from_buffer(lane)
            if delivery is None:
                with self._buffer_changed:
                    self._buffer_changed.wait_for(lambda: self._prefetched or self._stop_reason is not None, 1.0)
                continue
            if delivery.id in self._cancelled_ahead:
                outcome = self._cancelled_before_start(delivery)
            else:
                outcome = self._process(delivery, lane)
            with self._unsettled_lock:
                if outcome is not None:
                    self._unsettled.append(outcome)
                lane.holding = None  # the outcome holds it now
            with self._buffer_changed:
                self._buffer_changed.notify_all()
            if self._refiller_idle:
                self._waiter.wake()

    def _take_from_buffer(self, lane):
        """The next message of the buffer, counted as started and held by ``lane``; None if none (or the limit)."""
        with self._counts_lock:
            if not self._prefetched or (self.limit is not None and self.processed >= self.limit):
                return None
            delivery = self._prefetched.popleft()
            self.processed += 1
            lane.holding = delivery.id
            return delivery

    def _refill_loop(self, started):
        """Threads with ``prefetch`` (the main thread): keep up to ``prefetch`` claimed messages waiting.

        Each claim writes the outcomes the threads finished since the last
        one, in the same transaction.
        """
        backoff = 0.0
        while self._stop_reason is None:
            if not self._wait_for_refill():
                continue
            wanted = self._wanted_ahead()
            try:
                if backoff:  # the last claim failed: it may have committed all the same, unseen
                    self._give_back_unseen(None, self._unsettled)
                claimed, token, due = self._settle_swapped(max(0, wanted))
            except StorageError as exc:
                backoff = self._back_off(exc, backoff, started)
                continue
            backoff = 0.0
            if claimed:
                with self._buffer_changed:
                    self._prefetched.extend(claimed)
                    self._buffer_changed.notify_all()
            elif wanted <= 0:
                continue
            elif self.until_empty and not self._prefetched:
                self.stop("no message is ready")
            else:
                self._refiller_idle = True
                try:
                    if not self._unsettled:  # a lane that finishes meanwhile wakes it
                        self._idle(token, due, started)
                finally:
                    self._refiller_idle = False

    def _wait_for_refill(self):
        """Wait until a claim is due, or has had something to do for ``_REFILL_WAIT``; False at a stop."""
        since = None
        with self._buffer_changed:
            while self._stop_reason is None and not self._refill_due():
                now = time.monotonic()
                if not (self._unsettled or self._wanted_ahead() > 0):
                    since = None
                elif since is None:
                    since = now
                elif now - since >= _REFILL_WAIT:
                    break
                # wakes within 0.25 s for a stop, as a signal cannot notify
                self._buffer_changed.wait(0.25 if since is None else since + _REFILL_WAIT - now)
        return self._stop_reason is None

    def _refill_due(self):
        """Whether to claim now: half the buffer is gone, the claim reaches ``limit``, or a thread's worth of outcomes wait.

        Fewer claims of more messages each, as every claim may wait for SQLite's
        write lock behind the other workers' (4 x 16 threads went from 0.86 to
        0.96 of the ideal rate, claiming 8 at a time rather than 3).  Outcomes
        wait at most ``_REFILL_WAIT`` for a claim all the same.
        """
        room, wanted = self._room_ahead()
        return (wanted > 0 and (2 * room >= self.prefetch or wanted < room)) or len(self._unsettled) >= self.threads

    def _wanted_ahead(self):
        """How many more messages the buffer wants: up to ``prefetch`` waiting, never past ``limit``."""
        return self._room_ahead()[1]

    def _room_ahead(self):
        """``(room, wanted)``: free places in the buffer, and how many of them ``limit`` lets a claim fill."""
        with self._counts_lock:
            room = self.prefetch - len(self._prefetched)
            wanted = room if self.limit is None else min(room, self.limit - self.processed - len(self._prefetched))
            return room, wanted

    def _settle_swapped(self, wanted):
        """:meth:`_settle_and_claim` for threads, which keep adding outcomes while the claim runs."""
        with self._unsettled_lock:
            batch, self._unsettled = self._unsettled, []
        try:
            claimed, settled, token, due = self.transport.claim_batch(self.queues, self.worker_id, batch, wanted)
        except BaseException:
            with self._unsettled_lock:  # written by the next claim
                self._unsettled[:0] = batch
            raise
        for outcome, ok in zip(batch, settled):
            if not ok:
                self._refused(outcome)
        return claimed, token, due

    def _replay_loop(self, started):
        # A replay killed on this host left its message claimed: give it back now, not at the first reap,
        # or this pass would skip it (a claimed message is someone else's).
        with contextlib.suppress(StorageError):
            gone = _gone_workers(self.transport.workers(), self)
            if gone:
                self.transport.release_workers(dict.fromkeys(gone))
        pending = self._replay_ids()
        _log.info("replaying %d failed message(s), oldest first", len(pending))
        outcome = None
        while True:
            reason = self._limit_reached(started)
            if reason:
                self.stop(reason)
            if self._stop_reason is not None:
                return outcome
            delivery = None
            try:
                while pending and delivery is None:
                    delivery, settled = self.transport.claim_failed(pending[0], self.worker_id, outcome)
                    outcome = None
                    pending.pop(0)
                if delivery is None:
                    self.transport.claim_failed(None, self.worker_id, outcome)
                    self.stop("every failed message was replayed once")
                    return None
            except StorageError as exc:
                _log.error("%s; retrying in 1s", exc)
                self._waiter.sleep(1.0)
                continue
            self.processed += 1
            outcome = self._process(delivery, self._lanes[0])

    def _idle(self, token, due, started):
        self._log_stop_signal()
        timeout = min(max(self.sleep, 0.01), 3600.0)  # commits wake us anyway; never spin
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        if self.time_limit is not None:
            timeout = min(timeout, max(0.0, self.time_limit - (time.monotonic() - started)))
        try:
            self._waiter.wait(token, timeout, lambda: self._stop_reason is not None, self.queues)
        except JobRunnerError as exc:
            _log.error("waiting for messages: %s", exc)
            self._waiter.sleep(min(timeout, 1.0))

    def _idle_lane(self, token, due, started):
        """Threads: one idle lane waits for a commit; the others wait for it to come back, then all claim."""
        with self._idle_turn:
            generation = self._idle_generation
        if self._idle_lock.acquire(blocking=False):
            try:
                self._idle(token, due, started)
            finally:
                self._idle_lock.release()
                with self._idle_turn:
                    self._idle_generation += 1
                    self._idle_turn.notify_all()
        else:
            with self._idle_turn:
                self._idle_turn.wait_for(lambda: self._idle_generation != generation or self._stop_reason is not None,
                                         timeout=min(max(self.sleep, 0.01), 1.0))

    def _log_stop_signal(self):
        """Say, from the loop (never from a signal handler), that a stop was asked while a handler ran."""
        if self._stop_reason is not None and not self._stop_logged:
            self._stop_logged = True
            _log.info("stopping: %s", self._stop_reason)

    def _finish(self, outcome):
        """Settle the last outcomes, give back a batch never started, write the counts, leave; never raises."""
        with contextlib.suppress(JobRunnerError):
            counts = self.take_counts()
            if counts:
                self.transport.add_counts(counts)
        # prefetched and never started: back on the queue, their attempt given back
        unstarted = [_Outcome("release", delivery) for delivery in self._prefetched]
        if self.threads == 1:  # threads count a message when it starts
            self._give_back_slots(len(unstarted))
        self._settle_last(self._unsettled + [outcome] + unstarted)
        self._prefetched.clear()
        self._unsettled.clear()
        try:
            if self.worker_id is not None:
                self.transport.unregister_worker(self.worker_id, keep_row=bool(self.parent_pid))
        except JobRunnerError as exc:
            _log.error("could not unregister worker %s: %s", self.name, exc)
        if self.ping_file and self.exit_code == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.ping_file)

    def _register(self):
        self.started_at = time.time()
        self.worker_id = self.transport.register_worker(self.name, self.host, self.queues, self.started_at)

    # One message: decode, call, outcome

    def _process(self, delivery, lane):
        """Run one claimed message in ``lane``; return the outcome to settle (None when settled already)."""
        lane.cancelled = None
        handler, headers, payload, outcome = self._decode(delivery)
        if outcome is not None:
            return outcome
        lane.current = (delivery, handler, headers)
        if self.app._hooks["before"]:
            self.app._call_hooks("before", _hook_envelope(delivery, handler.name, headers, payload))
        started = time.perf_counter()
        conn = None
        try:
            if handler.transactional:
                try:
                    conn = self.transport.begin_handler()
                except StorageError as exc:
                    # contention or a lost connection (reopened by now) is nobody's failure: the handler has not
                    # run, so back on the queue with the attempt given back
                    _log.warning("message %d (%s): %s; back on the queue", delivery.id, handler.name, exc)
                    return _Outcome("release", delivery)
            failure = self._call(handler, payload, conn, lane)
            lost = conn is not None and failure is not None and not self.transport._usable(conn)
            acked = False
            if conn is not None:
                try:
                    # a cancelled message's transaction rolls back, whatever its handler did
                    ok = failure is None and lane.cancelled != delivery.id
                    acked = self.transport.finish_handler(conn, delivery, ok)
                except Exception as exc:
                    failure, acked = exc, False
                lane.holding = None if acked else lane.holding
            if lost:  # the database went away under the handler (a restart, a failover): nobody's failure
                failure = _lost_under_handler(failure)
            if isinstance(failure, _Cancelled) or lane.cancelled == delivery.id:
                return self._was_cancelled(delivery, handler, failure)
            if conn is not None:
                if failure is None:
                    if acked:
                        self._succeeded(delivery, handler, started, headers, payload)
                    else:
                        _log.warning("message %d: claim was released while handling it; its transaction was rolled "
                                     "back", delivery.id)
                    return None
            elif self.transport.abandon_transaction():
                failure = failure or StorageError("handler left a transaction open on the jobrunner connection; "
                                                  "rolled back")
            if failure is None:
                return self._succeeded(delivery, handler, started, headers, payload)
            return self._failed(delivery, handler.retry, handler.name, headers, failure, payload)
        except BaseException:
            # a second signal in mid-handler: leave nothing open behind us
            if conn is not None:
                with contextlib.suppress(Exception):
                    self.transport.finish_handler(conn, delivery, False)
            self.transport.abandon_transaction()
            lane.interrupted = delivery
            raise
        finally:
            lane.current = None

    def _was_cancelled(self, delivery, handler, failure):
        """A message cancelled while it ran is removed: neither retried nor failed."""
        self.transport.abandon_transaction()
        _log.warning("message %d (%s) was cancelled while it ran: %s", delivery.id, handler.name,
                     "interrupted" if failure is not None else "its handler had finished",
                     extra={"event": "cancelled", "message_id": delivery.id, "handler": handler.name})
        return _Outcome("ack", delivery)

    def _decode(self, delivery):
        """``(handler, headers, payload, None)``, or an outcome for a message that cannot run here."""
        headers = _decode_headers(delivery.headers)
        if headers is None:
            return None, None, None, self._poison(delivery, {"original_headers": _json_safe(delivery.headers)},
                                                  "headers are not a JSON object")
        name = headers.get("handler")
        if not isinstance(name, str):
            return None, None, None, self._poison(delivery, headers, "no handler named %r is registered" % (name,))
        handler = self.app.handlers.get(name)
        if handler is None:
            # During a rolling deploy only the new code may know it: retry, so that a newer worker gets it.
            error = InvalidMessage("no handler named %r is registered in this worker" % name)
            return None, None, None, self._failed(delivery, self.app.retry, name, headers, error)
        try:
            payload = _loads(delivery.body)
        except (TypeError, ValueError, RecursionError) as exc:
            return None, None, None, self._poison(delivery, headers, "body is not valid JSON (%s)" % exc)
        try:
            handler.check(payload)
        except InvalidMessage as exc:
            return None, None, None, self._poison(delivery, headers, str(exc))
        counted = delivery.attempts - _int_header(headers, "free_retries")
        if counted > handler.retry.max_retries + 1 and not self.replay:
            return None, None, None, self._poison(
                delivery, headers, "its last attempt never finished: the worker died, was killed or timed out during "
                "it (%d attempts)" % (counted - 1), error_class="WorkerDied", attempts=delivery.attempts - 1)
        return handler, headers, payload, None

    def _call(self, handler, payload, conn, lane):
        """Run the handler; return the exception its attempt failed with, or None."""
        kwargs = payload if conn is None else dict(payload, db=conn)
        lane.alarm_fired = False
        by_thread = not (lane.alarm and self._signals_installed)  # interrupted by the heartbeat, not by SIGALRM
        try:
            try:
                if conn is not None:
                    self.app._tx.conn = conn
                if by_thread:
                    lane.thread_id = threading.get_ident()
                    lane.open_interrupts()
                if handler.is_async:
                    self._run_coroutine(handler, kwargs, lane)
                else:
                    self._run_function(handler, kwargs, lane)
            finally:
                if by_thread:
                    lane.close_interrupts()
        except _TimedOutInThread:
            return HandlerTimeout("handler ran past its timeout of %gs" % handler.timeout)
        except _CancelledInThread:
            return _Cancelled("message %d was cancelled while it ran" % lane.cancelled)
        except _Interrupted as exc:
            return exc.error
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            if not isinstance(exc, Exception):
                if isinstance(exc, KeyboardInterrupt) and not self._signals_installed:
                    raise  # a real Ctrl-C in a host process that kept its own signal handling
                # raised by handler code, not a signal to this worker: a failed attempt, then stop and say why
                self.stop("handler %s raised %s" % (handler.name, _error_class(exc)), exit_code=1)
            return exc
        finally:
            if conn is not None:
                self.app._tx.conn = None
        if lane.alarm_fired or lane.interrupted_by is _TimedOutInThread:  # it caught the interruption, carried on
            return HandlerTimeout("handler ran past its timeout of %gs (and caught the interruption)" % handler.timeout)
        return None

    def _run_function(self, handler, kwargs, lane):
        lane.call_frame = sys._getframe()
        timeout = handler.timeout
        if not timeout:
            return handler.fn(**kwargs)
        lane.deadline = time.monotonic() + timeout
        armed = lane.alarm and self._signals_installed
        if armed:
            lane.alarm_armed = True
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return handler.fn(**kwargs)
        finally:
            if armed:
                lane.alarm_armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            lane.deadline = None

    def _run_coroutine(self, handler, kwargs, lane):
        import asyncio

        if lane.event_loop is None:
            lane.event_loop = asyncio.new_event_loop()
        loop = lane.event_loop
        task = lane.task = loop.create_task(handler.fn(**kwargs))
        timeout = handler.timeout
        if timeout:
            lane.deadline = time.monotonic() + timeout
        try:
            done, _ = loop.run_until_complete(asyncio.wait({task}, timeout=timeout))
            if not done:
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)  # let it clean up after its cancellation
                raise _Interrupted(HandlerTimeout("handler ran past its timeout of %gs" % timeout))
            if task.cancelled() and lane.cancelled is not None:
                raise _Interrupted(_Cancelled("message %d was cancelled while it ran" % lane.cancelled))
            return task.result()
        finally:
            lane.deadline = None
            lane.task = None
            if not task.done():
                task.cancel()

    def _count(self, delivery, name, column):
        now = time.time()
        if not self._minute <= now < self._minute + 60:
            self._minute = now // 60 * 60
        key = (self._minute, delivery.queue, name or "?")
        with self._counts_lock:  # lanes count from their own threads
            if column:
                self.failed += 1
            else:
                self.handled += 1
            row = self._counts.get(key)
            if row is None:
                row = self._counts[key] = [0, 0, 0]
            row[column] += 1

    def take_counts(self):
        """The outcomes counted since the last call, for the per-minute counters."""
        with self._counts_lock:
            counts, self._counts = self._counts, {}
        return counts

    def give_back_counts(self, counts):
        """Counts that could not be written: added again, for the next try."""
        with self._counts_lock:
            for key, values in counts.items():
                row = self._counts.setdefault(key, [0, 0, 0])
                for i, value in enumerate(values):
                    row[i] += value

    def _succeeded(self, delivery, handler, started, headers, payload):
        self._count(delivery, handler.name, 0)
        if _log.isEnabledFor(_VERBOSE):
            _log.log(_VERBOSE, "message %d handled by %s in %.1f ms (attempt %d)", delivery.id, handler.name,
                     (time.perf_counter() - started) * 1000, delivery.attempts,
                     extra={"event": "handled", "message_id": delivery.id, "handler": handler.name})
        if self.app._hooks["success"]:
            self.app._call_hooks("success", _hook_envelope(delivery, handler.name, headers, payload))
        return _Outcome("ack", delivery)

    def _failed(self, delivery, retry, name, headers, exc, payload=None):
        if self.replay:  # once more, and no more: it stays in the failure queue with this error added
            outcome = _fail_outcome(delivery, headers, _error_class(exc), str(exc), _format_exception(exc)[-_TRACEBACK_LIMIT:])
        else:
            outcome = _failure_outcome(delivery, retry, headers, exc)
        kind = "retry" if outcome.kind == "retry" else "failure"
        self._count(delivery, name, 1 if kind == "retry" else 2)
        if self.app._hooks[kind]:
            self.app._call_hooks(kind, _hook_envelope(delivery, name, headers, payload), exc)
        error = "%s: %s" % (_error_class(exc), exc)
        extra = {"event": kind, "message_id": delivery.id, "handler": name}
        if outcome.kind == "retry":
            _log.warning("message %d (%s) failed, attempt %d: %s; retrying in %.1fs", delivery.id, name,
                         delivery.attempts, error, max(0.0, outcome.available_at - time.time()), extra=extra)
        else:
            _log.error("message %d (%s) moved to the failure queue after %d attempt(s): %s", delivery.id, name,
                       delivery.attempts, error, extra=extra)
        _log.debug("traceback of message %d:\n%s", delivery.id, _format_exception(exc).rstrip())
        return outcome

    def _poison(self, delivery, headers, reason, error_class="InvalidMessage", attempts=None):
        name = headers.get("handler")
        self._count(delivery, name if isinstance(name, str) else None, 2)
        _log.error("message %d moved to the failure queue: %s", delivery.id, reason,
                   extra={"event": "failure", "message_id": delivery.id})
        if self.app._hooks["failure"]:
            name = headers.get("handler")
            self.app._call_hooks("failure", _hook_envelope(delivery, name if isinstance(name, str) else None, headers),
                                 InvalidMessage(reason))
        return _fail_outcome(delivery, headers, error_class, reason, None, reason=reason, attempts=attempts)


def _lost_under_handler(exc):
    """A transactional handler's connection died: retried whatever max_retries says, as its transaction went too."""
    return RecoverableError("the connection to the database was lost while the handler ran: %s: %s"
                            % (_error_class(exc), exc), retry_after=1.0)


def _hook_envelope(delivery, name, headers, payload=None):
    """The message as lifecycle hooks see it."""
    if payload is None:
        try:
            payload = json.loads(delivery.body)
        except (TypeError, ValueError, RecursionError):
            payload = delivery.body
    return Envelope(delivery.id, delivery.queue, name, payload, dict(headers), delivery.attempts, delivery.created_at,
                    delivery.available_at)


def _failure_outcome(delivery, retry, headers, exc):
    """Retry or fail after ``exc``, as the retry strategy and the exception say."""
    free = _int_header(headers, "free_retries")
    counted = delivery.attempts - free
    if not isinstance(exc, UnrecoverableError) and (isinstance(exc, RecoverableError) or counted <= retry.max_retries):
        wait = retry.wait(counted)
        if isinstance(exc, RecoverableError):
            free += 1
            if exc.retry_after is not None:
                wait = max(0.0, float(exc.retry_after))
        retried = dict(headers, attempts=delivery.attempts, last_error=_storable("%s: %s" % (_error_class(exc), exc)))
        if free:
            retried["free_retries"] = free
        return _Outcome("retry", delivery, time.time() + wait, _encode_headers(retried))
    return _fail_outcome(delivery, headers, _error_class(exc), _storable(str(exc)),
                         _format_exception(exc)[-_TRACEBACK_LIMIT:])


def _fail_outcome(delivery, headers, error_class, message, tb, reason=None, attempts=None):
    now = time.time()
    failed = dict(headers)
    if "error_class" in headers:  # failed before (`consume failed` replayed it): keep that error in its history
        history = headers.get("previous_errors")
        history = list(history) if isinstance(history, list) else []
        history.append({key: headers.get(key) for key in ("error_class", "error_message", "attempts", "failed_at")})
        failed["previous_errors"] = history
    original = headers.get("original_queue") if delivery.queue == FAILED_QUEUE else delivery.queue
    failed.update(
        original_queue=original if isinstance(original, str) else delivery.queue,
        error_class=error_class,
        error_message=message,
        traceback=tb,
        attempts=delivery.attempts if attempts is None else attempts,
        failed_at=now,
    )
    if reason:
        failed["reason"] = reason
    return _Outcome("fail", delivery, now, _encode_headers(failed))


def _touch(path):
    """Create (0600, never through a symlink) or touch a ping file: its age says when we were last alive."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _log.error("cannot touch ping file %s: %s", path, exc.strerror or exc)


def _expand_ping_file(template, name, pid):
    return os.path.abspath(template.replace("{name}", name).replace("{pid}", str(pid)))


def _stderr_is_a_terminal():
    try:
        return os.isatty(2)
    except OSError:
        return False


def _format_bytes(n):
    for unit, size in (("G", 1024 ** 3), ("M", _MIB), ("K", _KIB)):
        if n >= size:
            return "%.1f%s" % (n / size, unit)
    return "%dB" % n


def _gone_workers(rows, worker):
    """The ids of workers, other than ``worker``, registered from this host whose process is gone."""
    return {wid for wid, host, pid, _, _ in rows if host == worker.host and wid != worker.worker_id
            and not _pid_alive(pid)}


class _Heartbeat(threading.Thread):
    """Beats for its worker, relays ``stop-workers``, releases dead workers' claims and keeps the WAL bounded.

    A thread, so a slow handler keeps its claim however long it runs; a
    stopped or frozen process stops beating and loses it.
    """

    def __init__(self, worker):
        super().__init__(name="jobrunner-heartbeat", daemon=True)
        self.worker = worker
        self.transport = worker.transport
        self._stopped = threading.Event()
        self._identity = self.transport.identity()
        self._judge = _SilenceJudge(self.transport.settings.heartbeat_timeout)
        self._stuck_reported = False
        self._orphaned_at = None  # monotonic time the supervisor was found gone

    def stop(self):
        self._stopped.set()
        self.join(timeout=self.transport.settings.busy_timeout + 5)

    def run(self):
        try:
            self._run()
        finally:
            self.transport.close()  # this thread's connection

    def _run(self):
        settings = self.transport.settings
        try:
            self.transport.connection()  # held open: if the file is deleted, this connection can still save it
        except JobRunnerError as exc:
            _log.error("heartbeat: %s", exc)
        interval = settings.heartbeat_interval
        reap_every = max(interval, min(5.0, settings.heartbeat_timeout / 4))
        next_reap = time.monotonic() + reap_every
        writable_since = time.monotonic()
        failing = False
        while not self._stopped.wait(interval):
            now = time.monotonic()
            self.worker._announce_stop()
            self._check_stuck_handler(now)
            self._check_parent(now)
            if not self._check_database():
                return
            try:
                self._beat()
                beaten = time.monotonic()
                if failing:
                    _log.warning("database %s is writable again", self.transport.where)
                    writable_since, failing = beaten, False
                elif beaten - now > interval:
                    writable_since = beaten  # the beat waited for the write lock: nobody else could beat either
                    self._judge.forgive(beaten)
                now = beaten
                if now >= next_reap and now - writable_since >= 2 * interval:
                    # only once every live worker has had the chance to beat after an outage
                    next_reap = now + reap_every
                    self._reap()
            except JobRunnerError as exc:
                if not failing:
                    _log.error("heartbeat failed: %s", exc)
                failing = True
                self._judge.forgive()
                self.transport.reconnect()

    def _beat(self):
        worker = self.worker
        running = [lane.current[0].id for lane in worker._lanes if lane.current is not None]
        if worker.ping_file:
            _touch(worker.ping_file)
        alive, stop_at = self.transport.beat(worker.worker_id, worker.handled, worker.failed, _rss_bytes(),
                                             running[0] if running else None)
        for message_id in running:
            if self.transport.is_cancelled(message_id):
                worker.cancel_current(message_id)
        worker.look_for_cancels_ahead()
        worker.settle_held()
        counts = worker.take_counts()
        if counts:
            try:
                self.transport.add_counts(counts)
            except JobRunnerError:
                worker.give_back_counts(counts)
                raise
        if not alive:
            # Declared dead (frozen past the timeout): our claim was released, and our ack would be refused.
            worker.stop("this worker was declared dead after missing its heartbeats", exit_code=1)
        elif stop_at is not None and stop_at >= worker.started_at:
            worker.stop("stop-workers was requested")

    def _reap(self):
        """Release the claims of workers whose process is gone from this host, or whose beats stopped."""
        worker = self.worker
        rows = self.transport.workers()
        gone = _gone_workers(rows, worker)
        silent = self._judge.silent({wid: beats for wid, _, _, _, beats in rows if wid != worker.worker_id})
        dead = {wid: beats for wid, _, _, _, beats in rows if wid in silent}
        dead.update((wid, None) for wid in gone)
        if dead or self.transport.has_unowned_claims():
            ids, released = self.transport.release_workers(dead)
            if ids or released:
                _log.warning("released %d message(s) claimed by %d dead worker(s)", released, len(ids))
        # One process keeps the WAL bounded: the supervisor, or else the standalone worker with the smallest id.
        if not worker.parent_pid and worker.worker_id == min(wid for wid, *_ in rows if wid not in dead):
            self.transport.maintain()

    def _check_stuck_handler(self, now):
        stuck = None
        for lane in self.worker._lanes:
            deadline, current = lane.deadline, lane.current
            if deadline is None or current is None or now < deadline:
                continue
            if lane.task is None and not (lane.alarm and self.worker._signals_installed):
                lane.interrupt(_TimedOutInThread)  # a thread's handler: no alarm reaches it, this does
            if now >= deadline + _STUCK_GRACE_S:
                stuck = current
        if stuck is None:
            self._stuck_reported = False
            return
        worker = self.worker
        delivery, handler, _ = stuck
        if not worker.owns_process:
            if not self._stuck_reported:  # a host process's thread: its process is not ours to end
                self._stuck_reported = True
                _log.error("message %d (%s) is stuck past its timeout of %gs where Python cannot interrupt it",
                           delivery.id, handler.name, handler.timeout)
            return
        # Its claim goes back on the queue with this attempt counted (released by the supervisor or a reaper).
        _log.critical("message %d (%s): handler stuck past its timeout of %gs where Python cannot interrupt it; "
                      "exiting so it can be retried", delivery.id, handler.name, handler.timeout)
        if worker.threads > 1:  # the other threads' messages did nothing wrong: back with their attempts uncounted
            with contextlib.suppress(JobRunnerError):
                self.transport.release_own(worker.worker_id, [delivery.id])
        logging.shutdown()
        os._exit(70)

    def _check_parent(self, now):
        """An orphan finishes its message within its stop timeout, beating meanwhile so that no one takes it."""
        parent = self.worker.parent_pid
        if not parent or os.getppid() == parent:
            return
        if self._orphaned_at is None:
            self._orphaned_at = now
            self.worker.stop("the supervisor (pid %d) is gone" % parent)
        grace = self.worker.stop_timeout
        if now - self._orphaned_at >= grace and self.worker._busy() is not None and self.worker.owns_process:
            _log.error("still busy %gs after the supervisor died; exiting, the message will be delivered again", grace)
            logging.shutdown()
            os._exit(1)

    def _check_database(self):
        if self._identity is None or self.transport.identity() == self._identity:
            return True
        # This connection still holds the old file open: copy its messages out before stopping.
        saved = self.transport.save_unlinked()
        self.worker.stop("database file %s was deleted or replaced; %s" % (
            self.transport.where, "its messages were saved to %s" % saved if saved else "it could not be saved"),
            exit_code=1)
        return False


class Scheduler:
    """Enqueues the messages of the app's periodic handlers at their ticks.

    Any number may run, on any number of hosts: each tick is enqueued once
    (a compare-and-set on the schedule's last tick, in the transaction that
    stores the message).  It registers and beats like a worker, so `status`,
    `health` and the supervisor see it.
    """

    def __init__(self, app, *, name="schedule", install_signals=True, parent_pid=None, owns_process=False,
                 on_ready=None):
        if not app.schedules:
            raise ConfigurationError("the app has no periodic handler (@jobs.periodic) to schedule")
        self.app = app
        self.transport = app.transport
        self.name = name
        self.install_signals = install_signals
        self.parent_pid = parent_pid
        self.owns_process = owns_process
        self.on_ready = on_ready
        self.host = _host_identity()
        self.worker_id = None
        self.enqueued = 0
        self.exit_code = 0
        self._stop_reason = None
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        self._seen = {}  # schedule name -> the latest tick this process dealt with

    def stop(self, reason="asked to stop", exit_code=0):
        if self._stop_reason is None:
            self._stop_reason, self.exit_code = reason, exit_code
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"!")

    def _on_signal(self, signum, frame):
        self.stop("received %s" % signal.Signals(signum).name)

    def run(self):
        """Enqueue ticks until stopped; return why."""
        previous = {}
        if self.install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        started_at = time.time()
        try:
            self.worker_id = self.transport.register_worker(self.name, self.host, [], started_at)
            _log.info("scheduler %s (pid %d) scheduling %s on %s", self.name, os.getpid(),
                      ", ".join("%s %s" % (n, s) for n, s in sorted(self.app.schedules.items())), self.transport.where,
                      extra={"event": "started"})
            if self.on_ready is not None:
                self.on_ready()
            self._loop(started_at)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.worker_id is not None:
                with contextlib.suppress(JobRunnerError):
                    self.transport.unregister_worker(self.worker_id, keep_row=bool(self.parent_pid))
            for fd in (self._wake_read, self._wake_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
        _log.log(logging.INFO if self.exit_code == 0 else logging.ERROR, "scheduler %s stopped: %s (%d enqueued)",
                 self.name, self._stop_reason, self.enqueued, extra={"event": "stopped"})
        return self._stop_reason

    def _loop(self, started_at):
        interval = self.transport.settings.heartbeat_interval
        next_beat = 0.0
        while self._stop_reason is None:
            if self.parent_pid and os.getppid() != self.parent_pid:
                self.stop("the supervisor (pid %d) is gone" % self.parent_pid)
                break
            now = time.time()
            try:
                self._tick(now)
                if time.monotonic() >= next_beat:
                    alive, stop_at = self.transport.beat(self.worker_id, self.enqueued, 0, _rss_bytes(), None)
                    next_beat = time.monotonic() + interval
                    if not alive:
                        self.stop("this scheduler was declared dead after missing its heartbeats", exit_code=1)
                    elif stop_at is not None and stop_at >= started_at:
                        self.stop("stop-workers was requested")
            except JobRunnerError as exc:
                _log.error("scheduler: %s", exc)
                self.transport.reconnect()
            soonest = min(schedule.next_after(now) for schedule in self.app.schedules.values())
            wait = max(0.0, min(soonest - time.time(), next_beat - time.monotonic()))
            if select.select([self._wake_read], [], [], wait)[0]:
                _drain_fd(self._wake_read)

    def _tick(self, now):
        for name, schedule in self.app.schedules.items():
            tick = schedule.latest_at_or_before(now)
            if tick is None or self._seen.get(name, -math.inf) >= tick:
                continue
            message_id = self.transport.enqueue_tick(name, tick, self.app._tick_message(name, tick))
            self._seen[name] = tick
            if message_id is not None:
                self.enqueued += 1
                _log.log(_VERBOSE, "schedule %s: message %d for its tick at %s", name, message_id,
                         _format_tick(tick, schedule.tz), extra={"event": "scheduled", "message_id": message_id,
                                                                 "handler": name})


def _format_tick(tick, tz):
    import datetime

    return datetime.datetime.fromtimestamp(tick, _zone(tz)).isoformat(timespec="seconds")



# --- The supervisor -----------------------------------------------------------------

_AUTORESTART = ("true", "false", "unexpected")
_SUPERVISOR_STALE_S = 10.0
_TAIL_LINES = 20  # lines of a worker's output copied into supervisor.log when it fails to start
_SCHEDULER_RETRY_S = 30  # how often a supervisor without the scheduler's lock tries to take it


@dataclasses.dataclass
class ProgramConfig:
    """One group of identical workers, as a ``[program:NAME]`` section of supervisord describes it."""

    name: str
    queues: list
    numprocs: int = 1
    limit: int = None
    failure_limit: int = None
    memory_limit: int = None
    time_limit: float = None
    sleep: float = 1.0
    verbosity: int = 0
    autorestart: str = "true"
    startsecs: float = 10.0
    startretries: int = 3
    stopwaitsecs: float = 10.0
    log_max_bytes: int = 10 * _MIB
    log_backups: int = 3
    #: variables added to the workers' environment, as supervisord's ``environment=``
    environment: dict = dataclasses.field(default_factory=dict)
    #: the workers' working directory, as supervisord's ``directory=``
    directory: str = None
    #: ``text`` or ``json`` (one object per line, for log shippers)
    log_format: str = "text"
    #: ``worker``, or ``scheduler`` (the supervisor adds it for an app with periodic handlers)
    kind: str = "worker"
    #: handlers run at once in each process, each in its own thread
    threads: int = 1
    #: messages each worker claims at once (fast handlers: one write per batch, up to N duplicates a kill)
    prefetch: int = 1

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name or ""):
            raise ConfigurationError("invalid program name %r: letters, digits, '_', '.', '-'" % (self.name,))
        self.queues = list(self.queues)  # empty: every queue of the app, learnt when the supervisor starts
        if (self.name == "scheduler") != (self.kind == "scheduler"):
            raise ConfigurationError("program name scheduler is the supervisor's own (it runs the app's schedule)")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigurationError("log format must be text or json, not %r" % (self.log_format,))
        if self.directory is not None and not os.path.isdir(self.directory):
            raise ConfigurationError("program %s: directory %s does not exist" % (self.name, self.directory))
        for queue in self.queues:
            _check_queue_name(queue)
        if FAILED_QUEUE in self.queues:
            raise ConfigurationError("program %s: consume %s stops after one pass, so a supervisor would restart it "
                                     "in a loop; run it by hand or from cron" % (self.name, FAILED_QUEUE))
        if self.autorestart not in _AUTORESTART:
            raise ConfigurationError("autorestart must be true, false or unexpected, not %r" % (self.autorestart,))
        for key in ("numprocs", "threads", "prefetch", "startretries", "log_backups", "log_max_bytes"):
            value, least = getattr(self, key), 1 if key in ("numprocs", "threads", "prefetch") else 0
            if not isinstance(value, int) or value < least:
                raise ConfigurationError("%s of program %s must be a whole number >= %d, not %r"
                                         % (key, self.name, least, value))
        if self.threads > _MAX_THREADS:
            raise ConfigurationError("threads of program %s must be at most %d, not %d"
                                     % (self.name, _MAX_THREADS, self.threads))
        if self.prefetch > _MAX_PREFETCH:
            raise ConfigurationError("prefetch of program %s must be at most %d, not %d"
                                     % (self.name, _MAX_PREFETCH, self.prefetch))
        for key in ("limit", "failure_limit", "memory_limit", "time_limit"):
            if getattr(self, key) == 0:
                raise ConfigurationError("program %s: --%s 0 would restart its workers in a loop"
                                         % (self.name, key.replace("_", "-")))
        for key in ("startsecs", "stopwaitsecs"):
            if not getattr(self, key) >= 0:
                raise ConfigurationError("%s of program %s must be >= 0" % (key, self.name))


def _set_parent_death_signal(sig):
    """Linux: have the kernel send ``sig`` when the supervisor dies, even by SIGKILL."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


class _RotatingLog:
    """An append-only file rotated by size into ``.1`` ... ``.N``, created 0600, never through a symlink."""

    def __init__(self, path, max_bytes, backups):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.fd = None
        self._open()

    def _open(self):
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigurationError("log file %s is a symbolic link: refusing to follow it" % self.path) from None
            raise ConfigurationError("cannot open log file %s: %s" % (self.path, exc.strerror or exc)) from None
        self.size = os.fstat(self.fd).st_size

    def write(self, data):
        """Append ``data``; rotate first whenever the file would pass max_bytes, splitting at line ends."""
        if self.fd is None:
            self._open()  # a rotation failed (its directory removed?): try again with each write
        while self.max_bytes and self.size + len(data) > self.max_bytes:
            room = self.max_bytes - self.size
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if not cut and not self.size:
                cut = room  # one line longer than a whole file: split it
            if cut:
                self._write(data[:cut])
                data = data[cut:]
            self.rotate()
        if data:
            self._write(data)

    def _write(self, data):
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.size += written

    def rotate(self):
        self.close()  # never keep a closed fd's number: another pipe or file may get it next
        try:
            # a file removed under us (its directory removed and made again) is simply started anew
            with contextlib.suppress(FileNotFoundError):
                if self.backups:
                    for i in range(self.backups - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.replace("%s.%d" % (self.path, i), "%s.%d" % (self.path, i + 1))
                    os.replace(self.path, self.path + ".1")
                else:
                    os.truncate(self.path, 0)
        finally:
            self._open()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _LogHandler(logging.Handler):
    """logging into a :class:`_RotatingLog`."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def emit(self, record):
        try:
            self.log.write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)


class _PrefixedOutput:
    """A worker's output on the supervisor's stdout, each line prefixed with its name, as docker-compose does."""

    def __init__(self, name):
        self.prefix = ("%s | " % name).encode()
        self._partial = b""

    def write(self, data):
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if lines:
            os.write(1, b"".join(self.prefix + line + b"\n" for line in lines))

    def close(self):
        if self._partial:
            os.write(1, self.prefix + self._partial + b"\n")
            self._partial = b""


class _Pipe:
    """One pipe the supervisor reads: a worker's output, or its readiness note.

    Keyed by its own fd, not by the process: a grandchild may keep a dead
    worker's output pipe open long after a new worker took its place.
    """

    def __init__(self, fd, proc, pid, kind):
        self.fd, self.proc, self.pid, self.kind = fd, proc, pid, kind


class _Process:
    """One worker process of a program, with supervisord's state machine.

    A worker is STARTING until it says it is ready (app imported, database
    open, registered); only an exit before that counts toward
    ``startretries``.  :meth:`transition` is the one place that decides what
    the supervisor does next; the supervisor only reports events to it.
    """

    STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL = (
        "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")

    def __init__(self, program, index, on_change):
        self.program = program
        self.name = "%s_%02d" % (program.name, index)
        self.state = self.STOPPED
        self.state_since = time.time()
        self.on_change = on_change
        self.pid = None
        self.ready = False
        self.backoff = 0
        self.delay = 0.0  # monotonic time of the next start attempt while in BACKOFF
        self.laststart = 0.0  # monotonic
        self.started_at = None  # wall clock, for uptime
        self.kill_at = None
        self.start_timed_out = False
        self.exit_status = None
        self.description = ""
        self.restart_requested = False
        self.last_beats = None  # the worker's beat count last seen by the supervisor
        self.log = None
        self.log_failing = False
        self.tail = collections.deque(maxlen=_TAIL_LINES)
        self.retired = False  # a reloaded config no longer has it

    def change(self, state, description="", quiet=False):
        if state != self.state:
            old, self.state = self.state, state
            self.state_since = time.time()
            if not quiet:
                self.on_change(self, old, state, description)
        self.description = description

    def spawned(self, pid, now):
        self.pid, self.laststart, self.started_at = pid, now, time.time()
        self.ready = self.start_timed_out = self.restart_requested = False
        self.exit_status = self.last_beats = None
        self.tail.clear()
        if self.program.startsecs == 0:  # as supervisord: no wait at all
            self.ready = True
            self.change(self.RUNNING, "")
        else:
            self.change(self.STARTING, "")

    def became_ready(self):
        self.ready = True
        if self.state == self.STARTING:
            self.backoff = 0
            self.change(self.RUNNING, "ready")

    def exited(self, status, now, stopping):
        """The process was reaped: decide between STOPPED, EXITED, BACKOFF and FATAL."""
        code = os.waitstatus_to_exitcode(status)
        self.exit_status, self.pid, self.kill_at = code, None, None
        how = "exit status %d" % code if code >= 0 else "killed by %s" % signal.Signals(-code).name
        if self.state == self.STOPPING and self.restart_requested and not stopping:
            self.backoff = 0
            self.change(self.EXITED, "restarted (%s)" % how, quiet=True)
        elif self.state == self.STOPPING or stopping:
            self.change(self.STOPPED, "stopped (%s)" % how, quiet=True)
        elif not self.ready:
            self.backoff += 1
            self.delay = now + self.backoff
            why = "not ready within %gs" % self.program.startsecs if self.start_timed_out else "exited before it was ready"
            if self.backoff > self.program.startretries:
                self.change(self.FATAL, "%s %d times; see %s.log" % (why, self.backoff, self.name), quiet=True)
            else:
                self.change(self.BACKOFF, "%s (%s); see %s.log" % (why, how, self.name), quiet=True)
        elif code == 0:
            # a worker exits 0 when it reached a limit or was asked to stop: recycle it
            self.restart_requested = True
            self.change(self.EXITED, "exited (%s; expected)" % how, quiet=True)
        else:
            self.backoff = 0
            self.change(self.EXITED, "exited (%s; not expected)" % how, quiet=True)
        return how

    def transition(self, now, running):
        """Return ``"spawn"`` or ``"kill"`` when the supervisor must act, else None."""
        program = self.program
        state = self.state
        if state == self.STARTING and not self.start_timed_out and now - self.laststart >= program.startsecs:
            self.start_timed_out = True
            return "kill"
        if state == self.STOPPING and self.kill_at is not None and now >= self.kill_at:
            return "kill"
        if not running:
            if state == self.BACKOFF:
                self.change(self.STOPPED, self.description)
            return None
        if state == self.BACKOFF and now >= self.delay:
            return "spawn"
        if state == self.EXITED:
            if self.restart_requested or program.autorestart == "true" or (
                    program.autorestart == "unexpected" and self.exit_status != 0):
                return "spawn"
        elif state == self.STOPPED and self.laststart == 0.0:
            return "spawn"
        return None


def _check_programs(programs):
    if not programs:
        raise ConfigurationError("nothing to supervise: give queues or a config file with [program:...] sections")
    names = [p.name for p in programs]
    if len(set(names)) != len(names):
        raise ConfigurationError("two programs share a name: %s" % ", ".join(sorted(names)))


class Supervisor:
    """Keeps ``numprocs`` workers of each program running, as ``supervisord -n`` does.

    It forks the workers from its single thread and holds no database
    connection when it does; each child imports the app itself, so a restart
    (SIGHUP, ``stop-workers``, a limit) loads the code anew.  Signals:
    SIGTERM/SIGINT stop everything gracefully, SIGHUP restarts the workers.
    Exits 0 after a stop, 1 when every process is FATAL.
    """

    def __init__(self, programs, *, app_spec, dsn=None, log_dir="var/log", settings_overrides=None, config_path=None,
                 log_format="text", log_max_bytes=10 * _MIB, log_backups=3, scheduler=True, ping_file=None):
        _check_programs(programs)
        self.programs = programs
        self.app_spec = app_spec
        self.dsn = dsn
        self.settings_overrides = settings_overrides or {}
        #: ``-`` sends every log line to stdout, each worker's prefixed with its name (for containers)
        self.log_stdout = log_dir == "-"
        self.log_dir = None if self.log_stdout else os.path.abspath(log_dir)
        self.log_format = log_format
        self.log_max_bytes, self.log_backups = log_max_bytes, log_backups
        #: re-read on SIGHUP: what changed is applied, an invalid file is refused and the running one kept
        self.config_path = config_path
        #: run the app's schedule (one scheduler per database: the supervisor that holds its lock runs it)
        self.run_scheduler = scheduler
        #: with {name}/{pid}, each worker's; else one file the supervisor touches while all is RUNNING
        self.ping_file = os.path.abspath(ping_file) if ping_file else None
        self._ping_each = bool(ping_file) and ("{name}" in ping_file or "{pid}" in ping_file)
        self._next_ping = 0.0
        self._want_scheduler = False
        self._app_schedules = []
        self._next_scheduler_try = 0.0
        self._told_scheduler_elsewhere = False
        self.processes = [_Process(p, i, self._state_changed) for p in programs for i in range(p.numprocs)]
        self.host = _host_identity()
        self.settings = None
        self.transport = None
        self._stopping = False
        self._stop_signal = None
        self._restart_all = False
        self._locks = {}  # program name -> its lock
        self._selector = None
        self._wakeup = None
        self._pipes = {}  # fd -> _Pipe
        self._last_sync = 0.0
        self._synced = None  # the states last written for `status`
        self._reaped = set()  # pids reaped whose claims are still to release
        self._removed = []  # names of retired processes whose rows are still to delete
        self._judge = None
        self._log = logging.getLogger("jobrunner.supervisor")

    # Start-up

    def run(self):
        """Supervise until SIGTERM or SIGINT, or until every process is FATAL; return the exit code."""
        self.settings, app_queues = self._preflight(self.programs)
        for program in self.programs:
            program.queues = program.queues or list(app_queues)
        if self.run_scheduler and self._app_schedules:
            self._want_scheduler = True
        self.transport = _open_transport(self.settings)
        self._judge = _SilenceJudge(self.settings.heartbeat_timeout)
        self._acquire_locks(self.programs)
        if not self.log_stdout:
            _make_private_dir(self.log_dir)
        self._setup_logging()
        self._setup_signals()
        import selectors

        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup[0], selectors.EVENT_READ, None)
        self._log.info("supervisor (pid %d) started: %s; database %s; logs %s", os.getpid(),
                       ", ".join("%s x%d [%s]" % (p.name, p.numprocs, " ".join(p.queues)) for p in self.programs),
                       self.transport.where, "on stdout" if self.log_stdout else "in %s" % self.log_dir)
        code = 0
        try:
            self._sync_database(force=True, first=True)
            if self.transport.created:
                self._log.warning("created a new, empty database at %s: is it the one your app dispatches to? (check "
                                  "--dsn, JOBRUNNER_DSN and the directory this runs in)", self.transport.where)
            code = self._loop()
        finally:
            self._sync_database(force=True, last=True)
            for pipe in list(self._pipes.values()):
                self._close_pipe(pipe)
            for proc in self.processes:
                if proc.log:
                    proc.log.close()
            for lock in self._locks.values():
                lock.release()
            self._log.info("supervisor stopped")
        return code

    def _preflight(self, programs):
        """Import the app in a throwaway child: fail fast on a bad app or queue; return the settings and app queues."""
        read_fd, write_fd = os.pipe()
        _flush_std_streams()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_fd)
                app = _load_app(self.app_spec)
                if self.dsn or self.settings_overrides:
                    app.use_dsn(self.dsn, **self.settings_overrides)
                for program in programs:
                    app.check_queues(program.queues)
                    if not program.queues and not app.queues:
                        raise ConfigurationError("program %s: the app routes no handler to any queue" % program.name)
                message = json.dumps({"ok": dataclasses.asdict(app.settings), "queues": app.queues,
                                      "schedules": sorted(app.schedules)})
            except BaseException as exc:
                message = json.dumps({"error": str(exc) if isinstance(exc, JobRunnerError) else "%s: %s" % (_error_class(exc), exc)})
                code = 2
            os.write(write_fd, message.encode())
            os._exit(code)
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        try:
            answer = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            answer = {}
        if "ok" not in answer:
            code = os.waitstatus_to_exitcode(status)
            how = "exit status %d" % code if code >= 0 else "killed by %s" % signal.Signals(-code).name
            raise ConfigurationError(answer.get("error") or "the app could not be loaded (the process checking it: %s)"
                                     % how)
        self._app_schedules = answer.get("schedules", [])
        return Settings(**answer["ok"]), answer["queues"]

    def _acquire_locks(self, programs):
        """One supervisor per program and database: hold the program's lock, or refuse to start it."""
        taken = {}
        for program in programs:
            if program.name in self._locks:
                continue
            lock = self.transport.program_lock(program.name)
            if not lock.acquire():
                for held in taken.values():
                    held.release()
                raise ConfigurationError("another supervisor already runs program %s on %s (lock %s)"
                                         % (program.name, self.transport.where, lock.name))
            taken[program.name] = lock
        self._locks.update(taken)

    def _setup_logging(self):
        if self.log_stdout:
            handler = logging.StreamHandler(sys.stdout)
        else:
            handler = _LogHandler(_RotatingLog(os.path.join(self.log_dir, "supervisor.log"), self.log_max_bytes,
                                               self.log_backups))
        handler.setFormatter(_log_formatter("supervisor", self.log_format))
        self._log.addHandler(handler)
        self._log.setLevel(logging.INFO)
        self._log.propagate = False
        self._log_handler = handler
        for proc in self.processes:
            self._open_log(proc)

    def _open_log(self, proc):
        if self.log_stdout:
            proc.log = _PrefixedOutput(proc.name)
        else:
            proc.log = _RotatingLog(os.path.join(self.log_dir, proc.name + ".log"), proc.program.log_max_bytes,
                                    proc.program.log_backups)

    def _setup_signals(self):
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *a: None)  # a handler, so SIGCHLD wakes the loop

    # Signal handlers only set flags: the loop logs and acts (logging here could re-enter a rotating log).

    def _on_stop_signal(self, signum, frame):
        self._stop_signal = self._stop_signal or signum

    def _on_hup(self, signum, frame):
        self._restart_all = True

    def _state_changed(self, proc, old, new, description):
        level = logging.WARNING if new in (_Process.BACKOFF, _Process.FATAL) else logging.INFO
        self._log.log(level, "%s: %s -> %s%s", proc.name, old, new, " (%s)" % description if description else "")

    # The loop

    def _loop(self):
        while True:
            now = time.monotonic()
            self._reap(now)
            if self._stop_signal is not None and not self._stopping:
                self._log.info("received %s: stopping all workers", signal.Signals(self._stop_signal).name)
                self._stopping = True
            if self._restart_all:
                self._restart_all = False
                self._request_restart()
            if self._stopping:
                self._begin_stop(now)
            elif self._want_scheduler and now >= self._next_scheduler_try:
                self._start_scheduler(now)
            self._retire(now)
            for proc in self.processes:
                action = proc.transition(now, not self._stopping and not proc.retired)
                if action == "spawn":
                    self._spawn(proc)
                elif action == "kill":
                    if proc.state == _Process.STARTING:
                        self._log.warning("%s (pid %d) not ready within %gs: SIGKILL", proc.name, proc.pid,
                                          proc.program.startsecs)
                    else:
                        self._log.warning("%s (pid %d) did not stop within %gs: SIGKILL", proc.name, proc.pid,
                                          proc.program.stopwaitsecs)
                        proc.kill_at = None
                    self._kill(proc)
            self._sync_database(force=self._states() != self._synced or bool(self._reaped or self._removed))
            if self.ping_file and not self._ping_each and not self._stopping and now >= self._next_ping:
                self._next_ping = now + 1.0
                if self.processes and all(p.state == _Process.RUNNING for p in self.processes):
                    _touch(self.ping_file)
            if self._stopping and all(p.pid is None for p in self.processes):
                if self.ping_file and not self._ping_each:
                    with contextlib.suppress(OSError):
                        os.unlink(self.ping_file)
                return 0
            workers = [p for p in self.processes if p.program.kind != "scheduler"]  # the schedule alone runs no job
            if workers and all(p.state == _Process.FATAL for p in workers):
                self._log.error("every process is FATAL: exiting so that systemd or the container runtime takes over")
                return 1
            self._wait(self._next_timeout(now))

    def _states(self):
        return [(p.state, p.pid) for p in self.processes]

    def _next_timeout(self, now):
        timeout = 1.0
        for proc in self.processes:
            if proc.state == _Process.BACKOFF:
                timeout = min(timeout, max(0.0, proc.delay - now))
            elif proc.state == _Process.STARTING:
                timeout = min(timeout, max(0.0, proc.laststart + proc.program.startsecs - now))
            elif proc.state == _Process.STOPPING and proc.kill_at is not None:
                timeout = min(timeout, max(0.0, proc.kill_at - now))
        return max(timeout, 0.01)

    def _wait(self, timeout):
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                _drain_fd(self._wakeup[0])
            else:
                self._read_pipe(key.data)

    def _read_pipe(self, pipe, final=False):
        """Read what is there; at EOF, unregister and close the pipe (never read an fd twice after its EOF)."""
        while pipe.fd in self._pipes:
            try:
                data = os.read(pipe.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_pipe(pipe)
                return
            if pipe.kind == "ready":
                if pipe.proc.pid == pipe.pid:
                    pipe.proc.became_ready()
                continue
            pipe.proc.tail.extend(data.decode("utf-8", "replace").splitlines()[-_TAIL_LINES:])
            try:
                pipe.proc.log.write(data)
                pipe.proc.log_failing = False
            except (OSError, JobRunnerError) as exc:
                if not pipe.proc.log_failing:  # once, not once a line
                    self._log.error("cannot write %s.log: %s", pipe.proc.name, exc)
                pipe.proc.log_failing = True
            if not final:
                return

    def _close_pipe(self, pipe):
        if self._pipes.pop(pipe.fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(pipe.fd)
            os.close(pipe.fd)

    def _spawn(self, proc):
        import selectors

        out_read, out_write = os.pipe()
        ready_read, ready_write = os.pipe()
        _flush_std_streams()
        self.transport.close()  # connections must not cross fork
        supervisor_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (out_read, out_write, ready_read, ready_write):
                os.close(fd)
            proc.laststart = time.monotonic()
            proc.backoff += 1
            proc.delay = proc.laststart + proc.backoff
            proc.change(_Process.BACKOFF, "fork failed: %s" % exc)
            return
        if pid == 0:
            os.close(out_read)
            os.close(ready_read)
            self._child(proc, out_write, ready_write, supervisor_pid)  # never returns
        os.close(out_write)
        os.close(ready_write)
        for fd, kind in ((out_read, "output"), (ready_read, "ready")):
            os.set_blocking(fd, False)
            pipe = self._pipes[fd] = _Pipe(fd, proc, pid, kind)
            self._selector.register(fd, selectors.EVENT_READ, pipe)
        proc.spawned(pid, time.monotonic())
        self._log.info("spawned %s with pid %d", proc.name, pid)

    def _detach_child(self, write_fd, ready_fd, supervisor_pid):
        """A forked worker gets its own process group, default signals and its pipe for output.

        Returns the ready fd.
        """
        os.setpgid(0, 0)  # the terminal's Ctrl-C is for the supervisor, which stops us gracefully
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        _set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != supervisor_pid:  # it died before the signal was asked for: none will come
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        for handler in list(self._log.handlers):
            self._log.removeHandler(handler)
        ready = os.dup2(ready_fd, 3, inheritable=False)
        os.closerange(4, _max_fd())
        return ready

    def _child(self, proc, write_fd, ready_fd, supervisor_pid):
        code = 1
        try:
            ready = self._detach_child(write_fd, ready_fd, supervisor_pid)
            program = proc.program
            _configure_logging(program.verbosity, proc.name, log_format=program.log_format)
            logging.raiseExceptions = False  # a worker outliving its supervisor must not die of a broken pipe
            os.environ.update(program.environment)
            if program.directory:
                os.chdir(program.directory)
            app = _load_app(self.app_spec)
            # the database the supervisor resolved (a relative DSN must not move with `directory`)
            app.use_dsn(self.settings.dsn, **{k: v for k, v in dataclasses.asdict(self.settings).items()
                                              if k not in ("path", "url")})

            def say_ready():
                with contextlib.suppress(OSError):
                    os.write(ready, b"ready\n")
                    os.close(ready)

            if program.kind == "scheduler":
                worker = Scheduler(app, name=proc.name, parent_pid=supervisor_pid, owns_process=True, on_ready=say_ready)
            else:
                ping = _expand_ping_file(self.ping_file, proc.name, os.getpid()) if self._ping_each else None
                worker = Worker(app, program.queues, limit=program.limit, failure_limit=program.failure_limit,
                                memory_limit=program.memory_limit, time_limit=program.time_limit, sleep=program.sleep,
                                name=proc.name, parent_pid=supervisor_pid, stop_timeout=program.stopwaitsecs,
                                owns_process=True, on_ready=say_ready, ping_file=ping, threads=program.threads,
                                prefetch=program.prefetch)
            worker.run()
            code = worker.exit_code
        except JobRunnerError as exc:
            with contextlib.suppress(Exception):
                sys.stderr.write(getattr(exc, "details", ""))  # a failed app import: its traceback, then what it was
                sys.stderr.write("jobrunner: error: %s\n" % getattr(exc, "summary", exc))
            code = exc.exit_code
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
                _flush_std_streams()
            os._exit(code)

    def _reap(self, now):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            proc = next((p for p in self.processes if p.pid == pid), None)
            if proc is None:
                continue
            for pipe in [p for p in self._pipes.values() if p.pid == pid]:
                self._read_pipe(pipe, final=True)  # what it wrote before dying; a grandchild may keep it open
            was_ready = proc.ready
            how = proc.exited(status, now, self._stopping)
            level = logging.INFO if proc.exit_status == 0 or proc.state == _Process.STOPPED else logging.WARNING
            self._log.log(level, "%s (pid %d) %s -> %s%s", proc.name, pid, how, proc.state,
                          ": " + proc.description if proc.state == _Process.FATAL else "")
            if not was_ready and not self._stopping and proc.tail:
                self._log.warning("last lines of %s.log:\n    %s", proc.name, "\n    ".join(proc.tail))
            self._reaped.add(pid)  # its claims go back with the next sync, in this same loop turn

    def _signal(self, proc, sig):
        if proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _kill(self, proc):
        """SIGKILL a worker and its process group: what its handler started must not outlive it."""
        if proc.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self._signal(proc, signal.SIGKILL)

    def _request_restart(self):
        if self.config_path and not self._reload_config():
            return
        self._log.info("received SIGHUP: restarting all workers gracefully")
        now = time.monotonic()
        for proc in self.processes:
            if proc.retired:
                continue
            if proc.pid is not None and proc.state in (_Process.STARTING, _Process.RUNNING):
                # stopped like any other stop, once: a worker takes a second SIGTERM as "abort the message"
                proc.restart_requested = True
                proc.change(_Process.STOPPING, "restarting")
                proc.kill_at = now + proc.program.stopwaitsecs
                self._signal(proc, signal.SIGTERM)
            elif proc.state in (_Process.BACKOFF, _Process.FATAL, _Process.EXITED):
                proc.backoff = 0
                proc.restart_requested = True
                proc.change(_Process.EXITED, "restart requested")

    def _reload_config(self):
        """Read the config file again and apply what changed; False (and nothing changed) when it is invalid."""
        added = []
        try:
            programs, section = _read_config(self.config_path)
            _check_programs(programs)
            settings, app_queues = self._preflight(programs)
            if settings.dsn != self.settings.dsn:
                raise ConfigurationError("it names another database; restart the supervisor to change that")
            for program in programs:
                program.queues = program.queues or list(app_queues)
            current = {proc.name for proc in self.processes}
            for program in programs:
                for index in range(program.numprocs):
                    if "%s_%02d" % (program.name, index) not in current:
                        added.append(_Process(program, index, self._state_changed))
                        self._open_log(added[-1])
            self._acquire_locks(programs)
        except (JobRunnerError, OSError) as exc:
            for proc in added:
                if proc.log is not None:
                    proc.log.close()
            self._log.error("SIGHUP: %s: %s; keeping the running configuration", self.config_path,
                            " ".join(str(exc).split()))
            return False
        self._apply_programs(programs, added)
        self._log.info("SIGHUP: %s reloaded: %s", self.config_path,
                       ", ".join("%s x%d [%s]" % (p.name, p.numprocs, " ".join(p.queues)) for p in programs))
        return True

    def _apply_programs(self, programs, added):
        wanted = {p.name: p for p in programs}
        for proc in self.processes:
            if proc.program.kind == "scheduler":
                continue  # not in the config file: the supervisor's own
            program = wanted.get(proc.program.name)
            if program is None or int(proc.name.rsplit("_", 1)[1]) >= program.numprocs:
                proc.retired = True  # stopped now, removed once it is gone
                continue
            if proc.retired:  # wanted again before it was gone: it starts again once it has stopped
                proc.retired, proc.restart_requested = False, True
            proc.program = program
            if isinstance(proc.log, _RotatingLog):
                proc.log.max_bytes, proc.log.backups = program.log_max_bytes, program.log_backups
        self.processes.extend(added)
        for name in [name for name in self._locks if name not in wanted and name != "scheduler"]:
            self._locks.pop(name).release()
        self.programs = programs

    def _start_scheduler(self, now):
        """Run the app's schedule here, if no other supervisor does (its lock says); else look again later."""
        self._next_scheduler_try = now + _SCHEDULER_RETRY_S
        if any(p.program.kind == "scheduler" for p in self.processes):
            return
        lock = self.transport.program_lock("scheduler")
        try:
            held = lock.acquire()
        except JobRunnerError as exc:
            self._log.error("cannot take the scheduler's lock: %s", exc)
            return
        finally:
            self.transport.close()
        if not held:
            if not self._told_scheduler_elsewhere:
                self._log.info("the schedule runs under another supervisor on this database; looking again every %ds",
                               _SCHEDULER_RETRY_S)
                self._told_scheduler_elsewhere = True
            return
        program = ProgramConfig("scheduler", [], startretries=self.programs[0].startretries, kind="scheduler",
                                log_format=self.log_format)
        proc = _Process(program, 0, self._state_changed)
        try:
            self._open_log(proc)
        except JobRunnerError as exc:
            self._log.error("cannot run the schedule: %s", exc)
            lock.release()
            return
        self._locks["scheduler"] = lock
        self.processes.append(proc)
        self._log.info("running the schedule: %s", ", ".join(self._app_schedules))

    def _retire(self, now):
        """Stop the processes a reloaded config no longer has; forget them once they are gone."""
        for proc in [p for p in self.processes if p.retired]:
            if proc.pid is None:
                self.processes.remove(proc)
                proc.log.close()
                self._removed.append(proc.name)
            elif proc.state != _Process.STOPPING:
                proc.change(_Process.STOPPING, "removed from the configuration")
                proc.kill_at = now + proc.program.stopwaitsecs
                self._signal(proc, signal.SIGTERM)

    def _begin_stop(self, now):
        for proc in self.processes:
            if proc.pid is not None and proc.state != _Process.STOPPING:
                proc.change(_Process.STOPPING)
                proc.kill_at = now + proc.program.stopwaitsecs
                self._signal(proc, signal.SIGTERM)

    # What `status` and `health` read

    def _sync_database(self, force=False, first=False, last=False):
        now = time.monotonic()
        if not force and now - self._last_sync < 1.0:
            return
        self._last_sync = now
        interval = self.transport.settings.heartbeat_interval
        reaped, self._reaped = self._reaped, set()
        removed, self._removed = self._removed, []
        try:
            rows = [(p.name, p.program.name, p.state, p.pid, p.state_since, p.started_at, p.description, p.exit_status)
                    for p in self.processes]
            asked = time.monotonic()
            if last:
                self.transport.sync_processes(self.host, [], remove=[p.name for p in self.processes] + removed,
                                              reaped=reaped)
                return
            if first:  # rows a killed supervisor of this host left behind: nobody runs those processes now
                self.transport.connection()  # a writer, as its workers are: makes a new database, and says so
                stale = [row[0] for row in self.transport.status_rows()[0]
                         if row[2] == self.host and row[3] != os.getpid() and not _pid_alive(row[3])]
                removed = removed + stale
            released, children = self.transport.sync_processes(
                self.host, rows, clear_programs=[p.name for p in self.programs] if first else (), remove=removed,
                reaped=reaped)
            self._synced = self._states()
            if released:
                self._log.warning("released %d message(s) held by dead worker(s) %s", released,
                                  ", ".join(map(str, sorted(reaped))))
            if time.monotonic() - asked > interval:
                self._judge.forgive()  # the write lock was held (a long transaction): no worker could beat meanwhile
            self._kill_silent(children)
            self.transport.maintain()
        except JobRunnerError as exc:
            self._reaped |= reaped  # released on the next try
            self._removed += removed
            self._judge.forgive()
            self._log.error("cannot record process states: %s", exc)
        finally:
            self.transport.close()

    def _kill_silent(self, children):
        """SIGKILL a worker that stopped beating (hung, or SIGSTOPped): its message is retried elsewhere."""
        beats = {pid: count for pid, count in children.values()}
        counters = {}
        for proc in self.processes:
            if proc.pid is None or proc.state not in (_Process.RUNNING, _Process.STARTING, _Process.STOPPING):
                continue
            # another worker may have declared it dead and deleted its row: keep judging the last count seen
            proc.last_beats = beats.get(proc.pid, proc.last_beats)
            if proc.last_beats is not None:
                counters[proc.name] = (proc.pid, proc.last_beats)
        silent = self._judge.silent(counters)
        for proc in self.processes:
            if proc.name in silent and proc.pid is not None:
                self._log.error("%s (pid %d) has not beaten for %gs: killing it", proc.name, proc.pid,
                                self._judge.timeout)
                self._kill(proc)


def _max_fd():
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (ValueError, OSError):
        return 1024


def _make_private_dir(path):
    existed = os.path.isdir(path)
    try:
        _makedirs_private(path)
    except OSError as exc:
        raise ConfigurationError("cannot create log directory %s: %s" % (path, exc.strerror or exc)) from None
    if not os.access(path, os.W_OK):
        raise ConfigurationError("log directory %s is not writable" % path)
    if existed:
        _warn_if_shared_directory(path, "log")


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


_UNHEALTHY_STATES = (_Process.BACKOFF, _Process.FATAL, _Process.STOPPED, "UNKNOWN")


def _read_status(transport):
    """Every supervised process and standalone worker on this database, as ``status --json`` prints them."""
    procs, workers = transport.status_rows()
    # a row written by another tool may hold text where a number belongs: shown as unknown, not a traceback
    procs = [row[:3] + (_number(row[3]), row[4]) + tuple(_number(v) for v in row[5:9]) + row[9:] for row in procs]
    workers = [row[:2] + tuple(_number(v) for v in row[2:6]) + tuple(_number(v) or 0 for v in row[6:8])
               + (_number(row[8]),) + row[9:] for row in workers]
    now = time.time()
    by_pid = {(w[1], w[2]): w for w in workers}
    here = _host_identity()
    out, seen = [], set()
    for name, program, host, sup_pid, state, pid, since, started, updated, description, exit_status in procs:
        worker = by_pid.get((host, pid)) if pid else None
        if worker:
            seen.add((host, pid))
        stale = (updated is None or now - updated > _SUPERVISOR_STALE_S
                 or (host == here and not (isinstance(sup_pid, int) and _pid_alive(sup_pid))))
        out.append({
            "name": name,
            "program": program,
            "state": "UNKNOWN" if stale else state,
            "host": host,
            "pid": pid,
            "uptime_s": round(now - started, 1) if pid and started else None,
            "handled": worker[6] if worker else 0,
            "failed": worker[7] if worker else 0,
            "rss_bytes": worker[8] if worker else None,
            "beat_age_s": round(now - worker[5], 1) if worker and worker[5] is not None else None,
            "supervisor_pid": sup_pid,
            "exit_status": exit_status,
            "description": "supervisor (pid %s) is gone" % sup_pid if stale and host == here else
            "supervisor not responding for %.0fs" % (now - (updated or 0)) if stale else description,
        })
    for name, host, pid, ppid, started, beat, handled, failed, rss, queues in workers:
        if (host, pid) in seen:
            continue
        out.append({"name": name, "program": None, "state": "RUNNING", "host": host, "pid": pid,
                    "uptime_s": None if started is None else round(now - started, 1),
                    "handled": handled, "failed": failed, "rss_bytes": rss,
                    "beat_age_s": None if beat is None else round(now - beat, 1),
                    "supervisor_pid": None, "exit_status": None, "description": "standalone worker on %s" % queues})
    return {"processes": out}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def _judge_process(proc, timeout):
    """Why this process is unhealthy, or None.

    A planned restart is healthy: STARTING, and EXITED after exit status 0
    (a limit, SIGHUP, ``stop-workers``).  BACKOFF, FATAL, a crash and a
    silent worker are not.
    """
    state = proc["state"]
    about = "%s (pid %s)" % (proc["name"], proc["pid"]) if proc["pid"] else proc["name"]
    if proc["supervisor_pid"] is None:
        about = "worker " + about  # a standalone `consume`
    if state in _UNHEALTHY_STATES or (state == _Process.EXITED and proc.get("exit_status") != 0):
        return "%s is %s%s" % (proc["name"], state, ": " + proc["description"] if proc["description"] else "")
    if state == _Process.RUNNING:
        if proc["beat_age_s"] is None:
            return "%s is not registered as a worker" % about
        if proc["beat_age_s"] > timeout:
            return "%s has not beaten for %.0fs" % (about, proc["beat_age_s"])
    return None


def _check_health(transport, max_ready=None, max_failed=None, max_age=None, allow_no_workers=False, max_paused=None):
    """``(healthy, reasons, report)``: the database answers, workers live and beat, thresholds hold."""
    try:
        stats = transport.stats()
        status = _read_status(transport)
        paused = transport.paused() if max_paused is not None else {}
    except JobRunnerError as exc:
        return False, [str(exc)], {"queues": [], "processes": [], "failed": None}
    timeout = transport.settings.heartbeat_timeout
    reasons = [r for r in (_judge_process(p, timeout) for p in status["processes"]) if r]
    live = [p for p in status["processes"] if p["state"] in (_Process.RUNNING, _Process.STARTING)]
    if not live and not allow_no_workers:
        reasons.append("no worker is running on %s (--allow-no-workers if that is expected)" % transport.where)
    ready = sum(q["ready"] for q in stats["queues"])
    if max_ready is not None and ready > max_ready:
        reasons.append("%d messages ready, more than %d" % (ready, max_ready))
    if max_failed is not None and stats["failed"] > max_failed:
        reasons.append("%d failed messages, more than %d" % (stats["failed"], max_failed))
    ages = [q["oldest_ready_age_s"] for q in stats["queues"] if q["oldest_ready_age_s"] is not None]
    if max_age is not None and ages and max(ages) > max_age:
        reasons.append("oldest ready message waited %.1fs, more than %gs" % (max(ages), max_age))
    for queue, since in sorted(paused.items()):
        if time.time() - since > max_paused:
            reasons.append("queue %s has been paused for %.0fs, more than %gs" % (queue, time.time() - since, max_paused))
    report = {"queues": stats["queues"], "failed": stats["failed"], "processes": status["processes"]}
    return not reasons, reasons, report


def _metric_labels(labels):
    def escape(value):
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{%s}" % ",".join('%s="%s"' % (k, escape(v)) for k, v in labels) if labels else ""


_METRICS = (
    # name, type, help
    ("jobrunner_queue_ready_messages", "gauge", "Messages ready to be handled, per queue."),
    ("jobrunner_queue_delayed_messages", "gauge", "Messages not due yet (delayed, or waiting for a retry), per queue."),
    ("jobrunner_queue_in_flight_messages", "gauge", "Messages claimed by a worker, per queue."),
    ("jobrunner_queue_paused", "gauge", "1 when the queue is paused."),
    ("jobrunner_queue_oldest_ready_age_seconds", "gauge", "How long the oldest ready message has waited."),
    ("jobrunner_failed_messages", "gauge", "Messages in the failure queue."),
    ("jobrunner_process_state", "gauge", "1 for the state each supervised process or worker is in."),
    ("jobrunner_process_resident_memory_bytes", "gauge", "Resident memory of each worker."),
    ("jobrunner_messages_handled_total", "counter", "Messages handled, per queue and handler."),
    ("jobrunner_messages_retried_total", "counter", "Failed attempts that will be retried, per queue and handler."),
    ("jobrunner_messages_failed_total", "counter", "Messages moved to the failure queue, per queue and handler."),
)


def _queue_stats(app, transport):
    """What `stats --json` prints: with the app, its queues are listed even when empty."""
    return app.stats() if app else transport.stats()


def _metrics_text(transport, app=None):
    """Everything `/metrics` says, in Prometheus' text format; with the app, its empty queues too (as `stats`)."""
    stats = _queue_stats(app, transport)
    processes = _read_status(transport)["processes"]
    totals = transport.count_totals()
    samples = {name: [] for name, _, _ in _METRICS}
    for q in stats["queues"]:
        labels = (("queue", q["queue"]),)
        samples["jobrunner_queue_ready_messages"].append((labels, q["ready"]))
        samples["jobrunner_queue_delayed_messages"].append((labels, q["delayed"]))
        samples["jobrunner_queue_in_flight_messages"].append((labels, q["in_flight"]))
        samples["jobrunner_queue_paused"].append((labels, int(bool(q.get("paused")))))
        samples["jobrunner_queue_oldest_ready_age_seconds"].append((labels, q["oldest_ready_age_s"] or 0))
    samples["jobrunner_failed_messages"].append(((), stats["failed"]))
    for p in processes:
        # two standalone workers are both "consume": the host and pid tell their series apart
        labels = (("process", p["name"]), ("program", p["program"] or ""), ("host", p["host"] or ""),
                  ("pid", str(p["pid"] or "")))
        samples["jobrunner_process_state"].append((labels + (("state", p["state"]),), 1))
        if p["rss_bytes"] is not None:
            samples["jobrunner_process_resident_memory_bytes"].append((labels, p["rss_bytes"]))
    for queue, handler, handled, retried, failed in totals:
        labels = (("queue", queue), ("handler", handler))
        samples["jobrunner_messages_handled_total"].append((labels, handled))
        samples["jobrunner_messages_retried_total"].append((labels, retried))
        samples["jobrunner_messages_failed_total"].append((labels, failed))
    lines = []
    for name, kind, text in _METRICS:
        lines.append("# HELP %s %s" % (name, text))
        lines.append("# TYPE %s %s" % (name, kind))
        lines.extend("%s%s %s" % (name, _metric_labels(labels), _metric_value(value)) for labels, value in samples[name])
    return "\n".join(lines) + "\n"


def _metric_value(value):
    return repr(float(value)) if isinstance(value, float) else str(int(value))


# --- The command line -----------------------------------------------------------
#
# Each command is a plain function here, declared with the parameters it takes;
# _cli() turns them into click commands when the command line runs, so that
# importing jobrunner needs no click.

_COMMANDS = []  # (path, params, attrs, function), in the order `jobrunner --help` lists them


class _Param:
    """A click option or argument, described without importing click; ``type`` may name one of _cli()'s types."""

    def __init__(self, kind, *decls, **attrs):
        self.kind, self.decls, self.attrs = kind, decls, attrs


def _option(*decls, **attrs):
    return _Param("option", *decls, **attrs)


def _argument(*decls, **attrs):
    return _Param("argument", *decls, **attrs)


def _command(path, *params, **attrs):
    """Declare a command (``"stats"``, ``"failed retry"``) or, with ``group=True``, a group of commands."""

    def declare(fn):
        flat = []
        for param in params:
            flat.extend(param if isinstance(param, (tuple, list)) else [param])
        _COMMANDS.append((path, flat, attrs, fn))
        return fn

    return declare


_JSON = _option("--json", "as_json", is_flag=True, help="Print JSON.")
_APP = (
    _option("--app", "app_spec", metavar="MODULE[:ATTR]",
            help="The module that builds the JobRunner. Default: $JOBRUNNER_APP, else [tool.jobrunner] app in "
                 "./pyproject.toml."),
    _option("--dsn", envvar="JOBRUNNER_DSN", metavar="DSN",
            help="Database: sqlite:///path.db or a path. Default: $JOBRUNNER_DSN, else the app's, else ./jobrunner.db."),
)
_VERBOSITY = _option("-v", "--verbose", "verbosity", count=True, help="-v each message, -vv details, -vvv everything.")
_WHICH = _option("-v", "--verbose", "verbosity", count=True, help="Say which database is used.")
_LIMITS = (
    _option("--limit", type="count", help="Stop after handling this many messages."),
    _option("--failure-limit", type="count", help="Stop after this many failed attempts."),
    _option("--memory-limit", type="memory", help="Stop when RSS exceeds this (128M, 1G)."),
    _option("--time-limit", type="seconds", help="Stop after this many seconds."),
    _option("--sleep", type="seconds", default=1.0, show_default=True,
            help="Longest idle wait between polls; new messages wake the worker at once."),
    _option("--threads", type="positive_count", default=1, show_default=True,
            help="Handlers run at once in each worker process, each in its own thread (for handlers that wait on "
                 "the network; CPU-bound handlers want more processes instead)."),
    _option("--prefetch", type="positive_count", default=1, show_default=True,
            help="Messages a worker claims at once, then runs in order and settles together: one write per batch for "
                 "fast handlers; a killed worker runs up to this many again. With --threads: claimed messages kept "
                 "waiting for a free thread."),
    _option("--heartbeat-timeout", type="positive",
            help="Seconds of silence after which a worker counts as dead and its message is released."),
    _VERBOSITY,
    _option("--log-format", type="log_format", default="text", show_default=True,
            help="text, or json: one object per line (time, level, process, message_id, handler, event)."),
)
_FAILED_FILTERS = (
    _option("--handler", "handlers", multiple=True, metavar="NAME", help="Only messages of this handler (repeatable)."),
    _option("--error", "errors", multiple=True, metavar="CLASS",
            help="Only messages that failed with this error class, e.g. ConnectionError (repeatable)."),
    _option("--queue", "queues", multiple=True, metavar="QUEUE", help="Only messages from this queue (repeatable)."),
    _option("--since", type="when", help="Only messages failed since: 1h, 30m, 2d ago, a date or a Unix time."),
    _option("--until", type="when", help="Only messages failed before this."),
)


def _echo(text="", err=False):
    import click

    click.echo(text, err=err)


def _echo_json(data):
    _echo(_response_json(data, indent=2, ensure_ascii=False))


_NO_APP = ("no app: give --app module[:attr], set JOBRUNNER_APP, or add [tool.jobrunner] app = \"module:attr\" to "
           "./pyproject.toml")
_DEFAULT_DATABASE = "jobrunner.db"


def _app_from(app_spec, dsn, **settings):
    """The app, imported; pointed at ``dsn`` when one is given."""
    spec = _find_app_spec(app_spec)
    if spec is None:
        raise ConfigurationError(_NO_APP)
    app = _load_app(spec)
    if dsn or any(v is not None for v in settings.values()):
        app.use_dsn(dsn, **settings)
    return app


def _transport_from(app_spec, dsn, verbosity=0):
    """``(app or None, transport)`` for commands that only read or manage the database.

    A DSN is enough and then the app is not imported; without one the app
    names the database; with neither, ``./jobrunner.db`` if it exists (the
    library's own default).  With -v, says which database and why.
    """
    if dsn:
        app, transport, source = None, _open_transport(Settings.from_dsn(dsn)), "--dsn or JOBRUNNER_DSN"
    elif _find_app_spec(app_spec):
        app = _app_from(app_spec, None)
        transport, source = app.transport, "the app %s" % _find_app_spec(app_spec)
    elif os.path.exists(_DEFAULT_DATABASE):
        app, transport, source = None, _open_transport(Settings.from_dsn(_DEFAULT_DATABASE)), "the default"
    else:
        raise ConfigurationError("no database: give --dsn (or JOBRUNNER_DSN), or an app with --app, JOBRUNNER_APP or "
                             "[tool.jobrunner] app in ./pyproject.toml (or run it where ./%s is)" % _DEFAULT_DATABASE)
    if verbosity:
        _echo("jobrunner: database %s (from %s)" % (transport.where, source), err=True)
    return app, transport


_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text, keep_newlines=False):
    """Stored text as a terminal may show it: control characters escaped, so a row cannot rewrite the screen."""
    text = str(text)
    if not keep_newlines:
        text = text.replace("\n", "\\n")
    return _CONTROL_CHARACTERS.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                                   else "\\u%04x" % ord(m.group()), text.replace("\t", "    "))


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_STATE_COLORS = {"FATAL": "red", "UNKNOWN": "red", "BACKOFF": "yellow", "EXITED": "yellow", "RUNNING": "green"}


def _paint(text, color, stream=None):
    """``text`` in a color on a terminal, plain when piped or when NO_COLOR is set (no-color.org)."""
    if color is None or os.environ.get("NO_COLOR") or not _is_terminal(stream or sys.stdout):
        return text
    import click

    return click.style(text, fg=color)


def _format_time(ts):
    import datetime

    try:
        return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-" if ts is None else str(ts)


def _format_duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = "%d:%02d:%02d" % (hours, rest // 60, rest % 60)
    return "%d days, %s" % (days, text) if days else text


def _table(rows, headers):
    """Left-aligned columns, as wide as their widest cell."""
    cells = [[str(c) for c in row] for row in [headers] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _shorten(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _parse_when(text, now=None):
    """Unix seconds from ``1h`` / ``30m`` / ``2d`` / ``90s`` (ago), an ISO date and time, or a Unix time."""
    import datetime

    now = time.time() if now is None else now
    text = str(text).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if match:
        return now - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError("not a time: %r (use 1h, 30m, 2d, 2026-11-26T10:00 or a Unix time)" % text) from None


# Messages


@_command("setup", _JSON, _WHICH, _APP)
def _cmd_setup(as_json, verbosity, app_spec, dsn):
    """Create the database and its tables, or add our columns to an existing Symfony table."""
    _, transport = _transport_from(app_spec, dsn, verbosity)
    where = transport.setup()
    _echo_json({"database": where}) if as_json else _echo("database ready: %s" % where)


@_command("dispatch", _argument("name"), _argument("payload", default="{}", required=False),
          _option("--queue", "-q", help="Queue to use instead of the handler's."),
          _option("--delay", type="seconds", default=0, show_default=True, help="Seconds before it may be handled."),
          _option("--priority", type=int, default=0, show_default=True, help="Higher runs first within its queue."),
          _option("--unique-key", metavar="KEY",
                  help="While a message with this key is queued or running, store nothing and print its id."),
          _JSON, _VERBOSITY, _APP)
def _cmd_dispatch(name, payload, queue, delay, priority, unique_key, as_json, verbosity, app_spec, dsn):
    """Enqueue a message for handler NAME with a JSON object PAYLOAD; print its id."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage("PAYLOAD is not valid JSON: %s" % exc) from None
    if not isinstance(data, dict):
        raise InvalidMessage("PAYLOAD must be a JSON object like '{\"to\": \"a@b.c\"}', not %s" % type(data).__name__)
    app = _app_from(app_spec, dsn)
    message_id = app.dispatch(name, data, queue=queue, delay=delay, priority=priority, unique_key=unique_key)
    _echo_json({"id": message_id}) if as_json else _echo(message_id)


_PING_FILE = _option("--ping-file", metavar="PATH",
                     help="Touch this file at every heartbeat (mode 0600; {name} and {pid} are expanded); removed on a "
                          "clean exit. `health --ping-file` checks its age without the database.")


@_command("consume", _argument("queues", nargs=-1), _LIMITS, _PING_FILE,
          _option("--handler", "handlers", multiple=True, metavar="NAME",
                  help="With `consume failed`: only messages of this handler (repeatable)."),
          _option("--error", "errors", multiple=True, metavar="CLASS",
                  help="With `consume failed`: only messages that failed with this error class (repeatable)."),
          _APP)
def _cmd_consume(queues, limit, failure_limit, memory_limit, time_limit, sleep, threads, prefetch, heartbeat_timeout,
                 verbosity, log_format, ping_file, handlers, errors, app_spec, dsn):
    """Handle messages from QUEUES, the first non-empty one first (default: every queue of the app).

    Stops after the current message on SIGTERM, SIGINT, `stop-workers` or a
    limit, and exits 0. `consume failed` runs each failed message's handler
    once more, oldest first: one that succeeds leaves the failure queue, one
    that fails again stays there with this error added; one pass, then exit.
    """
    _configure_logging(verbosity, "worker", log_format=log_format)
    app = _app_from(app_spec, dsn, heartbeat_timeout=heartbeat_timeout)
    replay_filter = _failed_filter(handlers, errors) if list(queues) == [FAILED_QUEUE] else None
    if (handlers or errors) and list(queues) != [FAILED_QUEUE]:
        raise ConfigurationError("--handler and --error choose failed messages: they go with consume failed")
    ping_file = _expand_ping_file(ping_file, "consume", os.getpid()) if ping_file else None
    if ping_file and not os.path.isdir(os.path.dirname(os.path.abspath(ping_file))):  # a probe would fail forever
        raise ConfigurationError("--ping-file %s: its directory does not exist" % ping_file)
    worker = app.worker(list(queues) or None, limit=limit, failure_limit=failure_limit, memory_limit=memory_limit,
                        time_limit=time_limit, sleep=sleep, name="consume", owns_process=True, threads=threads,
                        prefetch=prefetch, replay_filter=replay_filter, ping_file=ping_file)
    worker.run()
    sys.exit(worker.exit_code)


@_command("handlers", _JSON, _VERBOSITY, _APP)
def _cmd_handlers(as_json, verbosity, app_spec, dsn):
    """List the registered handlers with their queue and retry settings (like debug:messenger)."""
    app = _app_from(app_spec, dsn)
    described = [h.describe() for h in app.handlers.values()]
    if as_json:
        return _echo_json({"handlers": described})
    if not described:
        return _echo("no handlers registered")
    rows = [[d["name"], d["queue"], d["max_retries"], "%gs x%g" % (d["delay"], d["multiplier"]),
             "-" if d["max_delay"] is None else "%gs" % d["max_delay"], "-" if d["timeout"] is None else "%gs" % d["timeout"],
             "yes" if d["transactional"] else "no",
             "%s, next %s" % (d["schedule"], _format_time(d["next_run_at"])) if d["schedule"] else "-",
             d["function"]] for d in described]
    _echo(_table(rows, ["handler", "queue", "retries", "backoff", "max delay", "timeout", "transactional", "schedule",
                        "function"]))


@_command("stats", _JSON, _WHICH, _APP)
def _cmd_stats(as_json, verbosity, app_spec, dsn):
    """Ready, delayed and in-flight messages per queue, and the failed count."""
    app, transport = _transport_from(app_spec, dsn, verbosity)
    data = _queue_stats(app, transport)
    if as_json:
        return _echo_json(data)
    rows = [[_printable(q["queue"]), q["ready"], q["delayed"], q["in_flight"],
             "-" if q["oldest_ready_age_s"] is None else "%.1fs" % q["oldest_ready_age_s"],
             "paused" if q.get("paused") else ""] for q in data["queues"]]
    _echo(_table(rows, ["queue", "ready", "delayed", "in flight", "oldest ready", ""]))
    _echo("failed: %d" % data["failed"])


@_command("stop-workers", _JSON, _WHICH, _APP)
def _cmd_stop_workers(as_json, verbosity, app_spec, dsn):
    """Ask every running worker on the database to finish its current message and exit."""
    _, transport = _transport_from(app_spec, dsn, verbosity)
    count = transport.request_stop()
    if as_json:
        return _echo_json({"asked": count})
    _echo("asked %d running worker(s) to stop after their current message" % count)


def _check_control_queues(app, app_spec, transport, queues, resuming=False):
    """Refuse a queue the app does not route to, as `consume` does: a typo would pause nothing.

    A paused queue can always be resumed.  The app is imported for this even
    beside a DSN, but an app that fails to import must not stand in the way of
    a pause during an incident: then, or with no app at all, the database
    tells what it can (a queue may be empty) and an unknown one is a warning.
    """
    if app is None and _find_app_spec(app_spec):
        try:
            app = _load_app(_find_app_spec(app_spec))
        except JobRunnerError as exc:
            _echo("jobrunner: warning: queue names not checked: %s" % exc, err=True)
    paused = transport.paused()
    known = None
    for queue in queues:
        _check_queue_name(queue)
        if queue == FAILED_QUEUE and not (resuming and queue in paused):
            raise InvalidMessage("the failure queue has no workers to pause: `consume failed` replays it when run")
        if resuming and queue in paused:
            continue
        if app is not None:
            app.check_queues([queue])
            continue
        known = known if known is not None else {entry["queue"] for entry in transport.stats()["queues"]}
        if queue not in known:
            _echo("jobrunner: warning: no message, worker or pause names queue %r in this database" % queue, err=True)


@_command("pause", _argument("queues", nargs=-1, required=True), _JSON, _APP)
def _cmd_pause(queues, as_json, app_spec, dsn):
    """Stop workers taking messages from QUEUES (dispatches still store them) until `resume`."""
    app, transport = _transport_from(app_spec, dsn)
    _check_control_queues(app, app_spec, transport, queues)
    transport.pause(queues)
    _echo_json({"paused": list(queues)}) if as_json else _echo("paused %s" % ", ".join(queues))


@_command("resume", _argument("queues", nargs=-1, required=True), _JSON, _APP)
def _cmd_resume(queues, as_json, app_spec, dsn):
    """Let workers take messages from QUEUES again."""
    app, transport = _transport_from(app_spec, dsn)
    _check_control_queues(app, app_spec, transport, queues, resuming=True)
    transport.resume(queues)
    _echo_json({"resumed": list(queues)}) if as_json else _echo("resumed %s" % ", ".join(queues))


@_command("cancel", _argument("ids", type=int, nargs=-1, required=True), _JSON, _APP)
def _cmd_cancel(ids, as_json, app_spec, dsn):
    """Remove queued or delayed messages; interrupt running ones (not retried, not failed)."""
    _, transport = _transport_from(app_spec, dsn)
    done, errors = {}, []
    for message_id in ids:
        try:
            done[message_id] = transport.cancel(message_id)
        except UnknownMessage as exc:
            errors.append(str(exc))
    if as_json:
        _echo_json({"cancelled": {str(k): v for k, v in done.items()}, "errors": errors})
    else:
        for message_id, how in done.items():
            _echo("message %d %s" % (message_id, "removed" if how == "waiting" else "cancelled: its worker stops it"))
        for error in errors:
            _echo("jobrunner: error: %s" % error, err=True)
    if errors:
        sys.exit(1)


@_command("schedule", _VERBOSITY, _option("--log-format", type="log_format", default="text", show_default=True,
                                           help="text, or json: one object per line."), _APP)
def _cmd_schedule(verbosity, log_format, app_spec, dsn):
    """Enqueue the app's periodic messages at their times, in the foreground (supervise runs this itself).

    Any number may run at once, on any number of hosts: each tick is enqueued once.
    """
    _configure_logging(verbosity, "scheduler", log_format=log_format)
    app = _app_from(app_spec, dsn)
    scheduler = Scheduler(app, owns_process=True)
    scheduler.run()
    sys.exit(scheduler.exit_code)


# The failure queue


@_command("failed", group=True)
def _cmd_failed():
    """Inspect, retry and remove messages in the failure queue."""


def _envelope_summary(e):
    return {"id": e.id, "handler": e.handler, "original_queue": e.headers.get("original_queue"),
            "error_class": e.headers.get("error_class"), "error_message": e.headers.get("error_message"),
            "attempts": e.headers.get("attempts", e.attempts), "failed_at": e.headers.get("failed_at", e.available_at)}


def _failed_filter(handlers=(), errors=(), queues=(), since=None, until=None):
    """A predicate on failed envelopes, or None when no filter is given."""
    if not (handlers or errors or queues or since is not None or until is not None):
        return None

    def matches(e):
        error = str(e.headers.get("error_class") or "")
        failed_at = e.headers.get("failed_at", e.available_at)
        failed_at = failed_at if isinstance(failed_at, (int, float)) and not isinstance(failed_at, bool) else e.available_at
        return ((not handlers or e.handler in handlers)
                and (not errors or any(error == c or error.rsplit(".", 1)[-1] == c for c in errors))
                and (not queues or e.headers.get("original_queue") in queues)
                and (since is None or failed_at >= since) and (until is None or failed_at < until))

    return matches


@_command("failed show", _argument("message_id", type=int, required=False),
          _option("--max", "max_", type="positive_count", default=50, show_default=True, help="How many to list."),
          _option("--stats", "by_class", is_flag=True, help="Count failed messages by handler and error class."),
          _FAILED_FILTERS, _JSON, _option("-v", "--verbose", "verbosity", count=True, help="With an id: the traceback."),
          _APP)
def _cmd_failed_show(message_id, max_, by_class, handlers, errors, queues, since, until, as_json, verbosity, app_spec,
                     dsn):
    """List failed messages, or show one with its error (and traceback with -v)."""
    import click

    matches = _failed_filter(handlers, errors, queues, since, until)
    if message_id is not None and (matches or by_class):
        raise click.UsageError("give a message id, or filters and --stats, not both")
    _, transport = _transport_from(app_spec, dsn, verbosity)
    if message_id is not None:
        return _show_failed_message(transport, message_id, as_json, verbosity)
    if by_class:
        groups = {}
        for e in transport.failed():
            if matches is None or matches(e):
                key = (e.handler or "?", str(e.headers.get("error_class") or "?"))
                groups[key] = groups.get(key, 0) + 1
        data = [{"handler": h, "error_class": c, "count": n} for (h, c), n in sorted(groups.items(), key=lambda kv: -kv[1])]
        if as_json:
            return _echo_json({"groups": data, "failed": sum(g["count"] for g in data)})
        rows = [[_printable(g["handler"]), _printable(g["error_class"]), g["count"]] for g in data]
        return _echo(_table(rows, ["handler", "error", "count"]))
    if matches is None:
        envelopes, total = transport.failed(limit=max_), transport.failed_count()
    else:
        chosen = [e for e in transport.failed() if matches(e)]
        envelopes, total = chosen[:max_], len(chosen)
    data = [_envelope_summary(e) for e in envelopes]
    if as_json:
        return _echo_json({"failed": data, "total": total})
    if not data:
        return _echo("no failed messages")
    rows = [[d["id"], _printable(d["handler"] or "?"), _printable(d["original_queue"] or "?"),
             _printable(_shorten("%s: %s" % (d["error_class"], d["error_message"]), 60)), d["attempts"],
             _format_time(d["failed_at"])] for d in data]
    table = _table(rows, ["id", "handler", "queue", "error", "attempts", "failed at"]).split("\n")
    _echo("\n".join([_paint(table[0], "cyan")] + table[1:]))
    if total > len(data):
        _echo("(%d of %d shown; use --max)" % (len(data), total))


def _show_failed_message(transport, message_id, as_json, verbosity):
    found = transport.failed(ids=[message_id])
    if not found:
        raise UnknownMessage("no failed message with id %d" % message_id)
    e = found[0]
    detail = dict(_envelope_summary(e), payload=e.payload, headers=e.headers, created_at=e.created_at)
    if as_json:
        return _echo_json(detail)
    for key in ("id", "handler", "original_queue", "error_class", "error_message", "attempts"):
        value = _printable(detail[key])
        _echo("%-15s %s" % (key.replace("_", " "), _paint(value, "red") if key == "error_class" else value))
    _echo("%-15s %s" % ("failed at", _format_time(detail["failed_at"])))
    _echo("%-15s %s" % ("created at", _format_time(e.created_at)))
    if e.headers.get("reason"):
        _echo("%-15s %s" % ("reason", _printable(e.headers["reason"])))
    _echo("%-15s %s" % ("payload", _printable(json.dumps(e.payload, ensure_ascii=False, default=_json_safe))))
    history = e.headers.get("previous_errors")
    for earlier in reversed(history) if isinstance(history, list) else ():
        if isinstance(earlier, dict):  # written by `consume failed`: the errors of earlier passes, newest first
            _echo("%-15s %s: %s (%s)" % ("earlier error", _printable(earlier.get("error_class")),
                                          _printable(_shorten(str(earlier.get("error_message")), 60)),
                                          _format_time(earlier.get("failed_at"))))
    tb = e.headers.get("traceback")
    if verbosity and tb:
        _echo("\n" + _printable(str(tb).rstrip(), keep_newlines=True))
    elif tb:
        _echo("\n(run with -v to see the traceback)")


_BATCH = 500  # rows per transaction when acting on many failed messages: workers keep the write lock in turn


def _act_on_failed(transport, ids, all_, force, filters, verb, as_json, queue_of=None):
    import click

    matches = _failed_filter(*filters)
    if ids and (all_ or matches):
        raise click.UsageError("give message ids, or --all and filters, not both")
    if not ids and not all_ and not matches:
        raise click.UsageError("give the ids of failed messages, --all, or filters (--handler, --error, --queue, "
                               "--since, --until)")
    if ids:
        targets = transport.check_failed_ids(ids)  # unknown ids: one clear error before anything changes
    elif matches:
        targets = sorted(e.id for e in transport.failed() if matches(e))
    else:
        targets = transport.failed_ids()
    done_key = {"retry": "requeued", "remove": "removed"}[verb]
    if not targets:
        return _echo_json({done_key: 0}) if as_json else _echo("no failed messages")
    if len(targets) > 1 and not force:
        click.confirm("%s %d failed messages?" % (verb.capitalize(), len(targets)), abort=True, err=True)
    done, left = 0, {}
    # a progress bar on a terminal only: nothing when piped, nothing with --json
    shown = len(targets) > _BATCH and not as_json and _is_terminal(sys.stderr)
    bar = click.progressbar(length=len(targets), label=verb.capitalize(), file=sys.stderr) if shown else None
    with bar or contextlib.nullcontext():
        for start in range(0, len(targets), _BATCH):
            chunk = targets[start:start + _BATCH]
            with transport.transaction(transport.connection(create=False)) as conn:
                if verb == "retry":
                    moved, stayed = transport.requeue_failed(chunk, conn, queue_of)
                    done += moved
                    left.update(stayed)
                else:
                    done += transport.remove_failed(chunk, conn)
            if bar:
                bar.update(len(chunk))
    if as_json:
        data = {done_key: done}
        if left:
            data["left"] = {str(k): v for k, v in left.items()}
        _echo_json(data)
        sys.exit(1 if left else 0)
    _echo("%s %d message(s)" % (done_key, done))
    for message_id, why in sorted(left.items()):
        _echo("message %d stays in the failure queue: %s" % (message_id, _printable(why)), err=True)
    if left:
        sys.exit(1)


@_command("failed retry", _argument("ids", type=int, nargs=-1),
          _option("--all", "all_", is_flag=True, help="Every failed message."),
          _option("--force", "-f", is_flag=True, help="Do not ask before acting on more than one message."),
          _FAILED_FILTERS, _JSON, _WHICH, _APP)
def _cmd_failed_retry(ids, all_, force, handlers, errors, queues, since, until, as_json, verbosity, app_spec, dsn):
    """Put failed messages back on their original queues, with their attempt count reset."""
    app, transport = _transport_from(app_spec, dsn, verbosity)
    _act_on_failed(transport, ids, all_, force, (handlers, errors, queues, since, until), "retry", as_json,
                   app.queue_of if app else None)


@_command("failed remove", _argument("ids", type=int, nargs=-1),
          _option("--all", "all_", is_flag=True, help="Every failed message."),
          _option("--force", "-f", is_flag=True, help="Do not ask before acting on more than one message."),
          _FAILED_FILTERS, _JSON, _WHICH, _APP)
def _cmd_failed_remove(ids, all_, force, handlers, errors, queues, since, until, as_json, verbosity, app_spec, dsn):
    """Delete failed messages for good."""
    _, transport = _transport_from(app_spec, dsn, verbosity)
    _act_on_failed(transport, ids, all_, force, (handlers, errors, queues, since, until), "remove", as_json)


# The supervisor and its processes


# what a [program:NAME] sets for itself: given to `supervise --config` on the command line, it would be lost
_PER_PROGRAM_OPTIONS = {"name", "numprocs", "autorestart", "startsecs", "startretries", "stopwaitsecs", "log_max_bytes",
                        "log_backups", "limit", "failure_limit", "memory_limit", "time_limit", "sleep", "threads",
                        "prefetch", "verbosity"}


@_command("supervise", _argument("queues", nargs=-1),
          _option("--config", "-c", "config_path", type="file",
                  help="A supervisord-style INI file with [program:NAME] sections."),
          _option("--name", help="Program name (default: the queues joined by '-'); processes are NAME_00, NAME_01..."),
          _option("--numprocs", type="positive_count", default=1, show_default=True, help="Worker processes."),
          _option("--log-dir", default="var/log", show_default=True,
                  help="Where NAME_NN.log and supervisor.log go; - for stdout, each line prefixed with its process."),
          _option("--autorestart", type="autorestart", default="true", show_default=True,
                  help="After a crash (non-zero exit), true and unexpected restart the worker, false leaves it EXITED. "
                       "Workers that exit 0 (a limit reached, stop-workers) are always restarted."),
          _option("--startsecs", type="seconds", default=10.0, show_default=True,
                  help="Longest a worker may take to become ready (app imported, registered); 0: ready at once."),
          _option("--startretries", type="count", default=3, show_default=True,
                  help="Exits before ready, in a row, before FATAL."),
          _option("--stopwaitsecs", type="seconds", default=10.0, show_default=True, help="Grace before SIGKILL."),
          _option("--log-max-bytes", type="size", default="10MB", show_default=True, help="Rotate a log at this size."),
          _option("--log-backups", type="count", default=3, show_default=True, help="Rotated logs to keep."),
          _option("--supervisor-log-max-bytes", type="size", default="10MB", show_default=True,
                  help="Rotate supervisor.log at this size."),
          _option("--supervisor-log-backups", type="count", default=3, show_default=True,
                  help="Rotated supervisor.log files to keep."),
          _option("--scheduler/--no-scheduler", default=True, show_default=True,
                  help="Run the app's periodic handlers' schedule (one supervisor per database does)."),
          _option("--ping-file", metavar="PATH",
                  help="With {name} or {pid}: each worker touches its own at every heartbeat. Without: the supervisor "
                       "touches this one file while every process is RUNNING."),
          _LIMITS, _APP)
def _cmd_supervise(queues, config_path, name, numprocs, log_dir, autorestart, startsecs, startretries, stopwaitsecs,
                   log_max_bytes, log_backups, supervisor_log_max_bytes, supervisor_log_backups, scheduler, ping_file,
                   limit, failure_limit, memory_limit, time_limit, sleep, threads, prefetch, heartbeat_timeout,
                   verbosity, log_format, app_spec, dsn):
    """Run and keep alive NUMPROCS workers for QUEUES (or the programs of --config), in the foreground.

    With no queue, the workers take every queue of the app. SIGTERM/SIGINT
    stop the workers gracefully (SIGKILL after --stopwaitsecs); SIGHUP
    restarts them, which reloads the app's code and the --config file.
    """
    import click

    spec = _find_app_spec(app_spec)
    if config_path:
        ctx = click.get_current_context()
        given = _given_on_command_line(ctx)
        if queues:
            raise click.UsageError("give queues or --config, not both")
        per_program = sorted(max(p.opts, key=len) for p in ctx.command.params if p.name in given & _PER_PROGRAM_OPTIONS)
        if per_program:
            raise click.UsageError("with --config, set %s in each [program:NAME] (its keys, or options of its "
                                   "command)" % ", ".join(per_program))
        programs, section = _read_config(config_path)
        spec = app_spec or section.get("app") or spec
        dsn = dsn or section.get("dsn")
        log_dir = log_dir if "log_dir" in given else section.get("log_dir", log_dir)
        log_format = log_format if "log_format" in given else section.get("log_format", log_format)
        supervisor_log_max_bytes = section.get("logfile_maxbytes", supervisor_log_max_bytes)
        supervisor_log_backups = section.get("logfile_backups", supervisor_log_backups)
        scheduler = section.get("scheduler", scheduler)
        ping_file = ping_file or section.get("ping_file")
        config_path = os.path.abspath(config_path)
    else:
        programs = [ProgramConfig(
            name or ("-".join(queues) if queues else "worker"), list(queues), numprocs, limit, failure_limit,
            memory_limit, time_limit, sleep, verbosity, autorestart, startsecs, startretries, stopwaitsecs,
            log_max_bytes, log_backups, log_format=log_format, threads=threads, prefetch=prefetch)]
    if spec is None:
        raise ConfigurationError(_NO_APP)
    _configure_logging(0, "supervisor", log_format=log_format)
    overrides = {"heartbeat_timeout": heartbeat_timeout} if heartbeat_timeout else {}
    sys.exit(Supervisor(programs, app_spec=spec, dsn=dsn, log_dir=log_dir, settings_overrides=overrides,
                        config_path=config_path, log_format=log_format, log_max_bytes=supervisor_log_max_bytes,
                        log_backups=supervisor_log_backups, scheduler=scheduler, ping_file=ping_file).run())


@_command("status", _JSON, _WHICH, _APP)
def _cmd_status(as_json, verbosity, app_spec, dsn):
    """One line per worker process, like supervisorctl status."""
    _, transport = _transport_from(app_spec, dsn, verbosity)
    data = _read_status(transport)
    if as_json:
        return _echo_json(data)
    if not data["processes"]:
        return _echo("no supervisor or worker is running on %s" % transport.where)
    for p in data["processes"]:
        if p["pid"] and p["state"] in (_Process.RUNNING, _Process.STARTING, _Process.STOPPING):
            detail = "pid %s, uptime %s, handled %d, failed %d, rss %s" % (
                p["pid"], _format_duration(p["uptime_s"]), p["handled"], p["failed"],
                "-" if p["rss_bytes"] is None else _format_bytes(p["rss_bytes"]))
        else:
            detail = _printable(p["description"])
        _echo("%-32s %s %s" % (_printable(p["name"]), _paint("%-9s" % p["state"], _STATE_COLORS.get(p["state"])),
                               detail))


@_command("health", _option("--max-ready", type="count", help="Unhealthy above this many ready messages."),
          _option("--max-failed", type="count", help="Unhealthy above this many failed messages."),
          _option("--max-age", type="seconds", help="Unhealthy when the oldest ready message waited longer (seconds)."),
          _option("--max-paused", type="seconds", help="Unhealthy when a queue has been paused longer (seconds)."),
          _option("--allow-no-workers", is_flag=True, help="Healthy even when no worker runs."),
          _option("--ping-file", metavar="PATH",
                  help="Check only this ping file (a glob: every match) is younger than --max-age (default 60 s); "
                       "the database is not opened."),
          _JSON, _WHICH, _APP)
def _cmd_health(max_ready, max_failed, max_age, max_paused, allow_no_workers, ping_file, as_json, verbosity, app_spec,
                dsn):
    """Exit 0 when the database answers, workers run and beat, and the thresholds hold; else 1."""
    if ping_file:
        database_checks = [name for name, value in (("--max-ready", max_ready), ("--max-failed", max_failed),
                                                    ("--max-paused", max_paused), ("--allow-no-workers", allow_no_workers))
                           if value is not None and value is not False]  # 0 is a threshold
        if database_checks:  # the ping file alone is checked: these would be ignored, and the answer a lie
            raise ConfigurationError("--ping-file checks the file alone, without the database: %s cannot go with it"
                                     % ", ".join(database_checks))
        return _ping_health(ping_file, 60.0 if max_age is None else max_age, as_json)
    _, transport = _transport_from(app_spec, dsn, verbosity)
    healthy, reasons, data = _check_health(transport, max_ready, max_failed, max_age, allow_no_workers, max_paused)
    if as_json:
        _echo_json(dict({"healthy": healthy, "reasons": reasons}, **data))
    elif healthy:
        ready = sum(q["ready"] for q in data["queues"])
        _echo("OK: %d ready, %d failed" % (ready, data["failed"]))
    else:
        _echo("UNHEALTHY: " + "; ".join(_printable(r) for r in reasons))
    sys.exit(0 if healthy else 1)


def _ping_health(pattern, max_age, as_json):
    import glob

    now = time.time()
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    reasons, files = [], []
    for path in paths:
        try:
            age = now - os.stat(path).st_mtime
        except OSError:
            reasons.append("no ping file %s" % path)
            continue
        files.append({"path": path, "age_s": round(age, 1)})
        if age > max_age:
            reasons.append("ping file %s is %.0fs old, more than %gs" % (path, age, max_age))
    if not paths:
        reasons.append("no ping file matches %s" % pattern)
    healthy = not reasons
    if as_json:
        _echo_json({"healthy": healthy, "reasons": reasons, "ping_files": files})
    else:
        _echo("OK: %d ping file(s) younger than %gs" % (len(files), max_age) if healthy else
              "UNHEALTHY: " + "; ".join(_printable(r) for r in reasons))
    sys.exit(0 if healthy else 1)


# The config file of `supervise --config`

def _parse_environment(text):
    """supervisord's ``KEY="value",KEY2='value 2',KEY3=value3`` as a dict."""
    pairs, rest = {}, text.strip()
    # a value is quoted whole or not quoted at all: `A="x` and `A="1" junk` are refused, not half read
    pattern = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*("(?:[^"\\]|\\.)*"|'[^']*'|(?:[^,"'][^,]*?)?)\s*(?:,|$)""")
    while rest:
        match = pattern.match(rest)
        if not match or not match.group(0):
            raise ValueError(text)
        key, value = match.group(1), match.group(2)
        if value[:1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        elif value[:1] == "'":
            value = value[1:-1]
        pairs[key] = value
        rest = rest[match.end():]
    return pairs


def _existing_directory(text):
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isdir(path):
        raise ValueError(text)
    return path


def _log_format(text):
    if text not in _LOG_FORMATS:
        raise ValueError(text)
    return text


# Every key each section accepts; anything else is refused, so that a typo cannot run another setup silently.
def _boolean(text):
    if text.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        raise ValueError(text)
    return text.lower() in ("true", "yes", "1", "on")


def _autorestart(text):
    """supervisord's spellings: any case, and yes/no, on/off, 1/0 for true/false."""
    return "unexpected" if text.lower() == "unexpected" else str(_boolean(text)).lower()


_SUPERVISE_KEYS = {"app": str, "dsn": str, "log_dir": str, "log_format": _log_format, "logfile_maxbytes": _parse_size,
                   "logfile_backups": int, "scheduler": _boolean, "ping_file": str}
_PROGRAM_KEYS = {"command": None, "numprocs": int, "autorestart": _autorestart, "startsecs": float, "startretries": int,
                 "stopwaitsecs": float, "log_max_bytes": _parse_size, "stdout_logfile_maxbytes": _parse_size,
                 "log_backups": int, "stdout_logfile_backups": int, "environment": _parse_environment,
                 "directory": _existing_directory, "threads": int, "prefetch": int}
_PROGRAM_ALIASES = {"stdout_logfile_maxbytes": "log_max_bytes", "stdout_logfile_backups": "log_backups"}
# supervisord settings that mean nothing here (jobrunner names processes and logs itself): accepted, with a warning
_IGNORED_SUPERVISORD_KEYS = {"process_name", "user", "autostart", "redirect_stderr", "stdout_logfile",
                             "stderr_logfile", "stderr_logfile_maxbytes", "stderr_logfile_backups", "priority",
                             "exitcodes", "stopsignal", "stopasgroup", "killasgroup", "umask"}
_IGNORED_SUPERVISORD_SECTION_KEYS = {"nodaemon", "logfile", "pidfile", "loglevel", "user", "childlogdir", "minfds",
                                     "minprocs", "umask", "identifier", "directory", "nocleanup", "strip_ansi",
                                     "silent"}
# sections of a whole supervisord.conf that only supervisord and supervisorctl read
_IGNORED_SUPERVISORD_SECTIONS = ("unix_http_server", "inet_http_server", "supervisorctl", "rpcinterface:")


def _read_config(path):
    """Programs from a supervisord-style INI file; ``command`` holds the consume arguments."""
    import configparser

    # `key = value ; a comment` or `# a comment`, as supervisord reads them (either right after a character stays)
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigurationError("cannot read config %s: %s" % (path, exc)) from None
    section = {}
    for name in ("supervise", "supervisord"):
        if parser.has_section(name):
            for key, value in parser[name].items():
                if key in _IGNORED_SUPERVISORD_SECTION_KEYS:
                    _echo("jobrunner: [%s] %s is not used by jobrunner; ignored" % (name, key), err=True)
                    continue
                if key not in _SUPERVISE_KEYS:
                    raise ConfigurationError("%s: unknown setting %r in [%s] (known: %s)"
                                             % (path, key, name, ", ".join(sorted(_SUPERVISE_KEYS))))
                try:
                    section[key] = _SUPERVISE_KEYS[key](value.strip())
                except ValueError:
                    raise ConfigurationError("[%s]: %s = %r is not valid" % (name, key, value)) from None
    for name in parser.sections():
        if name.startswith(_IGNORED_SUPERVISORD_SECTIONS):
            _echo("jobrunner: [%s] is supervisord's own; ignored" % name, err=True)
        elif name not in ("supervise", "supervisord") and not name.startswith("program:"):
            raise ConfigurationError("%s: unknown section [%s] (known: [supervise], [program:NAME])" % (path, name))
    programs = [_read_program(name, dict(parser[name])) for name in parser.sections() if name.startswith("program:")]
    if not programs:
        raise ConfigurationError("config %s has no [program:NAME] section" % path)
    return programs, section


def _given_on_command_line(ctx):
    """The parameters of a parsed click command that were typed, not defaulted."""
    import click

    return {key for key in ctx.params if ctx.get_parameter_source(key) is click.core.ParameterSource.COMMANDLINE}


def _read_program(name, options):
    import shlex

    program = name.split(":", 1)[1].strip()
    try:
        command = shlex.split(options.pop("command", ""))
    except ValueError as exc:
        raise ConfigurationError("[%s] command: %s" % (name, exc)) from None
    if "consume" not in command:
        raise ConfigurationError("[%s] needs command = consume QUEUE... [options]" % name)
    args = command[command.index("consume") + 1:]
    consume = _cli().commands["consume"]
    try:
        ctx = consume.make_context("consume", args)
    except Exception as exc:
        detail = exc.format_message() if hasattr(exc, "format_message") else exc
        raise ConfigurationError("[%s] command: %s" % (name, detail)) from None
    params = ctx.params
    given = _given_on_command_line(ctx)
    if given & {"app_spec", "dsn"}:
        raise ConfigurationError("[%s]: set app and dsn once, in [supervise] or on the command line" % name)
    if given & {"ping_file", "heartbeat_timeout"}:
        raise ConfigurationError("[%s]: --ping-file and --heartbeat-timeout are the supervisor's: give them to "
                                 "supervise (or ping_file in [supervise], heartbeat_timeout in the DSN)" % name)
    if given & {"handlers", "errors"}:
        raise ConfigurationError("[%s]: --handler and --error are for consume failed, which is not supervised" % name)
    values = {}
    for key, raw in options.items():
        if key in _IGNORED_SUPERVISORD_KEYS:
            _echo("jobrunner: [%s] %s is not used by jobrunner; ignored" % (name, key), err=True)
            continue
        if key not in _PROGRAM_KEYS:
            raise ConfigurationError("[%s]: unknown setting %r" % (name, key))
        try:
            value = _PROGRAM_KEYS[key](raw.strip())
        except ValueError:
            raise ConfigurationError("[%s]: %s = %r is not valid" % (name, key, raw)) from None
        values[_PROGRAM_ALIASES.get(key, key)] = value
    return ProgramConfig(program, list(params["queues"]), limit=params["limit"], failure_limit=params["failure_limit"],
                         memory_limit=params["memory_limit"], time_limit=params["time_limit"], sleep=params["sleep"],
                         verbosity=params["verbosity"], log_format=params["log_format"],
                         **dict({"threads": params["threads"], "prefetch": params["prefetch"]}, **values))


# Building and running the click commands


def _one_line_errors(fn):
    """Driver and OS errors become a one-line StorageError; -v adds the traceback of a failed app import."""

    @functools.wraps(fn)
    def run(**kwargs):
        try:
            return fn(**kwargs)
        except _AppImportError as exc:
            if kwargs.get("verbosity"):
                sys.stderr.write(exc.details)
            raise
        except sqlite3.Error as exc:
            raise StorageError("database error: %s" % exc) from None

    return run


def _cli_types():
    import click

    class Size(click.ParamType):
        name = "size"

        def __init__(self, least=0):
            self.least = least

        def convert(self, value, param, ctx):
            if isinstance(value, int):
                return value
            try:
                size = _parse_size(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
            if 0 < size < self.least and re.fullmatch(r"\s*\d+\s*", str(value)):
                self.fail("%s bytes is less than a worker needs: did you mean %sM?" % (size, size), param, ctx)
            return size

    class When(click.ParamType):
        name = "time"

        def convert(self, value, param, ctx):
            try:
                return _parse_when(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)

    class Seconds(click.FloatRange):
        def convert(self, value, param, ctx):
            seconds = super().convert(value, param, ctx)
            if not math.isfinite(seconds):
                self.fail("%s is not a finite number of seconds" % (value,), param, ctx)
            return seconds

    return {"size": Size(), "memory": Size(least=_KIB), "when": When(), "seconds": Seconds(min=0),
            "positive": Seconds(min=0, min_open=True), "count": click.IntRange(min=0),
            "positive_count": click.IntRange(min=1, max=2 ** 63 - 1), "port": click.IntRange(0, 65535),
            "file": click.Path(dir_okay=False),
            "autorestart": click.Choice(_AUTORESTART), "log_format": click.Choice(_LOG_FORMATS)}


@functools.lru_cache(maxsize=1)
def _cli():
    """The click command group, built from the declared commands."""
    import click

    types = _cli_types()
    root = click.Group("jobrunner", help="A durable SQLite job queue, its workers and their supervisor.",
                       context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    root = click.version_option(__version__, prog_name="jobrunner")(root)
    groups = {"": root}
    for path, params, attrs, fn in _COMMANDS:
        parent, _, name = path.rpartition(" ")
        callback = _one_line_errors(fn) if not attrs.get("group") else fn
        for param in reversed(params):
            options = dict(param.attrs)
            if isinstance(options.get("type"), str):
                options["type"] = types[options["type"]]
            decorate = click.option if param.kind == "option" else click.argument
            callback = decorate(*param.decls, **options)(callback)
        if attrs.get("group"):
            groups[path] = groups[parent].group(name, help=fn.__doc__)(callback)
        else:
            groups[parent].command(name, help=fn.__doc__)(callback)
    return root


# --- The web dashboard ------------------------------------------------------------
#
# A threaded server from the standard library: one page (inlined below), a small JSON API over the same
# functions the command line uses, and /metrics.  On loopback, reading needs no token; off loopback every
# request does; a request that changes something always needs `Authorization: Bearer <token>` (the page
# sends it; no cookie is ever used, so no other site can make a browser send it).


def _web_error(status, message):
    return status, {"error": message}


class _Dashboard:
    """What the web server answers, request by request, over one transport."""

    def __init__(self, transport, token, loopback, app=None):
        self.transport = transport
        self.token = token
        self.loopback = loopback
        self.app = app  # or None: then the database alone tells which queues there are
        self.queue_of = app.queue_of if app else None

    def stats(self):
        """What `stats --json` prints, with the same app or without."""
        return _queue_stats(self.app, self.transport)

    def authorized(self, headers, query, writing):
        import hmac

        bearer = headers.get("Authorization", "")
        given = bearer[7:] if bearer.startswith("Bearer ") else None
        if given is not None:
            return hmac.compare_digest(given.encode(), self.token.encode())
        if writing:
            return False
        if self.loopback:
            return True
        offered = query.get("token", [""])[0]
        return bool(offered) and hmac.compare_digest(offered.encode(), self.token.encode())

    def get(self, path, query):
        if path == "/api/stats":
            return 200, self.stats()
        if path == "/api/status":
            return 200, _read_status(self.transport)
        if path == "/api/throughput":
            return 200, self.throughput(query.get("range", ["1h"])[0])
        if path == "/api/failed":
            return 200, self.failed(query)
        match = re.fullmatch(r"/api/failed/(\d{1,18})", path)
        if match:
            found = self.transport.failed(ids=[int(match.group(1))])
            if not found:
                return _web_error(404, "no failed message with id %s" % match.group(1))
            e = found[0]
            return 200, dict(_envelope_summary(e), payload=e.payload, headers=e.headers, created_at=e.created_at)
        return _web_error(404, "no such page: %s" % path)

    def throughput(self, span):
        seconds, step = {"1h": (3600, 60), "24h": (86400, 600)}.get(span, (None, None))
        if seconds is None:
            raise InvalidMessage("range must be 1h or 24h, not %r" % span)
        since = (time.time() - seconds) // step * step
        buckets = {}
        for minute, handled, failed in self.transport.count_series(since):
            bucket = buckets.setdefault(minute // step * step, [0, 0])
            bucket[0] += handled
            bucket[1] += failed
        return {"range": span, "step_s": step, "points": [[t, h, f] for t, (h, f) in sorted(buckets.items())]}

    def failed(self, query):
        def number(key, default, most):
            try:
                return max(0, min(most, int(query.get(key, [default])[0])))
            except ValueError:
                raise InvalidMessage("%s must be a whole number" % key) from None

        offset, limit = number("offset", 0, 10 ** 9), number("limit", 50, 1000)
        matches = _failed_filter(*self.filters(query))
        if matches is None:
            total = self.transport.failed_count()
            envelopes = self.transport.failed(limit=offset + limit)[offset:]
        else:
            chosen = [e for e in self.transport.failed() if matches(e)]
            total, envelopes = len(chosen), chosen[offset:offset + limit]
        return {"failed": [_envelope_summary(e) for e in envelopes], "total": total}

    @staticmethod
    def filters(source):
        def values(key):
            value = source.get(key)
            if isinstance(value, list):
                value = value[0] if value else None
            return (value,) if isinstance(value, str) and value.strip() else ()

        return values("handler"), values("error"), (), None, None

    def post(self, path, body):
        import urllib.parse

        if path in ("/api/failed/retry", "/api/failed/remove"):
            return 200, self.act_on_failed(path.rsplit("/", 1)[1], body)
        match = re.fullmatch(r"/api/queues/([^/]+)/(pause|resume)", path)
        if match:
            queue = _check_queue_name(urllib.parse.unquote(match.group(1)))
            if queue not in {entry["queue"] for entry in self.stats()["queues"]}:  # paused ones included
                return _web_error(404, "unknown queue %r: neither the app nor a message, worker or pause names it"
                                  % queue)
            getattr(self.transport, match.group(2))([queue])
            return 200, {"queue": queue, "paused": match.group(2) == "pause"}
        match = re.fullmatch(r"/api/messages/(\d{1,18})/cancel", path)
        if match:
            try:
                return 200, {"id": int(match.group(1)), "cancelled": self.transport.cancel(int(match.group(1)))}
            except UnknownMessage as exc:
                return _web_error(404, str(exc))
        if path == "/api/stop-workers":
            return 200, {"asked": self.transport.request_stop()}
        return _web_error(404, "no such action: %s" % path)

    @staticmethod
    def check_action(body):
        """Refuse a body that could be read as wider than meant: a remove cannot be undone."""
        if not isinstance(body, dict):
            raise InvalidMessage("the body must be a JSON object with ids or all")
        unknown = sorted(set(body) - {"ids", "all", "handler", "error"})
        if unknown:
            raise InvalidMessage("unknown key %r: give ids, or all with the filters handler and error" % unknown[0])
        if "ids" in body and "all" in body:
            raise InvalidMessage('give {"ids": [1, 2]} or {"all": true}, not both')
        for key in ("handler", "error"):
            if key in body and not (isinstance(body[key], str) and body[key].strip()):
                raise InvalidMessage("%s must be a non-blank string, not %s" % (key, json.dumps(body[key])[:80]))
            if key in body and "all" not in body:
                raise InvalidMessage("%s filters all, not ids" % key)

    def act_on_failed(self, verb, body):
        self.check_action(body)
        ids = body.get("ids")
        if body.get("all") is True:
            matches = _failed_filter(*self.filters(body))
            targets = sorted(e.id for e in self.transport.failed() if matches is None or matches(e))
        elif isinstance(ids, list) and ids and all(type(i) is int for i in ids):
            targets = self.transport.check_failed_ids(ids)
        else:
            raise InvalidMessage('give {"ids": [1, 2]} or {"all": true}')
        done, left = 0, {}
        for start in range(0, len(targets), _BATCH):
            chunk = targets[start:start + _BATCH]
            with self.transport.transaction(self.transport.connection(create=False)) as conn:
                if verb == "retry":
                    moved, stayed = self.transport.requeue_failed(chunk, conn, self.queue_of)
                    done += moved
                    left.update((str(k), v) for k, v in stayed.items())
                else:
                    done += self.transport.remove_failed(chunk, conn)
        answer = {"requeued" if verb == "retry" else "removed": done}
        if left:
            answer["left"] = left
        return answer


def _request_json(content_length, stream):
    """The JSON body of a request, read exactly: a bad length is the client's error, never a read until EOF."""
    given = (content_length or "0").strip()
    if not (given.isascii() and given.isdigit()):
        raise InvalidMessage("Content-Length must be a number of bytes, not %r" % given[:40])
    length = int(given)
    if length > _MIB:
        raise InvalidMessage("request body over 1 MiB")
    raw = stream.read(length) if length else b"{}"
    try:
        return json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise InvalidMessage("the request body is not JSON") from None


def _response_json(data, **options):
    """Strict JSON (JSON.parse, jq, Go): a row written by another tool may hold NaN or Infinity."""
    try:
        return json.dumps(data, default=str, allow_nan=False, **options)
    except ValueError:
        try:
            return json.dumps(_finite(data), default=str, allow_nan=False, **options)
        except RecursionError:  # only a row written by another tool nests this deep
            return json.dumps({"error": "a stored value holds NaN or Infinity too deep to show"})


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _web_handler(dashboard, page):
    import urllib.parse

    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        server_version = "jobrunner/" + __version__
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            _log.log(_VERBOSE, "web %s - %s", self.address_string(), fmt % args)

        def do_GET(self):
            self.respond(writing=False)

        def do_POST(self):
            self.respond(writing=True)

        def respond(self, writing):
            self.body_read = False
            parts = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parts.query)
            try:
                if not self.host_allowed():
                    return self.send(421, {"error": "this server answers to its own address only"})
                if not dashboard.authorized(self.headers, query, writing):
                    status = 403 if self.headers.get("Authorization") else 401
                    return self.send(status, {"error": "a valid token is needed (Authorization: Bearer TOKEN%s)"
                                              % ("" if writing else ", or ?token=TOKEN")})
                if writing:
                    status, data = dashboard.post(parts.path, self.body())
                elif parts.path == "/":
                    return self.send(200, page, "text/html; charset=utf-8")
                elif parts.path == "/metrics":
                    return self.send(200, _metrics_text(dashboard.transport, dashboard.app),
                                     "text/plain; version=0.0.4; charset=utf-8")
                else:
                    status, data = dashboard.get(parts.path, query)
                self.send(status, data)
            except (InvalidMessage, UnknownMessage, ConfigurationError) as exc:
                self.send(400 if not isinstance(exc, UnknownMessage) else 404, {"error": str(exc)})
            except JobRunnerError as exc:
                self.send(503, {"error": str(exc)})
            finally:
                dashboard.transport.close()  # this request's thread ends here: so does its connection

        def host_allowed(self):
            # on loopback, only the loopback names: a page elsewhere cannot rebind a name to 127.0.0.1
            if not dashboard.loopback:
                return True
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
            return host in ("localhost", "127.0.0.1", "::1", "")

        def body(self):
            self.body_read = True
            closing, self.close_connection = self.close_connection, True  # refused unread: the connection closes
            body = _request_json(self.headers.get("Content-Length"), self.rfile)
            self.close_connection = closing
            return body

        def refuse_method(self):
            self.send(405, {"error": "%s is not served here: GET, or POST for a change" % self.command},
                      allow="GET, POST")

        do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse_method

        def send(self, status, data, content_type="application/json", allow=None):
            _send_response(self, status, data, content_type, allow)

    return Handler


_SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
)


def _send_response(request, status, data, content_type, allow=None):
    """Write one answer of the web server: JSON unless bytes or text are given, never cached, never framed."""
    body = data if isinstance(data, (bytes, str)) else _response_json(data)
    body = body.encode("utf-8") if isinstance(body, str) else body
    request.send_response(status)
    if allow:
        request.send_header("Allow", allow)
    if (request.headers.get("Content-Length") or "0").strip() != "0" and not getattr(request, "body_read", False):
        request.close_connection = True  # its body, unread, would be taken for the next request
    if request.close_connection:
        request.send_header("Connection", "close")
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for name, value in _SECURITY_HEADERS:
        request.send_header(name, value)
    request.end_headers()
    if request.command != "HEAD":
        request.wfile.write(body)


def _is_loopback(host):
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_dashboard(transport, host="127.0.0.1", port=8080, token=None, app=None, ready=None):
    """Serve the dashboard until interrupted.  A host off loopback needs a token."""
    import secrets
    import socket
    import urllib.parse
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    loopback = _is_loopback(host)
    if not token and not loopback:
        raise ConfigurationError("serving on %s, off loopback, needs a token: --token or JOBRUNNER_WEB_TOKEN" % host)
    token = token or secrets.token_urlsafe(24)
    dashboard = _Dashboard(transport, token, loopback, app)
    server = Server((host, port), _web_handler(dashboard, _DASHBOARD_PAGE))
    url = "http://%s:%d/?token=%s" % ("[%s]" % host if ":" in host else host, server.server_address[1],
                                      urllib.parse.quote(token, safe=""))
    if ready is not None:
        ready(url)
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()


@_command("web", _option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
          _option("--port", type="port", default=8080, show_default=True, help="Port (0: any free one)."),
          _option("--token", envvar="JOBRUNNER_WEB_TOKEN", help="Token the page and the API ask for (default: a new "
                  "one on loopback; required elsewhere). Also $JOBRUNNER_WEB_TOKEN."),
          _VERBOSITY, _APP)
def _cmd_web(host, port, token, verbosity, app_spec, dsn):
    """Serve the dashboard, its JSON API and /metrics; print its URL (with the token)."""
    _configure_logging(verbosity, "web")
    app, transport = _transport_from(app_spec, dsn)
    transport.connection(create=False)  # a database that is not one: say so now, not on the first request

    def announce(url):
        _echo("jobrunner web on %s\n    %s" % (transport.where, url))
        _flush_std_streams()

    previous = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        serve_dashboard(transport, host, port, token, app, announce)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise ConfigurationError("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@_command("metrics", _WHICH, _APP)
def _cmd_metrics(verbosity, app_spec, dsn):
    """Print the queues, processes and counters in Prometheus' text format."""
    app, transport = _transport_from(app_spec, dsn, verbosity)
    sys.stdout.write(_metrics_text(transport, app))


_DASHBOARD_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'">
<title>jobrunner</title>
<style>
  :root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --soft: #f6f8fa; --blue: #4a7fc1; --red: #cf222e; }
  * { box-sizing: border-box; }
  [hidden] { display: none !important; }
  body { margin: 0 auto; max-width: 1200px; padding: 0 16px 48px; color: var(--fg); background: #fff;
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header.top { position: sticky; top: 0; z-index: 2; background: #fff; padding: 10px 0 6px; border-bottom: 1px solid var(--line); }
  h1 { font-size: 22px; margin: 0; }
  h1 small { font-size: 13px; font-weight: normal; color: var(--muted); margin-left: 8px; }
  h2 { font-size: 18px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
  h3 { font-size: 15px; margin: 16px 0 8px; }
  h4 { font-size: 13px; margin: 12px 0 4px; color: var(--muted); }
  nav a { color: var(--blue); margin-right: 10px; text-decoration: none; }
  .status-line { margin: 4px 0 0; min-height: 20px; }
  .muted { color: var(--muted); }
  #message { margin-left: 12px; } #message.ok { color: #1a7f37; }
  #message.error, #cancel-result.error { color: var(--red); }
  .banner { margin-top: 6px; padding: 6px 10px; border: 1px solid #ffb3b3; background: #ffebe9; color: #82071e; border-radius: 4px; }
  .banner button { float: right; border: 0; background: none; font-size: 16px; line-height: 1; }
  table.data { border-collapse: collapse; width: 100%; margin: 6px 0; }
  table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
  table.data th { background: var(--soft); font-weight: 600; white-space: nowrap; }
  table.data .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  section { scroll-margin-top: 100px; }
  table.data td.when { white-space: nowrap; }
  tr.paused td { background: #fff8e1; }
  td.message { max-width: 520px; overflow-wrap: anywhere; }
  td.state-RUNNING { color: #1a7f37; background: #dafbe1; font-weight: 600; }
  td.state-BACKOFF { color: #7d4e00; background: #fff3c4; font-weight: 600; }
  td.state-FATAL, td.state-UNKNOWN { color: #a40e26; background: #ffebe9; font-weight: 600; }
  td.state-STARTING, td.state-STOPPING, td.state-EXITED, td.state-STOPPED { color: #57606a; background: #eaeef2; }
  button { font: inherit; padding: 3px 10px; border: 1px solid var(--line); border-radius: 4px; background: var(--soft); cursor: pointer; }
  button:hover:not(:disabled) { background: #eaeef2; }
  button:disabled { opacity: .5; cursor: default; }
  button.danger { color: var(--red); }
  button.show { border: 0; background: none; padding: 0; color: var(--blue); text-decoration: underline; }
  button[aria-pressed="true"] { background: #ddf4ff; border-color: #54aeff; }
  input { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 4px; }
  .row { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 8px 0; }
  .chart { border: 1px solid var(--line); border-radius: 4px; padding: 4px; min-height: 120px; }
  .chart svg { display: block; width: 100%; height: auto; }
  .chart .axis { stroke: #8c959f; } .chart .grid { stroke: var(--line); stroke-dasharray: 3 3; }
  .chart .bar-handled { fill: var(--blue); } .chart .bar-failed { fill: var(--red); }
  .chart .hit { fill: transparent; } .chart .hit:hover { fill: rgba(0, 0, 0, .06); }
  .chart text { font-size: 11px; fill: var(--muted); }
  .swatch { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; vertical-align: middle; }
  .swatch.handled { background: var(--blue); margin-left: 0; } .swatch.failed { background: var(--red); }
  .detail { margin-top: 14px; padding: 10px 14px; border: 1px solid var(--line); border-radius: 6px; background: var(--soft); }
  .detail dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
  .detail dt { color: var(--muted); } .detail dd { margin: 0; overflow-wrap: anywhere; }
  pre { margin: 0; padding: 8px; background: #fff; border: 1px solid var(--line); border-radius: 4px; max-height: 360px;
        overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 12px; }
</style>
</head>
<body>
<header class="top">
  <h1>jobrunner <small id="where"></small></h1>
  <nav><a href="#overview">Overview</a><a href="#processes">Processes</a><a href="#failed">Failed</a><a href="#control">Control</a></nav>
  <p class="status-line"><span id="updated" class="muted">last updated —</span><span id="message" role="status" aria-live="polite"></span></p>
  <div id="error-banner" class="banner" role="alert" hidden>
    <button type="button" data-action="dismiss-error" aria-label="dismiss">×</button><span id="error-text"></span>
  </div>
</header>

<section id="overview">
  <h2>Overview</h2>
  <table class="data">
    <thead><tr><th>queue</th><th class="num">ready</th><th class="num">delayed</th><th class="num">in flight</th>
      <th class="num">oldest ready</th><th>paused</th><th></th></tr></thead>
    <tbody id="queues-body"><tr><td colspan="7" class="muted">loading…</td></tr></tbody>
  </table>
  <p>Failed messages: <strong id="failed-count">—</strong> <a href="#failed">(list)</a></p>
  <div class="row"><h3>Throughput</h3>
    <button type="button" data-range="1h" aria-pressed="true">last hour</button>
    <button type="button" data-range="24h" aria-pressed="false">last 24 h</button></div>
  <div id="chart" class="chart"></div>
  <p><span class="swatch handled"></span>handled<span class="swatch failed"></span>failed
    <span id="chart-summary" class="muted"></span></p>
</section>

<section id="processes">
  <h2>Processes</h2>
  <table class="data">
    <thead><tr><th>name</th><th>program</th><th>state</th><th class="num">pid</th><th class="num">uptime</th>
      <th class="num">handled</th><th class="num">failed</th><th class="num">RSS (MB)</th><th class="num">last beat</th></tr></thead>
    <tbody id="processes-body"><tr><td colspan="9" class="muted">loading…</td></tr></tbody>
  </table>
  <p><button type="button" id="stop-workers" class="danger" data-action="stop-workers">Stop workers</button>
    <span class="muted">each worker finishes its current message, then exits</span></p>
</section>

<section id="failed">
  <h2>Failed messages</h2>
  <form id="filter-form" class="row" autocomplete="off">
    <label>handler <input id="filter-handler" type="search" maxlength="200"></label>
    <label>error class <input id="filter-error" type="search" maxlength="200"></label>
    <button type="submit" id="filter-button">Search</button>
    <button type="button" data-action="clear-filter">Clear</button>
  </form>
  <div class="row">
    <button type="button" data-action="retry-selected">Retry selected</button>
    <button type="button" data-action="remove-selected" class="danger">Remove selected</button>
    <button type="button" data-action="retry-all">Retry all</button>
    <button type="button" data-action="remove-all" class="danger">Remove all</button>
    <span id="filter-note" class="muted"></span>
  </div>
  <table class="data">
    <thead><tr><th><input type="checkbox" id="select-page" aria-label="select every message on this page"></th>
      <th>id</th><th>handler</th><th>queue</th><th>error</th><th class="num">attempts</th><th>failed at</th></tr></thead>
    <tbody id="failed-body"><tr><td colspan="7" class="muted">loading…</td></tr></tbody>
  </table>
  <div class="row">
    <button type="button" id="failed-prev" data-action="prev-page" disabled>Previous</button>
    <span id="failed-range">—</span>
    <button type="button" id="failed-next" data-action="next-page" disabled>Next</button>
  </div>

  <section id="detail" class="detail" hidden>
    <div class="row">
      <h3 id="detail-title">message</h3>
      <button type="button" id="detail-retry" data-action="retry-one">Retry</button>
      <button type="button" id="detail-remove" data-action="remove-one" class="danger">Remove</button>
      <button type="button" id="detail-close" data-action="close-detail">Close</button>
    </div>
    <dl id="detail-fields"></dl>
    <h4>payload</h4><pre id="detail-payload"></pre>
    <h4>traceback</h4><pre id="detail-traceback"></pre>
    <h4>other headers</h4><pre id="detail-headers"></pre>
  </section>
</section>

<section id="control">
  <h2>Control</h2>
  <form id="cancel-form" class="row" autocomplete="off">
    <label>message id <input id="cancel-id" type="text" inputmode="numeric" size="12" maxlength="18"></label>
    <button type="submit" id="cancel-button">Cancel message</button>
  </form>
  <p id="cancel-result" aria-live="polite"></p>
  <p class="muted">A waiting message is taken off its queue; a running one is interrupted.</p>
</section>

<script>
(function () {
  'use strict';

  // ---- constants and state -------------------------------------------------------------
  const PAGE_SIZE = 50, REFRESH_MS = 5000, TIMEOUT_MS = 20000;
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const STATES = ['RUNNING', 'STARTING', 'BACKOFF', 'STOPPING', 'EXITED', 'FATAL', 'STOPPED', 'UNKNOWN'];
  const RANGES = { '1h': { seconds: 3600, step: 60, label: 'last hour', per: 'per minute' },
                   '24h': { seconds: 86400, step: 600, label: 'last 24 h', per: 'per 10 minutes' } };

  const state = {
    token: '', range: '1h', refreshing: false, bannerSource: null,
    failed: { offset: 0, total: 0, shown: 0, handler: '', error: '', seq: 0 },
    detail: { id: null, seq: 0 },
  };

  // ---- small helpers -------------------------------------------------------------------
  // attrs: an object whose keys are attribute names written in this file, never taken from data;
  // text goes in with textContent only
  function fill(node, attrs, text) {
    if (attrs) Object.keys(attrs).forEach((name) => node.setAttribute(name, String(attrs[name])));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function el(tag, attrs, text) { return fill(document.createElement(tag), attrs, text); }
  function svg(tag, attrs, text) { return fill(document.createElementNS(SVG_NS, tag), attrs, text); }

  function td(text, cls) { return el('td', cls ? { class: cls } : null, text); }
  function byId(id) { return document.getElementById(id); }
  function str(v) { return v === null || v === undefined ? '' : String(v); }
  function pad2(n) { return n < 10 ? '0' + n : String(n); }

  // every number shown goes through num(): anything that is not a finite number becomes null
  function num(v) {
    if (v === null || v === undefined || v === '' || typeof v === 'boolean') return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  function toId(v) {
    const n = typeof v === 'string' && /^[0-9]{1,18}$/.test(v.trim()) ? Number(v.trim()) : v;
    return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0 ? n : null;
  }

  function fmtInt(v) { const n = num(v); return n === null ? '—' : Math.round(n).toLocaleString('en-US'); }
  function fmtMB(v) { const n = num(v); return n === null ? '—' : (n / 1e6).toFixed(1); }
  function plural(n, word) { return fmtInt(n) + ' ' + word + (Number(n) === 1 ? '' : 's'); }
  function fmtHMS(d) { return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds()); }
  function fmtHM(unix) { const d = new Date(unix * 1000); return pad2(d.getHours()) + ':' + pad2(d.getMinutes()); }

  function fmtClock(v) {  // h:mm:ss
    const n = num(v);
    if (n === null) return '—';
    const s = Math.max(0, Math.floor(n));
    return Math.floor(s / 3600) + ':' + pad2(Math.floor(s / 60) % 60) + ':' + pad2(s % 60);
  }

  function fmtAge(v) {
    const n = num(v);
    if (n === null) return '—';
    return n < 10 ? Math.max(0, n).toFixed(1) + ' s' : (n < 120 ? Math.round(n) + ' s' : fmtClock(n));
  }

  function fmtDateTime(v) {  // local time, YYYY-MM-DD HH:MM:SS
    const n = num(v);
    const d = new Date(n === null ? NaN : n * 1000);
    if (isNaN(d.getTime())) return '—';
    return d.getFullYear() + '-' + pad2(d.getMonth() + 1) + '-' + pad2(d.getDate()) + ' ' + fmtHMS(d);
  }

  // control characters (line breaks, tabs) become spaces, runs of spaces one space
  function oneLine(text) {
    return Array.from(str(text), (c) => (c < ' ' ? ' ' : c)).join('').replace(/ +/g, ' ').trim();
  }

  function shorten(text, max) {
    const chars = Array.from(oneLine(text));
    return chars.length <= max ? chars.join('') : chars.slice(0, max - 1).join('') + '…';
  }

  function objects(list) { return Array.isArray(list) ? list.filter((x) => x && typeof x === 'object') : []; }

  function prettyJSON(value) {
    if (value === undefined) return '(none)';
    try { return JSON.stringify(value, null, 2); } catch (err) { return str(value); }
  }

  // ---- messages and errors -------------------------------------------------------------
  function say(text, isError) { fill(byId('message'), { class: isError ? 'error' : 'ok' }, text); }
  function errorText(err) { return shorten(err && err.message ? err.message : str(err) || 'unknown error', 400); }

  function showError(err, source) {
    const text = errorText(err);
    say('error: ' + text, true);
    byId('error-text').textContent = text;
    byId('error-banner').hidden = false;
    state.bannerSource = source || 'action';
  }

  function hideBanner() { byId('error-banner').hidden = true; state.bannerSource = null; }

  // ---- the API ---------------------------------------------------------------------------
  async function api(method, path, body) {
    const headers = { 'Accept': 'application/json' };
    if (state.token) headers['Authorization'] = 'Bearer ' + state.token;
    const init = { method: method, headers: headers, credentials: 'omit', cache: 'no-store' };
    if (method === 'POST') {
      headers['Content-Type'] = 'application/json';
      if (body !== undefined) init.body = JSON.stringify(body);
    }
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    init.signal = controller.signal;
    let response, text;
    try {
      response = await fetch(path, init);
      text = await response.text();
    } catch (err) {
      throw new Error(err && err.name === 'AbortError' ? 'no answer in time from ' + path
                                                        : 'cannot reach the server (' + errorText(err) + ')');
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (err) { data = null; }
    if (!response.ok) {
      let why = data && typeof data.error === 'string' ? data.error : 'HTTP ' + response.status + ' from ' + path;
      if (response.status === 401 && !state.token) why += ' (the address had no ?token=: open the link "jobrunner web" printed)';
      throw new Error(oneLine(why));
    }
    if (data === null || typeof data !== 'object') throw new Error('the server did not answer JSON for ' + path);
    return data;
  }

  function queuePath(name, verb) {
    if (!name || name === '.' || name === '..') throw new Error('this queue name cannot be used in a URL');
    return '/api/queues/' + encodeURIComponent(name) + '/' + verb;
  }

  // ---- overview: queues ----------------------------------------------------------------
  async function loadStats() {
    const data = await api('GET', '/api/stats');
    setRows('queues-body', objects(data.queues).map(queueRow), 7, 'no queues');
    byId('failed-count').textContent = fmtInt(data.failed);
    if (typeof data.where === 'string') byId('where').textContent = data.where;
  }

  function queueRow(q) {
    const name = str(q.queue);
    const paused = q.paused === true;
    const tr = el('tr', paused ? { class: 'paused' } : null);
    const last = el('td');
    last.appendChild(el('button', { type: 'button', 'data-action': paused ? 'resume' : 'pause', 'data-queue': name },
                        paused ? 'Resume' : 'Pause'));
    tr.append(td(name), td(fmtInt(q.ready), 'num'), td(fmtInt(q.delayed), 'num'), td(fmtInt(q.in_flight), 'num'),
              td(fmtAge(q.oldest_ready_age_s), 'num'), td(paused ? 'yes' : 'no'), last);
    return tr;
  }

  // the rows of a table body, or one line that says it is empty
  function setRows(bodyId, rows, span, emptyText) {
    if (!rows.length) rows.push(el('tr').appendChild(el('td', { colspan: span, class: 'muted' }, emptyText)).parentNode);
    byId(bodyId).replaceChildren(...rows);
  }

  async function setPaused(name, pause) {
    const data = await api('POST', queuePath(name, pause ? 'pause' : 'resume'));
    say('queue ' + str(data.queue || name) + (data.paused ? ' paused' : ' resumed'));
    await loadStats();
  }

  // ---- overview: throughput chart ------------------------------------------------------
  async function loadChart() {
    const range = state.range;
    const data = await api('GET', '/api/throughput?range=' + encodeURIComponent(range));
    if (range === state.range) renderChart(fillSeries(data, range), range);  // else the user switched meanwhile
  }

  // one entry per period from now - range to now, zeros where the server had nothing
  function fillSeries(data, range) {
    const spec = RANGES[range];
    let step = num(data.step_s);
    if (step === null || step <= 0) step = spec.step;
    step = Math.max(step, Math.ceil(spec.seconds / 1440));  // at most 1440 bars
    const buckets = new Map();
    let latest = 0;
    objects(data.points).filter(Array.isArray).forEach((p) => {
      const t = num(p[0]);
      if (t === null) return;
      const key = Math.floor(t / step) * step;
      const sum = buckets.get(key) || [0, 0];
      buckets.set(key, [sum[0] + (num(p[1]) || 0), sum[1] + (num(p[2]) || 0)]);
      latest = Math.max(latest, key);
    });
    const end = Math.max(Math.floor(Date.now() / 1000 / step) * step, latest);
    const count = Math.max(1, Math.round(spec.seconds / step));
    return Array.from({ length: count }, (_, i) => {
      const t = end - (count - 1 - i) * step;
      const sum = buckets.get(t) || [0, 0];
      return { t: t, handled: Math.max(0, sum[0]), failed: Math.max(0, sum[1]) };
    });
  }

  function niceCeil(v) {  // 1, 2, 5, 10, 20, 50...
    if (!(v > 0)) return 1;
    const base = Math.pow(10, Math.floor(Math.log10(v)));
    return Math.max(1, [1, 2, 5, 10].find((f) => f * base >= v) * base);
  }

  function renderChart(series, range) {
    const W = 800, H = 220, L = 56, R = 12, T = 14, B = 26, plotW = W - L - R, bottom = H - B;
    const ymax = niceCeil(series.reduce((m, p) => Math.max(m, p.handled, p.failed), 0));
    const totals = series.reduce((s, p) => [s[0] + p.handled, s[1] + p.failed], [0, 0]);
    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'throughput, ' + RANGES[range].label });
    root.append(svg('line', { x1: L, y1: T, x2: W - R, y2: T, class: 'grid' }),
                svg('line', { x1: L, y1: bottom, x2: W - R, y2: bottom, class: 'axis' }),
                svg('line', { x1: L, y1: T, x2: L, y2: bottom, class: 'axis' }),
                svg('text', { x: L - 6, y: T + 4, 'text-anchor': 'end', class: 'ymax' }, fmtInt(ymax)),
                svg('text', { x: L - 6, y: bottom + 4, 'text-anchor': 'end' }, '0'));
    const slot = plotW / series.length;
    const height = (v) => Math.max(1, Math.min(bottom - T, (v / ymax) * (bottom - T)));
    series.forEach((p, i) => root.appendChild(chartBar(p, L + i * slot, slot, T, bottom, height)));
    chartTicks(series.length).forEach((i) => {
      const x = L + (i + 0.5) * slot;
      const anchor = i === 0 ? 'start' : (i === series.length - 1 ? 'end' : 'middle');
      root.append(svg('line', { x1: x, y1: bottom, x2: x, y2: bottom + 4, class: 'axis' }),
                  svg('text', { x: { start: L, end: W - R }[anchor] || x, y: H - 8, 'text-anchor': anchor }, fmtHM(series[i].t)));
    });
    byId('chart').replaceChildren(root);
    byId('chart-summary').textContent = '— ' + RANGES[range].label + ': ' + fmtInt(totals[0]) + ' handled, ' +
      fmtInt(totals[1]) + ' failed (bars ' + RANGES[range].per + ')';
  }

  // one period: a transparent full-height area (for the tooltip), the handled bar, a narrower red failed bar
  function chartBar(p, x, slot, top, bottom, height) {
    const g = svg('g');
    const gap = slot > 4 ? slot * 0.15 : 0;
    g.append(svg('title', null, fmtHM(p.t) + '  handled ' + fmtInt(p.handled) + ', failed ' + fmtInt(p.failed)),
             svg('rect', { x: x, y: top, width: slot, height: bottom - top, class: 'hit' }));
    if (p.handled > 0) {
      g.appendChild(svg('rect', { x: x + gap / 2, y: bottom - height(p.handled), width: Math.max(0.5, slot - gap),
                                  height: height(p.handled), class: 'bar-handled' }));
    }
    if (p.failed > 0) {
      g.appendChild(svg('rect', { x: x + slot * 0.25, y: bottom - height(p.failed), width: Math.max(0.5, slot * 0.5),
                                  height: height(p.failed), class: 'bar-failed' }));
    }
    return g;
  }

  function chartTicks(n) {  // five evenly spread bar indexes, for the time labels
    const picks = [0, Math.round(n / 4), Math.round(n / 2), Math.round((3 * n) / 4), n - 1];
    return picks.filter((i, k) => i >= 0 && i < n && picks.indexOf(i) === k);
  }

  function setRange(range) {
    if (!RANGES[range]) return;
    state.range = range;
    document.querySelectorAll('button[data-range]').forEach((b) => {
      b.setAttribute('aria-pressed', b.getAttribute('data-range') === range ? 'true' : 'false');
    });
    loadChart().catch(showError);
  }

  // ---- processes -------------------------------------------------------------------------
  async function loadStatus() {
    const data = await api('GET', '/api/status');
    setRows('processes-body', objects(data.processes).map(processRow), 9, 'no processes');
  }

  function processRow(p) {
    const stateName = str(p.state);
    const known = STATES.indexOf(stateName) >= 0 ? stateName : 'UNKNOWN';
    const tr = el('tr', p.description ? { title: shorten(p.description, 300) } : null);
    tr.append(td(p.name), td(str(p.program) || '—'), td(stateName || '—', 'state-' + known), td(fmtPid(p.pid), 'num'),
              td(fmtClock(p.uptime_s), 'num'), td(fmtInt(p.handled), 'num'), td(fmtInt(p.failed), 'num'),
              td(fmtMB(p.rss_bytes), 'num'), td(num(p.beat_age_s) === null ? '—' : fmtAge(p.beat_age_s) + ' ago', 'num'));
    return tr;
  }

  function fmtPid(v) { const n = num(v); return n === null ? '—' : String(Math.round(n)); }

  async function stopWorkers() {
    if (!window.confirm('Ask every worker to stop after its current message?')) return;
    const data = await api('POST', '/api/stop-workers');
    say('asked ' + plural(data.asked, 'worker') + ' to stop');
    await loadStatus();
  }

  // ---- failed messages ---------------------------------------------------------------------
  function filterParams(target) {  // the filters of the last search, added to a query or a body
    if (state.failed.handler && state.failed.handler.trim()) target.handler = state.failed.handler;
    if (state.failed.error && state.failed.error.trim()) target.error = state.failed.error;
    return target;
  }

  function filterText() {
    const f = state.failed;
    return [['handler', f.handler], ['error', f.error]].filter((p) => p[1]).map((p) => p[0] + ' ' + p[1]).join(', ');
  }

  async function loadFailed() {
    const f = state.failed;
    const seq = ++f.seq;
    const query = new URLSearchParams(filterParams({ offset: String(f.offset), limit: String(PAGE_SIZE) }));
    const data = await api('GET', '/api/failed?' + query.toString());
    if (seq !== f.seq) return;  // a newer request was made since
    const rows = objects(data.failed);
    f.total = num(data.total) === null ? rows.length : num(data.total);
    const lastPage = Math.max(0, Math.floor((f.total - 1) / PAGE_SIZE) * PAGE_SIZE);
    if (!rows.length && f.offset > 0 && lastPage < f.offset) {  // the page emptied: show the last one
      f.offset = lastPage;
      return loadFailed();
    }
    renderFailed(rows);
  }

  function renderFailed(rows) {
    const f = state.failed;
    const filters = filterText();
    setRows('failed-body', rows.map(failedRow), 7, filters ? 'no failed message matches' : 'no failed messages');
    byId('select-page').checked = false;
    byId('failed-range').textContent = (rows.length ? fmtInt(f.offset + 1) + '–' + fmtInt(f.offset + rows.length) : '0') +
      ' of ' + fmtInt(f.total);
    f.shown = rows.length;
    renderPager();
    byId('filter-note').textContent = filters ? '“all” means all matching ' + filters : '';
  }

  function renderPager() {
    const f = state.failed;
    byId('failed-prev').disabled = f.offset <= 0;
    byId('failed-next').disabled = f.offset + f.shown >= f.total;
  }

  function failedRow(r) {
    const id = toId(r.id);
    const pick = el('td');
    const show = el('td', null, id === null ? str(r.id) : null);
    if (id !== null) {
      pick.appendChild(el('input', { type: 'checkbox', class: 'select', 'data-id': id, 'aria-label': 'select ' + id }));
      show.appendChild(el('button', { type: 'button', class: 'show', 'data-id': id }, id));
    }
    const error = str(r.error_class) + (r.error_message ? ': ' + str(r.error_message) : '');
    const tr = el('tr');
    tr.append(pick, show, td(r.handler), td(r.original_queue), fill(td(shorten(error, 80), 'message'), { title: shorten(error, 2000) }),
              td(fmtInt(r.attempts), 'num'), td(fmtDateTime(r.failed_at), 'when'));
    return tr;
  }

  function selectedIds() {
    return Array.from(document.querySelectorAll('#failed-body input.select:checked'))
      .map((box) => toId(box.getAttribute('data-id'))).filter((id) => id !== null);
  }

  function describeRetry(data) {
    const left = data.left && typeof data.left === 'object' ? Object.keys(data.left) : [];
    const why = left.slice(0, 5).map((k) => '#' + k + ' ' + shorten(data.left[k], 120)).join('; ');
    return 'requeued ' + plural(data.requeued, 'message') +
      (left.length ? '; ' + fmtInt(left.length) + ' left: ' + why + (left.length > 5 ? '; …' : '') : '');
  }

  async function actOnFailed(verb, body) {
    const data = await api('POST', '/api/failed/' + verb, body);
    say(verb === 'retry' ? describeRetry(data) : 'removed ' + plural(data.removed, 'message'));
    const stayed = data.left && typeof data.left === 'object' ? data.left : {};
    const shown = state.detail.id;
    if (shown !== null && (body.all || body.ids.indexOf(shown) >= 0) && !(String(shown) in stayed)) closeDetail();
    await refreshAfter([loadFailed(), loadStats()]);
  }

  async function actOnSelected(verb) {
    const ids = selectedIds();
    if (!ids.length) return say('no message selected', true);
    if (verb === 'remove' && !window.confirm('Remove ' + plural(ids.length, 'selected message') + ' for good?')) return;
    await actOnFailed(verb, { ids: ids });
  }

  async function actOnAll(verb) {
    const filters = filterText();
    if (!window.confirm((verb === 'retry' ? 'Retry' : 'Remove') + ' all ' + fmtInt(state.failed.total) + ' failed messages' +
                        (filters ? ' matching ' + filters : '') + (verb === 'remove' ? ' for good?' : '?'))) return;
    await actOnFailed(verb, filterParams({ all: true }));
  }

  function search(handler, error) {
    Object.assign(state.failed, { handler: handler.trim(), error: error.trim(), offset: 0 });
    return loadFailed();
  }

  function clearFilter() {
    byId('filter-handler').value = byId('filter-error').value = '';
    return search('', '');
  }

  function turnPage(delta) {
    state.failed.offset = Math.max(0, state.failed.offset + delta * PAGE_SIZE);
    return loadFailed();
  }

  // ---- one failed message --------------------------------------------------------------
  async function openDetail(id) {
    if (id === null) return;
    const seq = ++state.detail.seq;
    state.detail.id = id;
    // while loading, the buttons must not act on the message shown before
    byId('detail-title').textContent = 'message ' + id + ' (loading…)';
    byId('detail').setAttribute('aria-busy', 'true');
    for (const b of ['detail-retry', 'detail-remove']) byId(b).disabled = true;
    byId('detail').hidden = false;
    try {
      const data = await api('GET', '/api/failed/' + encodeURIComponent(String(id)));
      if (seq !== state.detail.seq) return;
      renderDetail(id, data);
      byId('detail').scrollIntoView({ block: 'nearest' });
    } catch (err) {
      if (seq === state.detail.seq) closeDetail();
      showError(err);
    }
  }

  function renderDetail(id, data) {
    byId('detail-title').textContent = 'message ' + id;
    byId('detail-retry').setAttribute('data-id', String(id));
    byId('detail-remove').setAttribute('data-id', String(id));
    const fields = [['id', str(id)], ['handler', str(data.handler)], ['original queue', str(data.original_queue)],
      ['error class', str(data.error_class)], ['error message', str(data.error_message)],
      ['attempts', fmtInt(data.attempts)], ['failed at', fmtDateTime(data.failed_at)],
      ['created at', fmtDateTime(data.created_at)]];
    byId('detail-fields').replaceChildren(...fields.flatMap((f) => [el('dt', null, f[0]), el('dd', null, f[1] || '—')]));
    const headers = data.headers && typeof data.headers === 'object' && !Array.isArray(data.headers) ? data.headers : {};
    const trace = headers.traceback;
    const others = Object.assign({}, headers);
    delete others.traceback;
    byId('detail-payload').textContent = prettyJSON(data.payload);
    byId('detail-traceback').textContent = trace === undefined || trace === null ? '(none)'
      : (typeof trace === 'string' ? trace : prettyJSON(trace));
    byId('detail-headers').textContent = prettyJSON(others);
    for (const b of ['detail-retry', 'detail-remove']) byId(b).disabled = false;
    byId('detail').setAttribute('aria-busy', 'false');
  }

  function closeDetail() {
    state.detail.seq++;  // an answer still on its way is dropped
    state.detail.id = null;
    byId('detail').hidden = true;
  }

  function detailAction(verb, button) {
    const id = toId(button.getAttribute('data-id'));
    return id === null ? Promise.resolve() : actOnFailed(verb, { ids: [id] });
  }

  // ---- control: cancel a message -------------------------------------------------------
  function cancelResult(text, isError) { fill(byId('cancel-result'), { class: isError ? 'error' : '' }, text); }

  async function cancelMessage() {
    const raw = byId('cancel-id').value.trim();
    const id = /^[0-9]{1,18}$/.test(raw) ? toId(raw) : null;
    if (id === null) return cancelResult('give a message id: a whole number', true);
    cancelResult('cancelling message ' + id + '…');
    try {
      const data = await api('POST', '/api/messages/' + encodeURIComponent(String(id)) + '/cancel');
      cancelResult('message ' + id + ' cancelled (it was ' + shorten(data.cancelled, 40) + ')');
      say(byId('cancel-result').textContent);
    } catch (err) {
      cancelResult('error: ' + errorText(err), true);
      showError(err);
    }
    await refreshAfter([loadStats(), loadStatus()]);
  }

  // ---- refreshing ------------------------------------------------------------------------
  async function refreshAfter(promises) {
    const failure = (await Promise.allSettled(promises)).find((r) => r.status === 'rejected');
    if (failure) showError(failure.reason);
  }

  async function refreshAuto() {  // stats, processes and chart; never the failed list
    if (state.refreshing) return;
    state.refreshing = true;
    try {
      const results = await Promise.allSettled([loadStats(), loadStatus(), loadChart()]);
      const failure = results.find((r) => r.status === 'rejected');
      if (failure) return showError(failure.reason, 'refresh');
      if (state.bannerSource === 'refresh') hideBanner();
      byId('updated').textContent = 'last updated ' + fmtHMS(new Date());
    } finally {
      state.refreshing = false;
    }
  }

  // ---- events ------------------------------------------------------------------------------
  const ACTIONS = {
    'pause': (b) => setPaused(b.getAttribute('data-queue'), true),
    'resume': (b) => setPaused(b.getAttribute('data-queue'), false),
    'retry-selected': () => actOnSelected('retry'),
    'remove-selected': () => actOnSelected('remove'),
    'retry-all': () => actOnAll('retry'),
    'remove-all': () => actOnAll('remove'),
    'retry-one': (b) => detailAction('retry', b),
    'remove-one': (b) => detailAction('remove', b),
    'close-detail': closeDetail,
    'dismiss-error': hideBanner,
    'stop-workers': stopWorkers,
    'clear-filter': clearFilter,
    'prev-page': () => turnPage(-1),
    'next-page': () => turnPage(1),
    'search': () => search(byId('filter-handler').value, byId('filter-error').value),
    'cancel': cancelMessage,
  };

  // disables the button while its action runs; never lets an error escape
  async function run(button, action) {
    if (button.disabled) return;
    button.disabled = true;
    try {
      await action(button);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
      if (button.id === 'failed-prev' || button.id === 'failed-next') renderPager();
    }
  }

  function onClick(event) {
    const target = event.target instanceof Element ? event.target : null;
    const show = target && target.closest('button.show, a.show');
    const rangeButton = target && target.closest('button[data-range]');
    const button = target && target.closest('[data-action]');
    const action = button && ACTIONS[button.getAttribute('data-action')];
    if (show) {
      event.preventDefault();
      openDetail(toId(show.getAttribute('data-id')));
    } else if (rangeButton) {
      setRange(rangeButton.getAttribute('data-range'));
    } else if (action) {
      event.preventDefault();
      run(button, action);
    }
  }

  function onSubmit(event) {  // the two forms: Enter in an input, or their submit button
    event.preventDefault();
    const button = byId(event.target.id === 'cancel-form' ? 'cancel-button' : 'filter-button');
    run(button, ACTIONS[event.target.id === 'cancel-form' ? 'cancel' : 'search']);
  }

  function takeToken() {
    const params = new URLSearchParams(window.location.search);
    const token = params.get('token') || '';
    if (params.has('token')) {
      params.delete('token');
      const rest = params.toString();
      try {
        history.replaceState(history.state, '', window.location.pathname + (rest ? '?' + rest : '') + window.location.hash);
      } catch (err) { /* the token stays in the address bar; the page still works */ }
    }
    return token;
  }

  function init() {
    state.token = takeToken();
    document.addEventListener('click', onClick);
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && !byId('detail').hidden) closeDetail(); });
    byId('filter-form').addEventListener('submit', onSubmit);
    byId('cancel-form').addEventListener('submit', onSubmit);
    byId('select-page').addEventListener('change', () => {
      document.querySelectorAll('#failed-body input.select').forEach((box) => { box.checked = byId('select-page').checked; });
    });
    window.addEventListener('unhandledrejection', (e) => { e.preventDefault(); showError(e.reason); });
    refreshAuto();
    run(byId('filter-button'), loadFailed);
    setInterval(refreshAuto, REFRESH_MS);
  }

  window.jobrunner = Object.freeze({ refresh: refreshAuto, loadFailed: loadFailed, openDetail: openDetail });
  init();
})();
</script>
</body>
</html>
"""


# --- main() -------------------------------------------------------------------


def main(argv=None):
    """Run the command line; exit 0 ok, 1 failure of the thing asked, 2 bad usage or bad input."""
    if __name__ == "__main__":
        # `python jobrunner.py` runs this file as __main__; the app's `import jobrunner` must get this same module
        sys.modules.setdefault("jobrunner", sys.modules["__main__"])
    try:
        import click
    except ImportError:
        sys.stderr.write("jobrunner: error: the command line needs click: pip install click\n")
        return 2
    try:
        code = _cli().main(args=argv, prog_name="jobrunner", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Abort:
        sys.stderr.write("jobrunner: aborted\n")
        return 1
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            click.echo(exc.ctx.get_help())  # `jobrunner` or `jobrunner failed` alone: the help, as click shows it
            return exc.exit_code
        sys.stderr.write("jobrunner: error: %s\n" % " ".join(exc.format_message().split()))
        return 2
    except click.ClickException as exc:
        sys.stderr.write("jobrunner: error: %s\n" % " ".join(exc.format_message().split()))
        return exc.exit_code
    except JobRunnerError as exc:
        sys.stderr.write("jobrunner: error: %s\n" % " ".join(str(exc).split()))
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("jobrunner: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
