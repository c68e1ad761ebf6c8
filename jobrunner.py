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
    "Worker",
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

import contextlib
import ctypes
import dataclasses
import errno
import functools
import inspect
import json
import logging
import math
import os
import random
import re
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
import urllib.parse

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


# --- DSN and settings ---------------------------------------------------------

_KIB, _MIB = 1024, 1024 * 1024
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the database is and how jobrunner uses it.

    Every field but ``path`` can be set in the DSN's query string, e.g.
    ``sqlite:///var/jobs.db?synchronous=FULL&busy_timeout=30``.
    """

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

    @classmethod
    def from_dsn(cls, dsn, **overrides):
        """Parse ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a plain path."""
        if isinstance(dsn, os.PathLike):
            dsn = os.fspath(dsn)
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError("the DSN must be a non-empty string, like sqlite:///var/jobs.db")
        options = {}
        if "://" in dsn:
            scheme, _, rest = dsn.partition("://")
            if scheme.lower() not in ("sqlite", "sqlite3"):
                raise ConfigurationError("unsupported DSN scheme %r: jobrunner stores messages in SQLite (sqlite:///path.db)" % scheme)
            if not rest.startswith("/"):
                raise ConfigurationError("a SQLite DSN has three slashes: sqlite:///relative.db or sqlite:////absolute.db")
            path, _, query = rest[1:].partition("?")
            path = urllib.parse.unquote(path)
            options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        else:
            path = dsn
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ConfigurationError("the DSN must name a database file that workers in other processes can open, not %r" % path)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
        values = {}
        for key, raw in options.items():
            field = fields.get(key)
            if field is None:
                raise ConfigurationError("unknown DSN option %r (known: %s)" % (key, ", ".join(sorted(fields))))
            values[key] = _convert_option(key, raw, type(field.default))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(path=os.path.abspath(os.path.expanduser(path)), **values)


def _convert_option(key, raw, kind):
    try:
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
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")
    return "/".join(parts)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rss_bytes(_cache={}):
    """This process's resident memory, from psutil when installed, else /proc."""
    proc = _cache.get(os.getpid())
    if proc is None:
        try:
            import psutil
        except ImportError:
            proc = False
        else:
            proc = psutil.Process()
        _cache.clear()
        _cache[os.getpid()] = proc
    if proc:
        return proc.memory_info().rss
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB


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


def _is_decode_error(exc):
    return isinstance(exc, sqlite3.OperationalError) and "decode" in str(exc).lower()


def _decode_headers(text):
    try:
        headers = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    return headers if isinstance(headers, dict) else None


def _int_header(headers, key):
    """A count kept in the headers; 0 when absent or garbage."""
    value = headers.get(key, 0)
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


class Transport:
    """Where messages are stored. SQLite is the one shipped; another database implements these verbs.

    A *claim* marks a message as delivered to one worker; every later verb on
    that message (``ack``, ``retry``, ``fail``) is fenced by the claim, so a
    worker whose claim was released (because it was thought dead) cannot
    acknowledge a message that another worker now holds.
    """

    def setup(self):
        """Create the storage (idempotent)."""
        raise NotImplementedError

    def send(self, messages, conn=None):
        """Store ``(queue, body, headers, available_at)`` tuples in one transaction; return their ids."""
        raise NotImplementedError

    def claim(self, queues, worker_id, settle=None):
        """Settle the previous outcome, then claim the first available message of the first non-empty queue."""
        raise NotImplementedError

    def settle(self, outcome, conn=None):
        """Apply one outcome (``ack``, ``retry``, ``fail`` or ``release``); False when the claim was lost."""
        raise NotImplementedError

    def release(self, worker_ids, conn=None):
        """Make the messages claimed by these workers available again."""
        raise NotImplementedError

    def stats(self):
        """Per queue ready, delayed and in-flight counts, the oldest ready message, and the failed count."""
        raise NotImplementedError


_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messenger_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    headers TEXT NOT NULL,
    queue_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    available_at REAL NOT NULL,
    delivered_at REAL,
    claimed_by INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
-- Only unclaimed rows: claimed ones would sit in the claim's ORDER BY and force a sort.
CREATE INDEX IF NOT EXISTS messenger_messages_ready
    ON messenger_messages (queue_name, available_at, id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS messenger_messages_claimed
    ON messenger_messages (claimed_by) WHERE delivered_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobrunner_workers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    ppid INTEGER NOT NULL,
    queues TEXT NOT NULL,
    started_at REAL NOT NULL,
    beat_at REAL NOT NULL,
    handled INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    rss_bytes INTEGER,
    message_id INTEGER
);
CREATE INDEX IF NOT EXISTS jobrunner_workers_beat ON jobrunner_workers (beat_at);
CREATE TABLE IF NOT EXISTS jobrunner_processes (
    name TEXT PRIMARY KEY,
    program TEXT NOT NULL,
    host TEXT NOT NULL,
    supervisor_pid INTEGER NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    state_since REAL NOT NULL,
    started_at REAL,
    updated_at REAL NOT NULL,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobrunner_control (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

_COLUMNS = "id, body, headers, queue_name, created_at, available_at, delivered_at, attempts"

_SQL_INSERT = "INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at) VALUES (?, ?, ?, ?, ?)"
_SQL_CLAIM = (
    "UPDATE messenger_messages SET delivered_at = ?, claimed_by = ?, attempts = attempts + 1 "
    "WHERE id = (SELECT id FROM messenger_messages WHERE queue_name = ? AND delivered_at IS NULL "
    "AND available_at <= ? ORDER BY available_at, id LIMIT 1) "
    "RETURNING id, body, headers, queue_name, created_at, available_at, attempts"
)
_SQL_NEXT_DUE = "SELECT MIN(available_at) FROM messenger_messages WHERE queue_name = ? AND delivered_at IS NULL"
_FENCE = " WHERE id = ? AND claimed_by = ? AND attempts = ?"
_SQL_SETTLE = {
    "ack": "DELETE FROM messenger_messages" + _FENCE,
    "retry": "UPDATE messenger_messages SET delivered_at = NULL, claimed_by = NULL, available_at = ?, headers = ?" + _FENCE,
    "fail": "UPDATE messenger_messages SET queue_name = '" + FAILED_QUEUE + "', delivered_at = NULL, claimed_by = NULL, "
    "available_at = ?, headers = ?" + _FENCE,
    # a release gives back an attempt the worker never really made (it was told to stop)
    "release": "UPDATE messenger_messages SET delivered_at = NULL, claimed_by = NULL, attempts = attempts - 1" + _FENCE,
}

# Connections inherited across fork.  SQLite forbids using them in the child and
# closing one could checkpoint and delete the parent's WAL, so they are kept
# referenced here and never touched again.
_INHERITED_CONNECTIONS = []


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


def _storage_error(exc, path):
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


class SqliteTransport(Transport):
    """Messages in Symfony's ``messenger_messages`` table, in one SQLite file in WAL mode."""

    def __init__(self, settings):
        self.settings = settings
        self.path = settings.path
        self._local = threading.local()

    # Connections: one per thread, opened on first use, never carried across fork.

    def connection(self, create=True):
        """This thread's connection (autocommit mode; transactions are explicit)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None:
            if local.pid == os.getpid():
                return conn
            _INHERITED_CONNECTIONS.append(conn)
        conn = self._open(create)
        local.conn, local.pid = conn, os.getpid()
        return conn

    def reconnect(self):
        """Drop this thread's connection: after a failure the next use starts clean."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and self._local.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    close = reconnect

    def _open(self, create):
        path = self.path
        if not os.path.exists(path):
            if not create:
                raise StorageError("no database at %s (run `jobrunner setup` or dispatch a message first)" % path)
            _create_private_file(path)
        try:
            conn = sqlite3.connect(path, timeout=self.settings.busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _storage_error(exc, path) from None
        try:
            # validated values, not user text: PRAGMA takes no parameters
            if _log.isEnabledFor(_SQL_TRACE):
                conn.set_trace_callback(functools.partial(_log.log, _SQL_TRACE, "sql: %s"))
            conn.execute("PRAGMA synchronous = %s" % self.settings.synchronous)
            conn.execute("PRAGMA journal_size_limit = %d" % int(self.settings.journal_size_limit))
            self._initialize(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _storage_error(exc, path) from None
        return conn

    def _initialize(self, conn):
        """Create the schema and switch to WAL if not done yet.

        Two processes opening a new file at once can get SQLITE_BUSY at once,
        without the busy handler (SQLite refuses to wait where waiting could
        deadlock while the file is still in rollback mode): retry a while.
        """
        deadline = time.monotonic() + self.settings.busy_timeout
        while True:
            try:
                if conn.execute("PRAGMA user_version").fetchall()[0][0] < _SCHEMA_VERSION:
                    self._create_schema(conn)
                elif conn.execute("PRAGMA journal_mode").fetchall()[0][0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL").fetchall()
                return
            except sqlite3.OperationalError as exc:
                if not ("locked" in str(exc) or "busy" in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.02))

    def _create_schema(self, conn):
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
        if mode.lower() != "wal":
            _log.warning("database %s could not switch to WAL mode (journal_mode=%s); workers will contend more", self.path, mode)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchall()[0][0] < _SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("PRAGMA user_version = %d" % _SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def transaction(self, conn=None, user_code=False):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

        IMMEDIATE takes the write lock up front: a deferred transaction that
        upgrades to a write fails with SQLITE_BUSY under WAL whatever the timeout.
        SQLite errors become StorageError, except those of ``user_code``.
        """
        conn = conn or self.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self.reconnect()
            if isinstance(exc, sqlite3.Error) and not user_code:
                raise _storage_error(exc, self.path) from exc
            raise

    def setup(self):
        self.connection()
        return self.path

    def data_version(self):
        """Changes whenever another connection commits; reading it costs no disk I/O."""
        return self.connection().execute("PRAGMA data_version").fetchall()[0][0]

    # Messages

    def send(self, messages, conn=None):
        """Store ``(queue, body, headers, available_at)`` tuples; return their ids.

        With ``conn`` inside an open transaction the rows join it; otherwise
        they commit before this returns.
        """
        now = time.time()
        rows = [(body, headers, queue, now, now if available_at is None else available_at) for queue, body, headers, available_at in messages]
        if conn is None:
            conn = self.connection()
        try:
            if len(rows) == 1:
                return [conn.execute(_SQL_INSERT, rows[0]).lastrowid]
            if conn.in_transaction:
                return self._insert_many(conn, rows)
            with self.transaction(conn):
                return self._insert_many(conn, rows)
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from None

    @staticmethod
    def _insert_many(conn, rows):
        # Inside the write lock AUTOINCREMENT hands out consecutive ids, so the
        # ids are known without a RETURNING round trip per row.
        before = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messenger_messages'").fetchall()
        first = (before[0][0] if before else 0) + 1
        conn.executemany(_SQL_INSERT, rows)
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messenger_messages'").fetchall()[0][0]
        if last - first + 1 != len(rows):
            raise StorageError("unexpected message ids after a batch insert")
        return list(range(first, last + 1))

    def claim(self, queues, worker_id, settle=None):
        """Settle ``settle`` (the previous message's outcome), then claim the next message.

        Both happen in one transaction, so a busy worker writes once per
        message.  Returns ``(delivery, settled, version, due)``: ``settled`` is
        False when the previous claim had been lost and its outcome refused;
        with no delivery, ``version`` is the data_version to wait on and
        ``due`` when the next delayed message becomes available.
        """
        conn = self.connection()
        try:
            return self._claim(conn, queues, worker_id, settle)
        except StorageError as exc:
            if not _is_decode_error(exc.__cause__):
                raise
            with _tolerant_text(conn):  # a row that is not UTF-8: claim it as bytes, it will fail as poison
                return self._claim(conn, queues, worker_id, settle)

    def _claim(self, conn, queues, worker_id, settle):
        settled = True
        version = due = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if settle is not None:
                    settled = conn.execute(_SQL_SETTLE[settle.kind], settle.params()).rowcount == 1
                row = None
                now = time.time()
                for queue in queues:
                    rows = conn.execute(_SQL_CLAIM, (now, worker_id, queue, now)).fetchall()
                    if rows:
                        row = rows[0]
                        break
                else:
                    # Read under the write lock: any commit after this changes data_version.
                    version = conn.execute("PRAGMA data_version").fetchall()[0][0]
                    due = self.next_due(queues)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from exc
        if row is None:
            return None, settled, version, due
        return _Delivery(*row, worker_id), settled, None, None

    def next_due(self, queues):
        """When the earliest unclaimed message of these queues becomes available (None if none)."""
        conn = self.connection()
        due = None
        for queue in queues:
            value = conn.execute(_SQL_NEXT_DUE, (queue,)).fetchall()[0][0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (due is None or value < due):
                due = value
        return due

    def settle(self, outcome, conn=None):
        """Apply one outcome; False when the claim had been lost (the outcome is refused)."""
        try:
            if conn is not None:
                return conn.execute(_SQL_SETTLE[outcome.kind], outcome.params()).rowcount == 1
            with self.transaction() as conn:
                return conn.execute(_SQL_SETTLE[outcome.kind], outcome.params()).rowcount == 1
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from None

    def release(self, worker_ids, conn=None):
        """Make every message claimed by these workers available again; return how many."""
        if not worker_ids:
            return 0
        count = 0
        for worker_id in worker_ids:
            count += conn.execute(
                "UPDATE messenger_messages SET delivered_at = NULL, claimed_by = NULL, available_at = ? "
                "WHERE claimed_by = ? AND delivered_at IS NOT NULL",
                (time.time(), worker_id),
            ).rowcount
        return count

    def release_unowned(self, conn, now):
        """Release claims whose worker is unknown: written by other tools, or left by a worker row removed by hand."""
        return conn.execute(
            "UPDATE messenger_messages SET delivered_at = NULL, claimed_by = NULL, available_at = ? "
            "WHERE delivered_at IS NOT NULL AND delivered_at < ? "
            "AND (claimed_by IS NULL OR claimed_by NOT IN (SELECT id FROM jobrunner_workers))",
            (now, now - self.unowned_after()),
        ).rowcount

    def unowned_after(self):
        """Seconds after which a claim with no known worker is released."""
        return min(self.settings.redeliver_timeout, self.settings.heartbeat_timeout * 2)

    # Reading

    def stats(self):
        """``{"queues": [{queue, ready, delayed, in_flight, oldest_ready_age_s}], "failed": n}``."""
        conn = self.connection(create=False)
        now = time.time()
        try:
            waiting = conn.execute(
                "SELECT queue_name, SUM(available_at <= ?), SUM(available_at > ?), MIN(available_at) "
                "FROM messenger_messages WHERE delivered_at IS NULL GROUP BY queue_name",
                (now, now),
            ).fetchall()
            claimed = dict(
                conn.execute(
                    "SELECT queue_name, COUNT(*) FROM messenger_messages WHERE delivered_at IS NOT NULL GROUP BY queue_name"
                ).fetchall()
            )
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from None
        queues, failed = {}, 0
        for queue, ready, delayed, oldest in waiting:
            if queue == FAILED_QUEUE:
                failed = ready + delayed
                continue
            age = round(max(0.0, now - oldest), 3) if ready else None
            queues[queue] = {"queue": queue, "ready": ready, "delayed": delayed, "in_flight": 0, "oldest_ready_age_s": age}
        for queue, count in claimed.items():
            entry = queues.setdefault(queue, {"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None})
            entry["in_flight"] = count
        return {"queues": [queues[q] for q in sorted(queues)], "failed": failed}

    def get(self, message_id):
        """One message by id, any queue, or None."""
        with _tolerant_text(self.connection(create=False)) as conn:
            rows = conn.execute("SELECT %s FROM messenger_messages WHERE id = ?" % _COLUMNS, (message_id,)).fetchall()
        return _envelope_from_row(rows[0]) if rows else None

    def failed(self, ids=None, limit=None):
        """Failed messages, newest first: all of them, or those with these ids."""
        conn = self.connection(create=False)
        sql = "SELECT %s FROM messenger_messages WHERE queue_name = ?" % _COLUMNS
        params = [FAILED_QUEUE]
        if ids is not None:
            sql += " AND id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(ids)))
        sql += " ORDER BY available_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        try:
            with _tolerant_text(conn):
                return [_envelope_from_row(row) for row in conn.execute(sql, params).fetchall()]
        except sqlite3.Error as exc:
            raise _storage_error(exc, self.path) from None

    def failed_count(self):
        return self.connection(create=False).execute(
            "SELECT COUNT(*) FROM messenger_messages WHERE queue_name = ? AND delivered_at IS NULL", (FAILED_QUEUE,)
        ).fetchall()[0][0]

    def failed_ids(self):
        rows = self.connection(create=False).execute(
            "SELECT id FROM messenger_messages WHERE queue_name = ? ORDER BY id", (FAILED_QUEUE,)
        ).fetchall()
        return [r[0] for r in rows]

    def requeue_failed(self, ids, conn):
        """Move these failed messages back to their original queues with a fresh attempt count."""
        now = time.time()
        moved = 0
        for envelope in self._failed_in(conn, ids):
            headers = {k: v for k, v in envelope.headers.items()
                       if k not in _FAILURE_HEADERS and k not in ("attempts", "free_retries", "last_error")}
            headers["redelivered_from_failed"] = _int_header(headers, "redelivered_from_failed") + 1
            queue = envelope.headers.get("original_queue")
            if not isinstance(queue, str) or not _QUEUE_NAME.match(queue) or queue == FAILED_QUEUE:
                queue = "async"
            moved += conn.execute(
                "UPDATE messenger_messages SET queue_name = ?, headers = ?, attempts = 0, available_at = ?, "
                "delivered_at = NULL, claimed_by = NULL WHERE id = ? AND queue_name = ?",
                (queue, _encode_headers(headers), now, envelope.id, FAILED_QUEUE),
            ).rowcount
        return moved

    def check_failed_ids(self, ids, conn=None):
        """Sorted unique ids; UnknownMessage naming those not in the failure queue."""
        ids = sorted(set(int(i) for i in ids))
        conn = conn or self.connection(create=False)
        found = {row[0] for row in conn.execute(
            "SELECT id FROM messenger_messages WHERE queue_name = ? AND id IN (SELECT value FROM json_each(?))",
            (FAILED_QUEUE, json.dumps(ids)),
        ).fetchall()}
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownMessage("no failed message with id %s" % ", ".join(map(str, missing)))
        return ids

    def remove_failed(self, ids, conn):
        return conn.execute(
            "DELETE FROM messenger_messages WHERE queue_name = ? AND id IN (SELECT value FROM json_each(?))",
            (FAILED_QUEUE, json.dumps(list(ids))),
        ).rowcount

    @staticmethod
    def _failed_in(conn, ids):
        with _tolerant_text(conn):
            rows = conn.execute(
                "SELECT %s FROM messenger_messages WHERE queue_name = ? AND id IN (SELECT value FROM json_each(?))"
                % _COLUMNS, (FAILED_QUEUE, json.dumps(list(ids))),
            ).fetchall()
        return [_envelope_from_row(row) for row in rows]


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


def _create_private_file(path):
    """Create the database file 0600 (SQLite gives its -wal and -shm files the same mode)."""
    directory = os.path.dirname(path) or "."
    try:
        _makedirs_private(directory)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError("cannot create database %s: %s" % (path, exc.strerror or exc)) from None


_FAILURE_HEADERS = ("original_queue", "error_class", "error_message", "traceback", "failed_at", "reason", "first_failed_at")


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
        self._accepts_any, self._allowed, self._required = _payload_signature(fn, name, transactional)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return "<Handler %s -> %s queue=%s>" % (self.name, getattr(self.fn, "__qualname__", self.fn), self.queue)

    def dispatch(self, *, _delay=0, _queue=None, **payload):
        """Dispatch a message to this handler; the keywords are its payload. Returns the message id."""
        return self.app.dispatch(self.name, payload, queue=_queue, delay=_delay)

    def dispatch_many(self, payloads, *, queue=None, delay=0):
        """Dispatch one message per payload in one transaction; returns their ids."""
        return self.app.dispatch_many(self.name, payloads, queue=queue, delay=delay)

    def check(self, payload):
        """Raise InvalidMessage unless ``handler(**payload)`` would bind."""
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
                 jitter=0.1, **settings):
        self.default_queue = _check_queue_name(queue)
        self.retry = RetryStrategy(max_retries, delay, multiplier, max_delay, jitter)
        self.handlers = {}
        self._declared_queues = [_check_queue_name(q) for q in queues]
        unknown = set(settings) - {f.name for f in dataclasses.fields(Settings)} | ({"path"} & set(settings))
        if unknown:
            raise ConfigurationError("JobRunner() got unknown setting(s): %s" % ", ".join(sorted(unknown)))
        self._settings_overrides = settings
        self._dsn = dsn or os.environ.get("JOBRUNNER_DSN") or "jobrunner.db"
        self.settings = Settings.from_dsn(self._dsn, **settings)
        self.transport = SqliteTransport(self.settings)
        self._tx = threading.local()

    def __repr__(self):
        return "<JobRunner %s, %d handlers>" % (self.settings.path, len(self.handlers))

    def use_dsn(self, dsn=None, **settings):
        """Point the app at another database or settings (the command line's ``--dsn``)."""
        if dsn:
            self._dsn = dsn
        self._settings_overrides = dict(self._settings_overrides, **{k: v for k, v in settings.items() if v is not None})
        self.settings = Settings.from_dsn(self._dsn, **self._settings_overrides)
        self.transport = SqliteTransport(self.settings)

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
            target = _check_queue_name(queue or self.default_queue)
            if target == FAILED_QUEUE:
                raise ConfigurationError("queue %r holds failed messages; route handler %s elsewhere" % (FAILED_QUEUE, handler_name))
            handler = Handler(self, fn, handler_name, target, retry, timeout, bool(transactional))
            self.handlers[handler_name] = handler
            return handler

        return register

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
                raise InvalidMessage("unknown queue %r (known: %s)" % (queue, ", ".join(known) or "none: register a handler first"))
        return list(queues)

    # Dispatch

    def _encode(self, name, payload, queue, delay, now):
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
            if queue == FAILED_QUEUE:
                raise InvalidMessage("messages cannot be dispatched to the %r queue" % FAILED_QUEUE)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not delay >= 0 or delay == float("inf"):
            raise InvalidMessage("delay must be a number of seconds >= 0, not %r" % (delay,))
        return queue, body, _headers_for(name), now + delay

    def dispatch(self, name, payload=None, queue=None, delay=0):
        """Store a message for handler ``name``; return its id.

        Inside a transactional handler or ``with jobs.transaction()``, the
        message joins that transaction; otherwise it is committed (and visible
        to workers) before this returns.
        """
        message = self._encode(name, payload, queue, delay, time.time())
        return self.transport.send([message], self._current_conn())[0]

    def dispatch_many(self, name_or_messages, payloads=None, *, queue=None, delay=0):
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
            messages.append(self._encode(name, payload, queue, delay, now))
        if not messages:
            return []
        return self.transport.send(messages, self._current_conn())

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
                stats["queues"].append({"queue": queue, "ready": 0, "delayed": 0, "in_flight": 0, "oldest_ready_age_s": None})
        stats["queues"].sort(key=lambda q: q["queue"])
        return stats

    def worker(self, queues=None, **options):
        """A :class:`Worker` for these queues (default: every known queue in order)."""
        return Worker(self, queues or self.queues, **options)

    def consume(self, *queues, **options):
        """Run a worker in this process until a limit or a signal stops it; return the reason."""
        return self.worker(list(queues) or None, **options).run()

    def stop_workers(self):
        """Ask every worker on this database to finish its current message and exit."""
        return _request_stop_workers(self.transport)

    def failed(self, ids=None, limit=None):
        """Envelopes in the failure queue, newest first."""
        return self.transport.failed(ids, limit)

    def retry_failed(self, ids):
        """Put these failed messages back on their queues; unknown ids raise UnknownMessage and change nothing."""
        return self._on_failed(ids, self.transport.requeue_failed)

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
        import tomllib
    except ImportError:  # Python < 3.11
        return None
    try:
        with open("pyproject.toml", "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigurationError("cannot read ./pyproject.toml: %s" % exc) from None
    tool = config.get("tool")
    section = tool.get("jobrunner") if isinstance(tool, dict) else None
    spec = section.get("app") if isinstance(section, dict) else None
    if spec is not None and not isinstance(spec, str):
        raise ConfigurationError("[tool.jobrunner] app in ./pyproject.toml must be a string like \"myapp.jobs:jobs\"")
    return spec


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
    except ImportError as exc:
        if getattr(exc, "name", None) and module_name.startswith(exc.name):
            raise ConfigurationError("cannot import app module %r: %s" % (module_name, exc)) from None
        raise
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


# --- The worker loop ----------------------------------------------------------------

_VERBOSE = 15  # one line per message: shown with -v
logging.addLevelName(_VERBOSE, "VERBOSE")
logging.addLevelName(_SQL_TRACE, "SQL")

_LEVELS = {0: logging.INFO, 1: _VERBOSE, 2: logging.DEBUG, 3: _SQL_TRACE}


def _log_formatter(name):
    return logging.Formatter("%(asctime)s " + name.replace("%", "%%") + "[%(process)d] %(levelname)s %(message)s",
                             "%Y-%m-%dT%H:%M:%S")


def _configure_logging(verbosity, name="worker", stream=None):
    """Log lines on stderr: lifecycle and errors; each message with -v; details with -vv; everything with -vvv."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_log_formatter(name))
    root = logging.getLogger("jobrunner")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(verbosity, _SQL_TRACE))
    root.propagate = False


_STOP_KEY = "stop_workers_at"
_SQLITE_TRANSACTION = 22  # authorizer action code of BEGIN, COMMIT and ROLLBACK
_TRACEBACK_LIMIT = 20000


def _request_stop_workers(transport):
    """Record the time of the request; every worker started before it stops after its current message."""
    now = time.time()
    with transport.transaction(transport.connection(create=False)) as conn:
        conn.execute(
            "INSERT INTO jobrunner_control (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_STOP_KEY, now),
        )
        return conn.execute("SELECT COUNT(*) FROM jobrunner_workers WHERE started_at <= ?", (now,)).fetchall()[0][0]


def _release_dead_workers(transport, host, now=None):
    """Release the claims of workers that stopped beating, or whose process is gone on this host.

    Returns the number of workers found dead.  Reads first and only takes the
    write lock when there is something to release.
    """
    settings = transport.settings
    now = now or time.time()
    conn = transport.connection()
    silent_since = now - settings.heartbeat_timeout
    rows = conn.execute("SELECT id, host, pid, beat_at FROM jobrunner_workers").fetchall()
    gone = {wid for wid, whost, pid, _ in rows if whost == host and not _pid_alive(pid)}  # gone stays gone
    dead = [wid for wid, _, _, beat in rows if beat < silent_since or wid in gone]
    unowned = conn.execute(
        "SELECT 1 FROM messenger_messages WHERE delivered_at IS NOT NULL AND delivered_at < ? "
        "AND (claimed_by IS NULL OR claimed_by NOT IN (SELECT id FROM jobrunner_workers)) LIMIT 1",
        (now - transport.unowned_after(),),
    ).fetchall()
    if not dead and not unowned:
        return 0
    with transport.transaction(conn):
        # re-read under the write lock: a silent worker may have beaten since
        fresh = dict(conn.execute("SELECT id, beat_at FROM jobrunner_workers").fetchall())
        dead = [wid for wid in dead if wid in fresh and (wid in gone or fresh[wid] < silent_since)]
        released = transport.release(dead, conn)
        conn.executemany("DELETE FROM jobrunner_workers WHERE id = ?", [(wid,) for wid in dead])
        released += transport.release_unowned(conn, now)
    if dead or released:
        _log.warning("released %d message(s) claimed by %d dead worker(s)", released, len(dead))
    return len(dead)


def _error_class(exc):
    cls = type(exc)
    module = "jobrunner" if cls.__module__ == __name__ else cls.__module__  # also when run as a script (__main__)
    return cls.__qualname__ if module in ("builtins", "__main__") else "%s.%s" % (module, cls.__qualname__)


def _deny_transaction_control(action, *args):
    # A transactional handler must not end the transaction that also acks its message.
    return sqlite3.SQLITE_DENY if action == _SQLITE_TRANSACTION else sqlite3.SQLITE_OK


def _allow_all(*args):
    return sqlite3.SQLITE_OK


class _CommitWaiter:
    """Sleeps until another connection commits, the worker is woken, or a timeout.

    On Linux it waits on inotify for writes to the ``-wal`` file (every
    commit appends frames to it), so an idle worker costs no CPU and wakes
    within a millisecond; elsewhere it polls ``PRAGMA data_version``.
    ``wake()`` is safe from signal handlers and other threads.
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
        with contextlib.suppress(OSError):
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

    def wait(self, version, timeout, stopped):
        """Return once data_version differs from ``version``, ``stopped()`` is true, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        inotify = self._watch_wal()
        if inotify is not None:
            _drain_fd(inotify)
        while not stopped():
            if self.transport.data_version() != version:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            fds = [self._read_fd] if inotify is None else [self._read_fd, inotify]
            ready = select.select(fds, [], [], left if inotify is not None else min(self.poll_interval, left))[0]
            for fd in ready:
                _drain_fd(fd)

    def _watch_wal(self):
        wal = self.transport.path + "-wal"
        if self._watching == wal:
            return self._inotify
        if self._watching is False or not sys.platform.startswith("linux"):
            return None
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


class _ForcedStop(BaseException):
    """A second SIGINT/SIGTERM: stop now, even in the middle of a handler."""


class Worker:
    """Claims messages from its queues in priority order and runs their handlers.

    Stops after the current message when a limit is reached, on SIGTERM or
    SIGINT, or when ``stop-workers`` is requested; :meth:`run` returns why.
    Limits: ``limit`` messages, ``failure_limit`` failed attempts,
    ``memory_limit`` bytes of RSS, ``time_limit`` seconds.  ``sleep`` is the
    longest idle wait between polls; a committed message wakes it at once.
    """

    def __init__(self, app, queues, *, limit=None, failure_limit=None, memory_limit=None, time_limit=None, sleep=1.0,
                 name=None, install_signals=True, parent_pid=None, stop_timeout=10.0):
        if not queues:
            raise ConfigurationError("a worker needs at least one queue")
        if FAILED_QUEUE in queues:
            raise ConfigurationError("the %r queue is not consumed: `jobrunner failed retry --all` puts its messages "
                                     "back on their queues" % FAILED_QUEUE)
        self.queues = app.check_queues(list(queues))
        for option, value in (("limit", limit), ("failure_limit", failure_limit), ("memory_limit", memory_limit)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigurationError("%s must be a whole number >= 0, not %r" % (option, value))
        for option, value in (("time_limit", time_limit), ("sleep", sleep)):
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
                raise ConfigurationError("%s must be a number of seconds >= 0, not %r" % (option, value))
        self.app = app
        self.transport = app.transport
        self.limit, self.failure_limit, self.memory_limit, self.time_limit = limit, failure_limit, memory_limit, time_limit
        self.sleep = sleep if sleep is not None else 1.0
        self.name = name or "worker"
        self.parent_pid = parent_pid
        self.stop_timeout = stop_timeout
        self.install_signals = install_signals
        self.host = _host_identity()
        self.worker_id = None
        self.started_at = None
        self.processed = self.handled = self.failed = 0
        self.exit_code = 0
        self._stop_reason = None
        self._waiter = None
        self._current = None  # (delivery, handler, headers) while a handler runs
        self._interrupted = None  # the delivery a forced stop cut short
        self._deadline = None  # monotonic time past which the running handler is stuck
        self._alarm_armed = False
        self._signals_seen = 0
        self._next_memory_check = 0.0

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

    def _on_signal(self, signum, frame):
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen > 1 and self._current is not None:
            raise _ForcedStop(name)
        self.stop("received %s" % name)

    def _on_alarm(self, signum, frame):
        if self._alarm_armed:
            self._alarm_armed = False
            raise HandlerTimeout("handler ran past its timeout of %gs" % self._current[1].timeout)

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
        return previous

    def _limit_reached(self, started):
        if self.limit is not None and self.processed >= self.limit:
            return "message limit of %d reached" % self.limit
        if self.failure_limit is not None and self.failed >= self.failure_limit:
            return "failure limit of %d reached" % self.failure_limit
        now = time.monotonic()
        if self.time_limit is not None and now - started >= self.time_limit:
            return "time limit of %gs reached" % self.time_limit
        if self.memory_limit is not None and now >= self._next_memory_check:
            self._next_memory_check = now + 0.25
            rss = _rss_bytes()
            if rss > self.memory_limit:
                return "memory limit of %s exceeded (RSS %s)" % (_format_bytes(self.memory_limit), _format_bytes(rss))
        return None

    # The loop

    def run(self):
        """Consume until a limit, a signal or ``stop-workers``; return the reason."""
        self._waiter = _CommitWaiter(self.transport)
        previous_signals = self._install_signals()
        heartbeat = None
        started = time.monotonic()
        outcome = None
        try:
            self._register()
            heartbeat = _Heartbeat(self)
            heartbeat.start()
            _log.info("worker %s (pid %d) consuming %s from %s", self.name, os.getpid(), ", ".join(self.queues), self.transport.path)
            outcome = self._loop(started)
        except _ForcedStop as forced:
            self._stop_reason = "received %s twice: stopped in the middle of a message" % forced
            self.exit_code = 1
            if self._interrupted is not None:  # not its fault: the attempt is given back
                outcome = _Outcome("release", self._interrupted)
        finally:
            self._current = None
            if heartbeat is not None:
                heartbeat.stop()
            self._finish(outcome)
            for sig, handler in previous_signals.items():
                signal.signal(sig, handler)
            waiter, self._waiter = self._waiter, None
            waiter.close()
        level = logging.INFO if self.exit_code == 0 else logging.ERROR
        _log.log(level, "worker %s stopped: %s (%d messages, %d failed attempts)", self.name, self._stop_reason,
                 self.processed, self.failed)
        return self._stop_reason

    def _loop(self, started):
        outcome = None
        backoff = 0.0
        while True:
            reason = self._limit_reached(started)
            if reason:
                # Supervised and over the memory limit before any message: the limit is below the worker's own
                # footprint and restarting cannot help; fail, so the supervisor backs off instead of forking in a loop.
                useless = self.parent_pid and self.processed == 0 and reason.startswith("memory limit")
                self.stop(reason, exit_code=1 if useless else 0)
            if self._stop_reason is not None:
                return outcome
            try:
                delivery, settled, version, due = self.transport.claim(self.queues, self.worker_id, outcome)
            except StorageError as exc:
                backoff = min(30.0, max(0.5, backoff * 2))
                _log.error("%s; retrying in %gs", exc, backoff)
                if self.time_limit is not None:
                    backoff = min(backoff, max(0.0, self.time_limit - (time.monotonic() - started)))
                self._waiter.sleep(backoff)
                continue
            backoff = 0.0
            if not settled:
                _log.warning("message %d: claim was released while handling it (worker thought dead); outcome refused",
                             outcome.delivery.id)
            outcome = None
            if delivery is None:
                self._idle(version, due, started)
                continue
            outcome = self._process(delivery)

    def _idle(self, version, due, started):
        timeout = min(max(self.sleep, 0.01), 3600.0)  # commits wake us anyway; never spin
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.time()))
        if self.time_limit is not None:
            timeout = min(timeout, max(0.0, self.time_limit - (time.monotonic() - started)))
        try:
            self._waiter.wait(version, timeout, lambda: self._stop_reason is not None)
        except (JobRunnerError, sqlite3.Error) as exc:
            _log.error("waiting for messages: %s", exc)
            self._waiter.sleep(min(timeout, 1.0))

    def _finish(self, outcome):
        """Settle the last outcome and leave the registry; never raises."""
        try:
            if outcome is not None:
                self.transport.settle(outcome)
        except JobRunnerError as exc:
            _log.error("could not record the outcome of message %d: %s (it will be delivered again)", outcome.delivery.id, exc)
        try:
            if self.worker_id is not None:
                with self.transport.transaction() as conn:
                    self.transport.release([self.worker_id], conn)
                    conn.execute("DELETE FROM jobrunner_workers WHERE id = ?", (self.worker_id,))
        except JobRunnerError as exc:
            _log.error("could not unregister worker %s: %s", self.name, exc)

    def _register(self):
        self.started_at = time.time()
        with self.transport.transaction() as conn:
            self.worker_id = conn.execute(
                "INSERT INTO jobrunner_workers (name, host, pid, ppid, queues, started_at, beat_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.name, self.host, os.getpid(), os.getppid(), ",".join(self.queues), self.started_at, self.started_at),
            ).lastrowid

    # One message

    def _process(self, delivery):
        """Run one claimed message; return the outcome to settle (None when already settled)."""
        self.processed += 1
        headers = _decode_headers(delivery.headers)
        if headers is None:
            return self._poison(delivery, {"original_headers": _json_safe(delivery.headers)}, "headers are not a JSON object")
        name = headers.get("handler")
        handler = self.app.handlers.get(name) if isinstance(name, str) else None
        if handler is None:
            return self._poison(delivery, headers, "no handler named %r is registered" % (name,))
        try:
            payload = json.loads(delivery.body)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._poison(delivery, headers, "body is not valid JSON (%s)" % exc)
        try:
            handler.check(payload)
        except InvalidMessage as exc:
            return self._poison(delivery, headers, str(exc))
        counted = delivery.attempts - _int_header(headers, "free_retries")
        if counted > handler.retry.max_retries + 1:
            return self._poison(delivery, headers, "its last attempt never finished: the worker died, was killed or "
                                "timed out during it (%d attempts)" % (counted - 1), error_class="WorkerDied",
                                attempts=delivery.attempts - 1)
        self._current = (delivery, handler, headers)
        started = time.perf_counter()
        try:
            if handler.transactional:
                return self._run_transactional(delivery, handler, headers, payload, started)
            try:
                self._call(handler, payload)
                failure = None
            except Exception as exc:
                failure = exc
            conn = self.transport.connection()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
                self.transport.reconnect()
                failure = failure or StorageError("handler left a transaction open on the jobrunner connection; rolled back")
            if failure is None:
                return self._succeeded(delivery, handler, started)
            return self._failed(delivery, handler, headers, failure)
        except BaseException:
            # a second signal (or SystemExit) in mid-handler: leave nothing open behind us
            conn = self.transport.connection()
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            self.transport.reconnect()
            self._interrupted = delivery
            raise
        finally:
            self._current = None

    def _call(self, handler, kwargs):
        timeout = handler.timeout
        armed = False
        if timeout:
            self._deadline = time.monotonic() + timeout
            if threading.current_thread() is threading.main_thread() and self.install_signals:
                self._alarm_armed = armed = True
                signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return handler.fn(**kwargs)
        finally:
            if armed:
                self._alarm_armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            self._deadline = None

    def _run_transactional(self, delivery, handler, headers, payload, started):
        transport = self.transport
        conn = transport.connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # the attempt was counted at claim; back on the queue, it is retried like a failure
            return self._failed(delivery, handler, headers, _storage_error(exc, transport.path))
        failure = None
        self.app._tx.conn = conn
        conn.set_authorizer(_deny_transaction_control)
        try:
            self._call(handler, dict(payload, db=conn))
        except Exception as exc:
            failure = exc
        finally:
            self.app._tx.conn = None
            with contextlib.suppress(sqlite3.ProgrammingError):  # the handler closed it
                conn.set_authorizer(None if sys.version_info >= (3, 11) else _allow_all)
        if failure is None:
            try:
                if not conn.in_transaction:  # ended by the handler (ON CONFLICT ROLLBACK...); raises if closed
                    raise sqlite3.OperationalError("the handler ended the transaction that acknowledges its message")
                acked = conn.execute(_SQL_SETTLE["ack"], _Outcome("ack", delivery).params()).rowcount == 1
                if acked:
                    conn.execute("COMMIT")
                    self._succeeded(delivery, handler, started)
                    return None
                conn.execute("ROLLBACK")
                _log.warning("message %d: claim was released while handling it; its transaction was rolled back", delivery.id)
                return None
            except sqlite3.Error as exc:
                failure = exc
        # A failed transaction leaves nothing behind: roll back and start the next message on a new connection.
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        transport.reconnect()
        return self._failed(delivery, handler, headers, failure)

    def _succeeded(self, delivery, handler, started):
        self.handled += 1
        if _log.isEnabledFor(_VERBOSE):
            _log.log(_VERBOSE, "message %d handled by %s in %.1f ms (attempt %d)", delivery.id, handler.name,
                     (time.perf_counter() - started) * 1000, delivery.attempts)
        return _Outcome("ack", delivery)

    def _failed(self, delivery, handler, headers, exc):
        self.failed += 1
        outcome = _failure_outcome(delivery, handler, headers, exc)
        error = "%s: %s" % (_error_class(exc), exc)
        if outcome.kind == "retry":
            _log.warning("message %d (%s) failed, attempt %d: %s; retrying in %.1fs", delivery.id, handler.name,
                         delivery.attempts, error, outcome.available_at - time.time())
        else:
            _log.error("message %d (%s) moved to the failure queue after %d attempt(s): %s", delivery.id, handler.name,
                       delivery.attempts, error)
        _log.debug("traceback of message %d:\n%s", delivery.id, "".join(traceback.format_exception(exc)).rstrip())
        return outcome

    def _poison(self, delivery, headers, reason, error_class="InvalidMessage", attempts=None):
        self.failed += 1
        _log.error("message %d moved to the failure queue: %s", delivery.id, reason)
        return _fail_outcome(delivery, headers, error_class, reason, None, reason=reason, attempts=attempts)


def _failure_outcome(delivery, handler, headers, exc):
    """Retry or fail after ``exc``, as the handler's strategy and the exception say."""
    retry = handler.retry
    free = _int_header(headers, "free_retries")
    counted = delivery.attempts - free
    tb = "".join(traceback.format_exception(exc))[-_TRACEBACK_LIMIT:]
    if not isinstance(exc, UnrecoverableError) and (isinstance(exc, RecoverableError) or counted <= retry.max_retries):
        wait = retry.wait(counted)
        if isinstance(exc, RecoverableError):
            free += 1
            if exc.retry_after is not None:
                wait = max(0.0, float(exc.retry_after))
        retried = dict(headers, attempts=delivery.attempts, last_error="%s: %s" % (_error_class(exc), exc))
        if free:
            retried["free_retries"] = free
        return _Outcome("retry", delivery, time.time() + wait, _encode_headers(retried))
    return _fail_outcome(delivery, headers, _error_class(exc), str(exc), tb)


def _fail_outcome(delivery, headers, error_class, message, tb, reason=None, attempts=None):
    now = time.time()
    failed = dict(headers)
    failed.update(
        original_queue=delivery.queue,
        error_class=error_class,
        error_message=message,
        traceback=tb,
        attempts=delivery.attempts if attempts is None else attempts,
        failed_at=now,
    )
    if reason:
        failed["reason"] = reason
    return _Outcome("fail", delivery, now, _encode_headers(failed))


def _format_bytes(n):
    for unit, size in (("G", 1024 ** 3), ("M", _MIB), ("K", _KIB)):
        if n >= size:
            return "%.1f%s" % (n / size, unit)
    return "%dB" % n


class _Heartbeat(threading.Thread):
    """Beats for its worker, relays ``stop-workers``, releases dead workers' claims and bounds the WAL.

    A thread, so a slow handler keeps its claim however long it runs; a
    stopped or frozen process stops beating and loses it.
    """

    def __init__(self, worker):
        super().__init__(name="jobrunner-heartbeat", daemon=True)
        self.worker = worker
        self.transport = worker.transport
        self._stopped = threading.Event()
        self._inode = _inode(self.transport.path)

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
            self._check_stuck_handler(now)
            self._check_parent()
            if not self._check_database():
                return
            try:
                self._beat()
                beaten = time.monotonic()
                if failing:
                    _log.warning("database %s is writable again", self.transport.path)
                    writable_since, failing = beaten, False
                elif beaten - now > interval:
                    writable_since = beaten  # the beat waited for the write lock: nobody else could beat either
                now = beaten
                if now >= next_reap and now - writable_since >= 2 * interval:
                    # only once every live worker has had the chance to beat after an outage
                    next_reap = now + reap_every
                    _release_dead_workers(self.transport, self.worker.host)
                    self._bound_wal()
            except (JobRunnerError, sqlite3.Error) as exc:
                if not failing:
                    _log.error("heartbeat failed: %s", exc)
                failing = True
                self.transport.reconnect()

    def _beat(self):
        worker = self.worker
        current = worker._current
        with self.transport.transaction() as conn:
            alive = conn.execute(
                "UPDATE jobrunner_workers SET beat_at = ?, handled = ?, failed = ?, rss_bytes = ?, message_id = ? WHERE id = ?",
                (time.time(), worker.processed, worker.failed, _rss_bytes(), current[0].id if current else None, worker.worker_id),
            ).rowcount
            stop_at = conn.execute("SELECT value FROM jobrunner_control WHERE key = ?", (_STOP_KEY,)).fetchall()
        if not alive:
            # Declared dead (frozen past the timeout): our claim was released, and our ack would be refused.
            worker.stop("this worker was declared dead after missing its heartbeats", exit_code=1)
        elif stop_at and stop_at[0][0] >= worker.started_at:
            worker.stop("stop-workers was requested")

    def _check_stuck_handler(self, now):
        worker = self.worker
        deadline, current = worker._deadline, worker._current
        if deadline is None or current is None or now < deadline + 5.0:
            return
        delivery, handler, headers = current
        exc = HandlerTimeout("handler was stuck past its timeout of %gs and could not be interrupted" % handler.timeout)
        _log.critical("message %d (%s): %s; exiting so it can be retried", delivery.id, handler.name, exc)
        with contextlib.suppress(Exception):
            self.transport.settle(_failure_outcome(delivery, handler, headers, exc))
        logging.shutdown()
        os._exit(70)

    def _check_parent(self):
        parent = self.worker.parent_pid
        if parent and os.getppid() != parent:
            self.worker.stop("the supervisor (pid %d) is gone" % parent)
            self._exit_if_stuck(self.worker.stop_timeout)

    def _exit_if_stuck(self, grace):
        deadline = time.monotonic() + grace
        while self.worker._current is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.worker._current is not None:
            _log.error("still busy %gs after the supervisor died; exiting, the message will be delivered again", grace)
            logging.shutdown()
            os._exit(1)

    def _check_database(self):
        inode = _inode(self.transport.path)
        if inode == self._inode:
            return True
        # This connection still holds the old file open: copy its messages out before stopping.
        saved = _save_unlinked_database(self.transport)
        self.worker.stop("database file %s was deleted or replaced; %s" % (
            self.transport.path, "its messages were saved to %s" % saved if saved else "it could not be saved"), exit_code=1)
        return False

    def _bound_wal(self):
        wal = self.transport.path + "-wal"
        try:
            size = os.stat(wal).st_size
        except OSError:
            return
        if size > max(self.transport.settings.journal_size_limit, 4 * _MIB):
            # readers that never pause starve automatic checkpoints; force one back to zero
            self.transport.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _save_unlinked_database(transport):
    """Back up what this thread's connection still sees of a deleted database; return the copy's path."""
    target = "%s.saved-%s" % (transport.path, time.strftime("%Y%m%dT%H%M%S"))
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return None  # another worker is saving it this very second, or the directory is gone
    os.close(fd)
    try:
        source = getattr(transport._local, "conn", None)
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


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# --- The supervisor -----------------------------------------------------------------

_AUTORESTART = ("true", "false", "unexpected")
_SUPERVISOR_STALE_S = 10.0


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
    startsecs: float = 1.0
    startretries: int = 3
    stopwaitsecs: float = 10.0
    log_max_bytes: int = 10 * _MIB
    log_backups: int = 3

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name or ""):
            raise ConfigurationError("invalid program name %r: letters, digits, '_', '.', '-'" % (self.name,))
        if not self.queues:
            raise ConfigurationError("program %s has no queue to consume" % self.name)
        for queue in self.queues:
            _check_queue_name(queue)
        if self.autorestart not in _AUTORESTART:
            raise ConfigurationError("autorestart must be true, false or unexpected, not %r" % (self.autorestart,))
        for key in ("numprocs", "startretries", "log_backups", "log_max_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (1 if key == "numprocs" else 0):
                raise ConfigurationError("%s of program %s must be a whole number >= %d, not %r"
                                         % (key, self.name, 1 if key == "numprocs" else 0, value))
        if self.limit == 0 or self.time_limit == 0:
            raise ConfigurationError("program %s: a limit of 0 would restart its workers in a loop" % self.name)
        for key in ("startsecs", "stopwaitsecs"):
            if not getattr(self, key) >= 0:
                raise ConfigurationError("%s of program %s must be >= 0" % (key, self.name))


def _set_parent_death_signal(sig):
    """Linux: have the kernel send ``sig`` when the supervisor dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG


class _RotatingLog:
    """An append-only file rotated by size into ``.1`` ... ``.N``, created 0600."""

    def __init__(self, path, max_bytes, backups):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.fd = None
        self._open()

    def _open(self):
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data):
        """Append ``data``; rotate first whenever the file would pass max_bytes, splitting at line ends."""
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
        os.close(self.fd)
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace("%s.%d" % (self.path, i), "%s.%d" % (self.path, i + 1))
            os.replace(self.path, self.path + ".1")
        else:
            os.truncate(self.path, 0)
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


class _Process:
    """One worker process of a program, with supervisord's state machine.

    :meth:`transition` is the one place that decides the next state; the
    supervisor only reports events to it (spawned, exited, stop asked).
    """

    STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL = (
        "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")

    def __init__(self, program, index):
        self.program = program
        self.name = "%s_%02d" % (program.name, index)
        self.state = self.STOPPED
        self.state_since = time.time()
        self.pid = None
        self.backoff = 0
        self.delay = 0.0  # monotonic time of the next start attempt while in self.BACKOFF
        self.laststart = 0.0  # monotonic
        self.started_at = None  # wall clock, for uptime
        self.kill_at = None
        self.exit_status = None
        self.description = ""
        self.restart_requested = False
        self.last_beat = None  # wall clock of the last heartbeat the supervisor saw
        self.pipe = None
        self.log = None

    def change(self, state, description=""):
        if state != self.state:
            self.state = state
            self.state_since = time.time()
        self.description = description

    def exited(self, status, now, stopping):
        """The process was reaped: decide between STOPPED, EXITED and BACKOFF."""
        code = os.waitstatus_to_exitcode(status)
        self.exit_status, self.pid, self.kill_at = code, None, None
        how = "exit status %d" % code if code >= 0 else "killed by %s" % signal.Signals(-code).name
        if self.state == self.STOPPING or stopping:
            self.change(self.STOPPED, "stopped (%s)" % how)
        elif code == 0:
            # a worker exits 0 when it reached a limit or was asked to stop: recycle it
            self.restart_requested = True
            self.change(self.EXITED, "exited (%s; expected)" % how)
        elif now - self.laststart < self.program.startsecs:
            self.backoff += 1
            self.delay = now + self.backoff
            self.change(self.BACKOFF, "exited too quickly (%s); see %s.log" % (how, self.name))
        else:
            self.backoff = 0
            self.change(self.EXITED, "exited (%s; not expected)" % how)
        return how

    def transition(self, now, running):
        """Return ``"spawn"`` or ``"kill"`` when the supervisor must act, else None."""
        program = self.program
        state = self.state
        if state == self.STARTING and now - self.laststart >= program.startsecs:
            self.backoff = 0
            self.change(self.RUNNING)
        elif state == self.STOPPING and self.kill_at is not None and now >= self.kill_at:
            return "kill"
        if not running:
            if state == self.BACKOFF:
                self.change(self.STOPPED, self.description)
            return None
        if state == self.BACKOFF:
            if self.backoff > program.startretries:
                self.change(self.FATAL, "too many start retries too quickly; see %s.log" % self.name)
            elif now >= self.delay:
                return "spawn"
        elif state == self.EXITED:
            if self.restart_requested or program.autorestart == "true" or (
                    program.autorestart == "unexpected" and self.exit_status != 0):
                return "spawn"
        elif state == self.STOPPED and self.laststart == 0.0:
            return "spawn"
        return None


class Supervisor:
    """Keeps ``numprocs`` workers of each program running, as ``supervisord -n`` does.

    It forks the workers from its single thread and holds no database
    connection when it does; each child imports the app itself, so a restart
    (SIGHUP, ``stop-workers``, a limit) loads the code anew.  Signals:
    SIGTERM/SIGINT stop everything gracefully, SIGHUP restarts the workers.
    """

    def __init__(self, programs, *, app_spec, dsn=None, log_dir="var/log", settings_overrides=None):
        if not programs:
            raise ConfigurationError("nothing to supervise: give queues or a config file with [program:...] sections")
        names = [p.name for p in programs]
        if len(set(names)) != len(names):
            raise ConfigurationError("two programs share a name: %s" % ", ".join(sorted(names)))
        self.programs = programs
        self.app_spec = app_spec
        self.dsn = dsn
        self.settings_overrides = settings_overrides or {}
        self.log_dir = os.path.abspath(log_dir)
        self.processes = [_Process(p, i) for p in programs for i in range(p.numprocs)]
        self.host = _host_identity()
        self.transport = None
        self._stopping = False
        self._restart_all = False
        self._locks = []
        self._selector = None
        self._wakeup = None
        self._last_sync = 0.0
        self._contended_until = 0.0  # heartbeats are not judged before this (monotonic)
        self._log = logging.getLogger("jobrunner.supervisor")

    # Start-up

    def run(self):
        """Supervise until SIGTERM or SIGINT; return the exit code."""
        settings = self._preflight()
        self.transport = SqliteTransport(settings)
        self._acquire_locks(settings.path)
        _make_private_dir(self.log_dir)
        self._setup_logging()
        self._setup_signals()
        import selectors

        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup[0], selectors.EVENT_READ, None)
        self._log.info("supervisor (pid %d) started: %s; logs in %s", os.getpid(),
                       ", ".join("%s x%d [%s]" % (p.name, p.numprocs, " ".join(p.queues)) for p in self.programs),
                       self.log_dir)
        try:
            self._sync_database(force=True, first=True)
            self._loop()
        finally:
            self._sync_database(force=True, last=True)
            for proc in self.processes:
                if proc.log:
                    proc.log.close()
            for lock in self._locks:
                lock.release()
            self._log.info("supervisor stopped")
        return 0

    def _preflight(self):
        """Import the app in a throwaway child: fail fast on a bad app or queue, learn the database."""
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
                for program in self.programs:
                    app.check_queues(program.queues)
                message = json.dumps({"ok": dataclasses.asdict(app.settings)})
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
        os.waitpid(pid, 0)
        try:
            answer = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            answer = {}
        if "ok" not in answer:
            raise ConfigurationError(answer.get("error") or "the app could not be loaded")
        return Settings(**answer["ok"])

    def _acquire_locks(self, db_path):
        import filelock

        for program in self.programs:
            path = "%s.%s.supervise.lock" % (db_path, program.name)
            lock = filelock.FileLock(path, timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                for held in self._locks:
                    held.release()
                raise ConfigurationError("another supervisor already runs program %s on %s (lock %s)"
                                         % (program.name, db_path, path)) from None
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
            self._locks.append(lock)

    def _setup_logging(self):
        log = _RotatingLog(os.path.join(self.log_dir, "supervisor.log"), 10 * _MIB, 3)
        handler = _LogHandler(log)
        handler.setFormatter(_log_formatter("supervisor"))
        self._log.addHandler(handler)
        self._log.setLevel(logging.INFO)
        self._log_handler = handler
        for proc in self.processes:
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

    def _on_stop_signal(self, signum, frame):
        if not self._stopping:
            self._log.info("received %s: stopping all workers", signal.Signals(signum).name)
        self._stopping = True

    def _on_hup(self, signum, frame):
        self._restart_all = True

    # The loop

    def _loop(self):
        while True:
            now = time.monotonic()
            before = [(p.state, p.pid) for p in self.processes]
            self._reap(now)
            if self._restart_all:
                self._restart_all = False
                self._request_restart()
            if self._stopping:
                self._begin_stop(now)
            for proc in self.processes:
                action = proc.transition(now, not self._stopping)
                if action == "spawn":
                    self._spawn(proc)
                elif action == "kill":
                    self._log.warning("%s (pid %d) did not stop within %gs: SIGKILL", proc.name, proc.pid,
                                      proc.program.stopwaitsecs)
                    self._signal(proc, signal.SIGKILL)
                    proc.kill_at = None
            self._sync_database(force=[(p.state, p.pid) for p in self.processes] != before)
            if self._stopping and all(p.pid is None for p in self.processes):
                return
            self._wait(self._next_timeout(now))

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
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup[0], 4096):
                        pass
            else:
                self._drain(key.data)

    def _drain(self, proc, final=False):
        while proc.pipe is not None:
            try:
                data = os.read(proc.pipe, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._selector.unregister(proc.pipe)
                os.close(proc.pipe)
                proc.pipe = None
                return
            try:
                proc.log.write(data)
            except OSError as exc:
                self._log.error("cannot write %s.log: %s", proc.name, exc)
            if not final:
                return

    def _spawn(self, proc):
        read_fd, write_fd = os.pipe()
        _flush_std_streams()
        self.transport.close()  # SQLite connections must not cross fork
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            proc.laststart = time.monotonic()
            proc.backoff += 1
            proc.delay = proc.laststart + proc.backoff
            proc.change(_Process.BACKOFF, "fork failed: %s" % exc)
            return
        if pid == 0:
            self._child(proc, write_fd)  # never returns
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        import selectors

        self._selector.register(read_fd, selectors.EVENT_READ, proc)
        proc.pipe, proc.pid = read_fd, pid
        proc.laststart = time.monotonic()
        proc.started_at = time.time()
        proc.restart_requested = False
        proc.exit_status = None
        proc.last_beat = None
        proc.change(_Process.STARTING)
        self._log.info("spawned %s with pid %d", proc.name, pid)

    def _child(self, proc, write_fd):
        code = 1
        try:
            os.setpgid(0, 0)  # the terminal's Ctrl-C is for the supervisor, which stops us gracefully
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            supervisor_pid = os.getppid()
            _set_parent_death_signal(signal.SIGTERM)
            if os.getppid() != supervisor_pid:
                os._exit(1)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            for handler in list(self._log.handlers):
                self._log.removeHandler(handler)
            os.closerange(3, _max_fd())
            program = proc.program
            _configure_logging(program.verbosity, proc.name)
            logging.raiseExceptions = False  # a worker outliving its supervisor must not die of a broken pipe
            app = _load_app(self.app_spec)
            if self.dsn or self.settings_overrides:
                app.use_dsn(self.dsn, **self.settings_overrides)
            worker = Worker(app, program.queues, limit=program.limit, failure_limit=program.failure_limit,
                            memory_limit=program.memory_limit, time_limit=program.time_limit, sleep=program.sleep,
                            name=proc.name, parent_pid=supervisor_pid, stop_timeout=program.stopwaitsecs)
            worker.run()
            code = worker.exit_code
        except JobRunnerError as exc:
            with contextlib.suppress(Exception):
                sys.stderr.write("jobrunner: error: %s\n" % exc)
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
        reaped = []
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
            if proc.pipe is not None:
                self._drain(proc, final=True)
            how = proc.exited(status, now, self._stopping)
            level = logging.INFO if proc.exit_status == 0 or proc.state == _Process.STOPPED else logging.WARNING
            self._log.log(level, "%s (pid %d) %s -> %s", proc.name, pid, how, proc.state)
            reaped.append(pid)
        if reaped:
            self._release(reaped)

    def _release(self, pids):
        """A dead child's claim goes back on the queue now, not after a heartbeat timeout."""
        try:
            with self.transport.transaction() as conn:
                ids = [row[0] for pid in pids for row in conn.execute(
                    "SELECT id FROM jobrunner_workers WHERE host = ? AND pid = ? AND ppid = ?", (self.host, pid, os.getpid())
                ).fetchall()]
                released = self.transport.release(ids, conn)
                conn.executemany("DELETE FROM jobrunner_workers WHERE id = ?", [(i,) for i in ids])
            if released:
                self._log.warning("released %d message(s) held by dead worker(s) %s", released, ", ".join(map(str, pids)))
        except JobRunnerError as exc:
            self._log.error("could not release the claims of pids %s: %s", pids, exc)
        finally:
            self.transport.close()

    def _signal(self, proc, sig):
        if proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _request_restart(self):
        self._log.info("received SIGHUP: restarting all workers gracefully")
        for proc in self.processes:
            if proc.pid is not None and proc.state in (_Process.STARTING, _Process.RUNNING):
                proc.restart_requested = True
                self._signal(proc, signal.SIGTERM)
            elif proc.state in (_Process.BACKOFF, _Process.FATAL, _Process.EXITED):
                proc.backoff = 0
                proc.change(_Process.EXITED, "restart requested")
                proc.restart_requested = True

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
        try:
            asked = time.monotonic()
            with self.transport.transaction() as conn:
                waited = time.monotonic() - asked
                if last:
                    conn.executemany("DELETE FROM jobrunner_processes WHERE name = ?", [(p.name,) for p in self.processes])
                    return
                if first:
                    conn.executemany("DELETE FROM jobrunner_processes WHERE program = ?", [(p.name,) for p in self.programs])
                wall = time.time()
                conn.executemany(
                    "INSERT OR REPLACE INTO jobrunner_processes (name, program, host, supervisor_pid, state, pid, state_since, "
                    "started_at, updated_at, description) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(p.name, p.program.name, self.host, os.getpid(), p.state, p.pid, p.state_since, p.started_at, wall,
                      p.description) for p in self.processes],
                )
                beats = conn.execute("SELECT pid, beat_at FROM jobrunner_workers WHERE host = ? AND ppid = ?",
                                     (self.host, os.getpid())).fetchall()
            if waited > interval:
                # the write lock was held (a long transaction): no worker could beat meanwhile
                self._contended_until = time.monotonic() + 2 * interval
            if time.monotonic() >= self._contended_until:
                self._kill_silent(dict(beats), time.time())
        except JobRunnerError as exc:
            self._contended_until = time.monotonic() + 2 * interval
            self._log.error("cannot record process states: %s", exc)
        finally:
            self.transport.close()

    def _kill_silent(self, beats, wall):
        """SIGKILL a worker that stopped beating (hung, or SIGSTOPped): its message is retried elsewhere."""
        timeout = self.transport.settings.heartbeat_timeout
        for proc in self.processes:
            # another worker may have declared it dead and deleted its row: go on from the last beat seen
            beat = proc.last_beat = beats.get(proc.pid, proc.last_beat)
            if beat is not None and proc.state in (_Process.RUNNING, _Process.STARTING, _Process.STOPPING) and wall - beat > timeout:
                self._log.error("%s (pid %d) has not beaten for %.0fs: killing it", proc.name, proc.pid, wall - beat)
                self._signal(proc, signal.SIGKILL)


def _max_fd():
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (ValueError, OSError):
        return 1024


def _make_private_dir(path):
    try:
        _makedirs_private(path)
    except OSError as exc:
        raise ConfigurationError("cannot create log directory %s: %s" % (path, exc.strerror or exc)) from None
    if not os.access(path, os.W_OK):
        raise ConfigurationError("log directory %s is not writable" % path)


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _read_status(transport):
    """Every supervised process and standalone worker on this database, as ``status --json`` prints them."""
    conn = transport.connection(create=False)
    now = time.time()
    try:
        procs = conn.execute(
            "SELECT name, program, host, supervisor_pid, state, pid, state_since, started_at, updated_at, description "
            "FROM jobrunner_processes ORDER BY name").fetchall()
        workers = conn.execute(
            "SELECT name, host, pid, ppid, started_at, beat_at, handled, rss_bytes, queues FROM jobrunner_workers ORDER BY name"
        ).fetchall()
    except sqlite3.Error as exc:
        raise _storage_error(exc, transport.path) from None
    by_pid = {(w[1], w[2]): w for w in workers}
    here = _host_identity()
    out, seen = [], set()
    for name, program, host, sup_pid, state, pid, since, started, updated, description in procs:
        worker = by_pid.get((host, pid)) if pid else None
        if worker:
            seen.add((host, pid))
        stale = now - updated > _SUPERVISOR_STALE_S or (host == here and not _pid_alive(sup_pid))
        out.append({
            "name": name,
            "program": program,
            "state": "UNKNOWN" if stale else state,
            "pid": pid,
            "uptime_s": round(now - started, 1) if pid and started else None,
            "handled": worker[6] if worker else 0,
            "rss_bytes": worker[7] if worker else None,
            "beat_age_s": round(now - worker[5], 1) if worker else None,
            "supervisor_pid": sup_pid,
            "description": "supervisor (pid %d) is gone" % sup_pid if stale and host == here else
            "supervisor not responding for %.0fs" % (now - updated) if stale else description,
        })
    for name, host, pid, ppid, started, beat, handled, rss, queues in workers:
        if (host, pid) in seen:
            continue
        out.append({"name": name, "program": None, "state": "RUNNING", "pid": pid, "uptime_s": round(now - started, 1),
                    "handled": handled, "rss_bytes": rss, "beat_age_s": round(now - beat, 1), "supervisor_pid": None,
                    "description": "standalone worker on %s" % queues})
    return {"processes": out}


def _check_health(transport, max_ready=None, max_failed=None, max_age=None):
    """``(healthy, reasons, stats)``: the database answers, supervised workers run and beat, thresholds hold."""
    reasons = []
    try:
        stats = transport.stats()
        status = _read_status(transport)
    except JobRunnerError as exc:
        return False, [str(exc)], None
    timeout = transport.settings.heartbeat_timeout
    for proc in status["processes"]:
        if proc["supervisor_pid"] is None:
            if proc["beat_age_s"] is not None and proc["beat_age_s"] > timeout:
                reasons.append("worker %s (pid %s) has not beaten for %.0fs" % (proc["name"], proc["pid"], proc["beat_age_s"]))
            continue
        if proc["state"] != _Process.RUNNING:
            reasons.append("%s is %s%s" % (proc["name"], proc["state"], ": " + proc["description"] if proc["description"] else ""))
        elif proc["beat_age_s"] is None:
            reasons.append("%s (pid %s) is not registered as a worker" % (proc["name"], proc["pid"]))
        elif proc["beat_age_s"] > timeout:
            reasons.append("%s (pid %s) has not beaten for %.0fs" % (proc["name"], proc["pid"], proc["beat_age_s"]))
    ready = sum(q["ready"] for q in stats["queues"])
    if max_ready is not None and ready > max_ready:
        reasons.append("%d messages ready, more than %d" % (ready, max_ready))
    if max_failed is not None and stats["failed"] > max_failed:
        reasons.append("%d failed messages, more than %d" % (stats["failed"], max_failed))
    ages = [q["oldest_ready_age_s"] for q in stats["queues"] if q["oldest_ready_age_s"] is not None]
    if max_age is not None and ages and max(ages) > max_age:
        reasons.append("oldest ready message waited %.1fs, more than %gs" % (max(ages), max_age))
    return not reasons, reasons, stats


# --- The command line -----------------------------------------------------------


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


def _build_cli():
    """The click command group; built on demand so that importing jobrunner needs no click."""
    import click

    class Size(click.ParamType):
        name = "size"

        def convert(self, value, param, ctx):
            if isinstance(value, int):
                return value
            try:
                return _parse_size(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)

    SIZE = Size()
    SECONDS = click.FloatRange(min=0)
    COUNT = click.IntRange(min=0)

    def app_options(fn):
        fn = click.option("--dsn", envvar="JOBRUNNER_DSN", metavar="DSN",
                          help="Database: sqlite:///path.db or a path. Default: $JOBRUNNER_DSN, else the app's.")(fn)
        fn = click.option("--app", "app_spec", metavar="MODULE[:ATTR]",
                          help="The module that builds the JobRunner. Default: $JOBRUNNER_APP, else "
                               "[tool.jobrunner] app in ./pyproject.toml.")(fn)
        return fn

    def get_app(app_spec, dsn, **settings):
        spec = _find_app_spec(app_spec)
        if spec is None:
            raise ConfigurationError("no app: give --app module[:attr], set JOBRUNNER_APP, or add [tool.jobrunner] "
                                     "app = \"module:attr\" to ./pyproject.toml")
        app = _load_app(spec)
        if dsn or any(v is not None for v in settings.values()):
            app.use_dsn(dsn, **settings)
        return app

    def get_transport(app_spec, dsn):
        """Commands that only read or manage the database work from a DSN alone."""
        if dsn and not _find_app_spec(app_spec):
            return None, SqliteTransport(Settings.from_dsn(dsn))
        if not _find_app_spec(app_spec):
            raise ConfigurationError("no database: give --dsn (or JOBRUNNER_DSN), or an app with --app, JOBRUNNER_APP or "
                                     "[tool.jobrunner] app in ./pyproject.toml")
        app = get_app(app_spec, dsn)
        return app, app.transport

    def echo_json(data):
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="jobrunner")
    def cli():
        """A durable SQLite job queue, its workers and their supervisor."""

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def setup(as_json, app_spec, dsn):
        """Create the database and its tables (like messenger:setup-transports)."""
        _, transport = get_transport(app_spec, dsn)
        path = transport.setup()
        echo_json({"database": path}) if as_json else click.echo("database ready: %s" % path)

    @cli.command()
    @click.argument("name")
    @click.argument("payload", default="{}", required=False)
    @click.option("--queue", "-q", help="Queue to use instead of the handler's.")
    @click.option("--delay", type=SECONDS, default=0, show_default=True, help="Seconds before it may be handled.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def dispatch(name, payload, queue, delay, as_json, app_spec, dsn):
        """Enqueue a message for handler NAME with a JSON object PAYLOAD; print its id."""
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise InvalidMessage("PAYLOAD is not valid JSON: %s" % exc) from None
        if not isinstance(data, dict):
            raise InvalidMessage("PAYLOAD must be a JSON object like '{\"to\": \"a@b.c\"}', not %s" % type(data).__name__)
        app = get_app(app_spec, dsn)
        message_id = app.dispatch(name, data, queue=queue, delay=delay)
        echo_json({"id": message_id}) if as_json else click.echo(message_id)

    def limit_options(fn):
        for decorator in reversed([
            click.option("--limit", type=COUNT, help="Stop after handling this many messages."),
            click.option("--failure-limit", type=COUNT, help="Stop after this many failed attempts."),
            click.option("--memory-limit", type=SIZE, help="Stop when RSS exceeds this (128M, 1G)."),
            click.option("--time-limit", type=SECONDS, help="Stop after this many seconds."),
            click.option("--sleep", type=SECONDS, default=1.0, show_default=True,
                         help="Longest idle wait between polls; new messages wake the worker at once."),
            click.option("--heartbeat-timeout", type=click.FloatRange(min=0, min_open=True),
                         help="Seconds of silence after which a worker counts as dead and its message is released."),
            click.option("-v", "--verbose", "verbosity", count=True, help="-v each message, -vv details, -vvv everything."),
        ]):
            fn = decorator(fn)
        return fn

    @cli.command()
    @click.argument("queues", nargs=-1)
    @limit_options
    @app_options
    def consume(queues, limit, failure_limit, memory_limit, time_limit, sleep, heartbeat_timeout, verbosity, app_spec, dsn):
        """Handle messages from QUEUES, the first non-empty one first (default: every queue of the app).

        Stops after the current message on SIGTERM, SIGINT, `stop-workers` or a
        limit, and exits 0.
        """
        _configure_logging(verbosity)
        app = get_app(app_spec, dsn, heartbeat_timeout=heartbeat_timeout)
        worker = app.worker(list(queues) or None, limit=limit, failure_limit=failure_limit, memory_limit=memory_limit,
                            time_limit=time_limit, sleep=sleep, name="consume")
        worker.run()
        sys.exit(worker.exit_code)

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def handlers(as_json, app_spec, dsn):
        """List the registered handlers with their queue and retry settings (like debug:messenger)."""
        app = get_app(app_spec, dsn)
        described = [h.describe() for h in app.handlers.values()]
        if as_json:
            return echo_json({"handlers": described})
        if not described:
            return click.echo("no handlers registered")
        rows = [[d["name"], d["queue"], d["max_retries"], "%gs x%g" % (d["delay"], d["multiplier"]),
                 "-" if d["max_delay"] is None else "%gs" % d["max_delay"], "-" if d["timeout"] is None else "%gs" % d["timeout"],
                 "yes" if d["transactional"] else "no", d["function"]] for d in described]
        click.echo(_table(rows, ["handler", "queue", "retries", "backoff", "max delay", "timeout", "transactional", "function"]))

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def stats(as_json, app_spec, dsn):
        """Ready, delayed and in-flight messages per queue, and the failed count."""
        app, transport = get_transport(app_spec, dsn)
        data = app.stats() if app else transport.stats()
        if as_json:
            return echo_json(data)
        rows = [[q["queue"], q["ready"], q["delayed"], q["in_flight"],
                 "-" if q["oldest_ready_age_s"] is None else "%.1fs" % q["oldest_ready_age_s"]] for q in data["queues"]]
        click.echo(_table(rows, ["queue", "ready", "delayed", "in flight", "oldest ready"]))
        click.echo("failed: %d" % data["failed"])

    @cli.command("stop-workers")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def stop_workers(as_json, app_spec, dsn):
        """Ask every running worker on the database to finish its current message and exit."""
        _, transport = get_transport(app_spec, dsn)
        count = _request_stop_workers(transport)
        if as_json:
            return echo_json({"asked": count})
        click.echo("asked %d running worker(s) to stop after their current message" % count)

    @cli.group()
    def failed():
        """Inspect, retry and remove messages in the failure queue."""

    def envelope_summary(e):
        return {"id": e.id, "handler": e.handler, "original_queue": e.headers.get("original_queue"),
                "error_class": e.headers.get("error_class"), "error_message": e.headers.get("error_message"),
                "attempts": e.headers.get("attempts", e.attempts), "failed_at": e.headers.get("failed_at", e.available_at)}

    @failed.command("show")
    @click.argument("message_id", type=int, required=False)
    @click.option("--max", "max_", type=click.IntRange(min=1, max=2 ** 63 - 1), default=50, show_default=True, help="How many to list.")
    @click.option("--stats", "by_class", is_flag=True, help="Count failed messages by handler and error class.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("-v", "--verbose", "verbosity", count=True, help="With an id: show the traceback.")
    @app_options
    def failed_show(message_id, max_, by_class, as_json, verbosity, app_spec, dsn):
        """List failed messages, or show one with its error (and traceback with -v)."""
        _, transport = get_transport(app_spec, dsn)
        if message_id is not None:
            found = transport.failed(ids=[message_id])
            if not found:
                raise UnknownMessage("no failed message with id %d" % message_id)
            e = found[0]
            detail = dict(envelope_summary(e), payload=e.payload, headers=e.headers, created_at=e.created_at)
            if as_json:
                return echo_json(detail)
            for key in ("id", "handler", "original_queue", "error_class", "error_message", "attempts"):
                click.echo("%-15s %s" % (key.replace("_", " "), detail[key]))
            click.echo("%-15s %s" % ("failed at", _format_time(detail["failed_at"])))
            click.echo("%-15s %s" % ("created at", _format_time(e.created_at)))
            if e.headers.get("reason"):
                click.echo("%-15s %s" % ("reason", e.headers["reason"]))
            click.echo("%-15s %s" % ("payload", json.dumps(e.payload, ensure_ascii=False, default=_json_safe)))
            if verbosity and e.headers.get("traceback"):
                click.echo("\n" + e.headers["traceback"].rstrip())
            elif e.headers.get("traceback"):
                click.echo("\n(run with -v to see the traceback)")
            return
        if by_class:
            groups = {}
            for e in transport.failed():
                key = (e.handler or "?", str(e.headers.get("error_class") or "?"))
                groups[key] = groups.get(key, 0) + 1
            data = [{"handler": h, "error_class": c, "count": n} for (h, c), n in sorted(groups.items(), key=lambda kv: -kv[1])]
            if as_json:
                return echo_json({"groups": data, "failed": sum(g["count"] for g in data)})
            click.echo(_table([[g["handler"], g["error_class"], g["count"]] for g in data], ["handler", "error", "count"]))
            return
        envelopes = transport.failed(limit=max_)
        total = transport.failed_count()
        data = [envelope_summary(e) for e in envelopes]
        if as_json:
            return echo_json({"failed": data, "total": total})
        if not data:
            return click.echo("no failed messages")
        rows = [[d["id"], d["handler"] or "?", d["original_queue"] or "?", _shorten("%s: %s" % (d["error_class"], d["error_message"]), 60),
                 d["attempts"], _format_time(d["failed_at"])] for d in data]
        click.echo(_table(rows, ["id", "handler", "queue", "error", "attempts", "failed at"]))
        if total > len(data):
            click.echo("(%d of %d shown; use --max)" % (len(data), total))

    def act_on_failed(transport, ids, all_, force, verb, action, as_json):
        if all_ and ids:
            raise click.UsageError("give message ids or --all, not both")
        if not ids and not all_:
            raise click.UsageError("give the ids of failed messages, or --all")
        # unknown ids: one clear error before anything changes
        targets = transport.failed_ids() if all_ else transport.check_failed_ids(ids)
        done_key = {"retry": "requeued", "remove": "removed"}[verb]
        if not targets:
            return echo_json({done_key: 0}) if as_json else click.echo("no failed messages")
        if len(targets) > 1 and not force:
            click.confirm("%s %d failed messages?" % (verb.capitalize(), len(targets)), abort=True, err=True)
        done = 0
        chunks = [targets[i:i + 500] for i in range(0, len(targets), 500)]
        bar = click.progressbar(length=len(targets), label=verb.capitalize(), file=sys.stderr) if len(targets) > 500 else None
        with bar or contextlib.nullcontext():
            for chunk in chunks:
                with transport.transaction() as conn:
                    done += action(chunk, conn)
                if bar:
                    bar.update(len(chunk))
        echo_json({done_key: done}) if as_json else click.echo("%s %d message(s)" % (done_key, done))

    @failed.command("retry")
    @click.argument("ids", type=int, nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every failed message.")
    @click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def failed_retry(ids, all_, force, as_json, app_spec, dsn):
        """Put failed messages back on their original queues, with their attempt count reset."""
        _, transport = get_transport(app_spec, dsn)
        act_on_failed(transport, ids, all_, force, "retry", transport.requeue_failed, as_json)

    @failed.command("remove")
    @click.argument("ids", type=int, nargs=-1)
    @click.option("--all", "all_", is_flag=True, help="Every failed message.")
    @click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def failed_remove(ids, all_, force, as_json, app_spec, dsn):
        """Delete failed messages for good."""
        _, transport = get_transport(app_spec, dsn)
        act_on_failed(transport, ids, all_, force, "remove", transport.remove_failed, as_json)

    @cli.command()
    @click.argument("queues", nargs=-1)
    @click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                  help="A supervisord-style INI file with [program:NAME] sections.")
    @click.option("--name", help="Program name (default: the queues joined by '-'); processes are NAME_00, NAME_01...")
    @click.option("--numprocs", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
    @click.option("--log-dir", default="var/log", show_default=True, help="Where NAME_NN.log and supervisor.log go.")
    @click.option("--autorestart", type=click.Choice(_AUTORESTART), default="true", show_default=True,
                  help="After a crash (non-zero exit), true and unexpected restart the worker, false leaves it EXITED. "
                       "Workers that exit 0 (a limit reached, stop-workers) are always restarted.")
    @click.option("--startsecs", type=SECONDS, default=1.0, show_default=True, help="Seconds up before RUNNING.")
    @click.option("--startretries", type=COUNT, default=3, show_default=True, help="Quick exits before FATAL.")
    @click.option("--stopwaitsecs", type=SECONDS, default=10.0, show_default=True, help="Grace before SIGKILL.")
    @click.option("--log-max-bytes", type=SIZE, default="10MB", show_default=True, help="Rotate a log at this size.")
    @click.option("--log-backups", type=COUNT, default=3, show_default=True, help="Rotated logs to keep.")
    @limit_options
    @app_options
    def supervise(queues, config_path, name, numprocs, log_dir, autorestart, startsecs, startretries, stopwaitsecs,
                  log_max_bytes, log_backups, limit, failure_limit, memory_limit, time_limit, sleep, heartbeat_timeout,
                  verbosity, app_spec, dsn):
        """Run and keep alive NUMPROCS workers for QUEUES (or the programs of --config), in the foreground.

        SIGTERM/SIGINT stop the workers gracefully (SIGKILL after --stopwaitsecs);
        SIGHUP restarts them, which reloads the app's code.
        """
        spec = _find_app_spec(app_spec)
        if config_path:
            if queues:
                raise click.UsageError("give queues or --config, not both")
            programs, section = _read_config(config_path, consume)
            spec = app_spec or section.get("app") or spec
            dsn = dsn or section.get("dsn")
            if "log_dir" in section and log_dir == "var/log":
                log_dir = section["log_dir"]
        else:
            programs = [ProgramConfig(
                name or ("-".join(queues) if queues else "worker"), list(queues), numprocs, limit, failure_limit,
                memory_limit, time_limit, sleep, verbosity, autorestart, startsecs, startretries, stopwaitsecs,
                log_max_bytes, log_backups)]
        if spec is None:
            raise ConfigurationError("no app: give --app module[:attr], set JOBRUNNER_APP, or add [tool.jobrunner] "
                                     "app = \"module:attr\" to ./pyproject.toml")
        _configure_logging(0, "supervisor")
        overrides = {"heartbeat_timeout": heartbeat_timeout} if heartbeat_timeout else {}
        sys.exit(Supervisor(programs, app_spec=spec, dsn=dsn, log_dir=log_dir, settings_overrides=overrides).run())

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def status(as_json, app_spec, dsn):
        """One line per worker process, like supervisorctl status."""
        _, transport = get_transport(app_spec, dsn)
        data = _read_status(transport)
        if as_json:
            return echo_json(data)
        if not data["processes"]:
            return click.echo("no supervisor or worker is running on %s" % transport.path)
        for p in data["processes"]:
            if p["pid"] and p["state"] in (_Process.RUNNING, _Process.STARTING, _Process.STOPPING):
                detail = "pid %s, uptime %s, handled %d, rss %s" % (p["pid"], _format_duration(p["uptime_s"]), p["handled"],
                                                                  "-" if p["rss_bytes"] is None else _format_bytes(p["rss_bytes"]))
            else:
                detail = p["description"]
            click.echo("%-32s %-9s %s" % (p["name"], p["state"], detail))

    @cli.command()
    @click.option("--max-ready", type=COUNT, help="Unhealthy above this many ready messages.")
    @click.option("--max-failed", type=COUNT, help="Unhealthy above this many failed messages.")
    @click.option("--max-age", type=SECONDS, help="Unhealthy when the oldest ready message waited longer (seconds).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @app_options
    def health(max_ready, max_failed, max_age, as_json, app_spec, dsn):
        """Exit 0 when the database answers, supervised workers run and beat, and the thresholds hold; else 1."""
        _, transport = get_transport(app_spec, dsn)
        healthy, reasons, data = _check_health(transport, max_ready, max_failed, max_age)
        if as_json:
            echo_json({"healthy": healthy, "reasons": reasons, "stats": data})
        elif healthy:
            ready = sum(q["ready"] for q in data["queues"])
            click.echo("OK: %d ready, %d failed" % (ready, data["failed"]))
        else:
            click.echo("UNHEALTHY: " + "; ".join(reasons))
        sys.exit(0 if healthy else 1)

    return cli


_IGNORED_SUPERVISORD_KEYS = {"process_name", "user", "directory", "autostart", "redirect_stderr", "stdout_logfile",
                             "stderr_logfile", "stderr_logfile_maxbytes", "stderr_logfile_backups", "priority",
                             "environment", "exitcodes", "stopsignal", "stopasgroup", "killasgroup", "umask"}


def _read_config(path, consume_command):
    """Programs from a supervisord-style INI file; ``command`` holds the consume arguments."""
    import configparser
    import shlex

    import click

    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigurationError("cannot read config %s: %s" % (path, exc)) from None
    section = {}
    for name in ("supervise", "supervisord"):
        if parser.has_section(name):
            section.update(parser[name])
    programs = []
    for name in parser.sections():
        if not name.startswith("program:"):
            continue
        options = dict(parser[name])
        program = name.split(":", 1)[1].strip()
        try:
            command = shlex.split(options.pop("command", ""))
        except ValueError as exc:
            raise ConfigurationError("[%s] command: %s" % (name, exc)) from None
        if "consume" not in command:
            raise ConfigurationError("[%s] needs command = consume QUEUE... [options]" % name)
        args = command[command.index("consume") + 1:]
        try:
            ctx = consume_command.make_context("consume", args)
        except Exception as exc:
            detail = exc.format_message() if hasattr(exc, "format_message") else exc
            raise ConfigurationError("[%s] command: %s" % (name, detail)) from None
        params = ctx.params
        if any(ctx.get_parameter_source(key) is click.core.ParameterSource.COMMANDLINE for key in ("app_spec", "dsn")):
            raise ConfigurationError("[%s]: set app and dsn once, in [supervise] or on the command line" % name)
        fields = {"numprocs": int, "autorestart": str, "startsecs": float, "startretries": int, "stopwaitsecs": float,
                  "log_max_bytes": _parse_size, "stdout_logfile_maxbytes": _parse_size, "log_backups": int,
                  "stdout_logfile_backups": int}
        values = {}
        for key, raw in options.items():
            if key in _IGNORED_SUPERVISORD_KEYS:
                _log.info("[%s] %s is not used by jobrunner; ignored", name, key)
                continue
            if key not in fields:
                raise ConfigurationError("[%s]: unknown setting %r" % (name, key))
            try:
                value = fields[key](raw.strip())
            except ValueError:
                raise ConfigurationError("[%s]: %s = %r is not valid" % (name, key, raw)) from None
            values[{"stdout_logfile_maxbytes": "log_max_bytes", "stdout_logfile_backups": "log_backups"}.get(key, key)] = value
        programs.append(ProgramConfig(
            program, list(params["queues"]), limit=params["limit"], failure_limit=params["failure_limit"],
            memory_limit=params["memory_limit"], time_limit=params["time_limit"], sleep=params["sleep"],
            verbosity=params["verbosity"], **values))
    if not programs:
        raise ConfigurationError("config %s has no [program:NAME] section" % path)
    return programs, section


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
    cli = _build_cli()
    try:
        code = cli.main(args=argv, prog_name="jobrunner", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Abort:
        sys.stderr.write("jobrunner: aborted\n")
        return 1
    except click.ClickException as exc:
        sys.stderr.write("jobrunner: error: %s\n" % " ".join(exc.format_message().split()))
        return 2 if isinstance(exc, click.UsageError) else exc.exit_code
    except JobRunnerError as exc:
        sys.stderr.write("jobrunner: error: %s\n" % exc)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("jobrunner: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
