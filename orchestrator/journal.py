"""Owns the run journal: one SQLite file (WAL) holding runs, tasks, attempts, events, requests.

Write-ahead rule: every method that changes state commits before it returns, so a caller that
acts after the call (starts a dependent, sends a lease) acts on something durable. WAL with
synchronous=NORMAL survives the orchestrator being killed at any point (a commit is in the WAL
file before the call returns); an OS crash or power loss may lose the last few commits.

Other processes (`orchestrator status`, `cancel`, `scale`) open the same file concurrently:
readers never block the writer in WAL mode, and control requests go through the `requests`
table, which the running orchestrator polls with `take_requests`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson

SCHEMA_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"


def _schema_of(conn: sqlite3.Connection) -> tuple[int, set[str]]:
    """(user_version, table names), read in one snapshot: a run creating the journal at the
    same moment is seen before or after, never half-way."""
    conn.execute("BEGIN")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.execute("COMMIT")
    return int(version), tables


def _cannot_write(exc: sqlite3.Error) -> bool:
    """True iff `exc` is SQLite failing to write (permissions, a full disk), not bad data."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(
        w in text for w in ("readonly", "read-only", "unable to open", "disk is full",
                            "disk i/o"))


OPEN_LOCKED_S = 10.0  # how long opening waits for other processes creating the journal
_monotonic, _sleep = time.monotonic, time.sleep  # apart from `time`, which tests replace


class _Locked(Exception):
    """Opening met a lock another process holds for a moment: try again."""


class JournalError(Exception):
    """The journal cannot be used (not a journal, corrupt, too new) or a lookup failed."""


# Version 1 had runs, tasks, attempts and events; version 2 adds control requests and attempt
# usage. Every table the code reads is created here; migrations below bring old files up.
_SCHEMA_V1 = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, graph_path TEXT NOT NULL, graph_text TEXT NOT NULL,
    graph_hash TEXT NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, ended REAL,
    reason TEXT, summary_json TEXT);
CREATE TABLE tasks (
    run_id TEXT NOT NULL, task_id TEXT NOT NULL, kind TEXT NOT NULL, parent TEXT,
    agent TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0, prompt TEXT, item_json TEXT, result_json TEXT,
    error TEXT, reason TEXT, started REAL, ended REAL, updated REAL NOT NULL,
    PRIMARY KEY (run_id, task_id));
CREATE TABLE attempts (
    run_id TEXT NOT NULL, task_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker_id TEXT,
    state TEXT NOT NULL, queued REAL, started REAL, ended REAL, error TEXT, result_json TEXT,
    PRIMARY KEY (run_id, task_id, attempt));
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, task_id TEXT,
    kind TEXT NOT NULL, data_json TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX events_run ON events (run_id, id);
"""

_MIGRATIONS: dict[int, str] = {
    # v1 -> v2: control requests from other processes; token usage and stop point per attempt
    2: """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, kind TEXT NOT NULL,
    task_id TEXT, arg TEXT, created REAL NOT NULL, handled REAL);
CREATE INDEX requests_open ON requests (run_id, handled);
ALTER TABLE attempts ADD COLUMN usage_json TEXT;
ALTER TABLE attempts ADD COLUMN stopped_at TEXT;
""",
}

_TASK_COLS = ("task_id", "kind", "parent", "agent", "state", "attempt", "failures", "prompt",
              "item", "result", "error", "reason", "started", "ended")


# One encoder for every row: json.dumps with any non-default argument builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
_ORJSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
# An attempt that waits for a worker (a row that exists already, after a resume, is kept)
_QUEUED_SQL = ("INSERT OR IGNORE INTO attempts (run_id, task_id, attempt, state, queued) "
               "VALUES (?, ?, ?, 'queued', ?)")


def _dumps(v: Any) -> str | None:
    """The JSON of a journal value: orjson (~5x the stdlib's speed on the journal's small maps,
    ~6 of them per task); the stdlib for what orjson refuses (an int over 64 bits, a type it
    does not know: json then names it)."""
    if v is None:
        return None
    try:
        return orjson.dumps(v, option=_ORJSON_OPTS).decode()
    except TypeError:
        return _encode(v)


def _loads(s: str | None) -> Any:
    return None if s is None else json.loads(s)


def _check_file(path: pathlib.Path) -> None:
    """Refuse a file that is not an SQLite database, before SQLite may write to it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror or exc}") from None
    if head and head != SQLITE_MAGIC:
        raise JournalError(f"{path} is not a Switchboard journal (not an SQLite database); "
                           "it was left untouched. Move it away or use another --state-dir.")


class Journal:
    """One open journal file. Methods are synchronous and fast (one small transaction each)."""

    def __init__(self, conn: sqlite3.Connection, path: pathlib.Path) -> None:
        self.conn = conn
        self.path = path
        self._synced: dict[str, dict[str, Any]] = {}  # run_id -> task_id -> last view written
        self._cursors: dict[str, tuple[list[str], int]] = {}  # run_id -> (change log, read up to)
        self._in_batch = False  # True inside batch(): writes join its transaction
        # Attempts queued inside the batch, not written yet: most are leased in the same batch,
        # and attempt_started then writes the row once, queued and started (run_id, task_id,
        # attempt) -> when queued. The rest are written when the batch ends.
        self._queued: dict[tuple[str, str, int], float] = {}

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, migrate: bool = True) -> Journal:
        """Open or create the journal at `path`, migrating an older schema when `migrate`.

        Raises JournalError for a file that is not an SQLite database, is corrupt, has a
        schema newer than this code, or an older schema with migrate=False. A refused file
        is never written to. Processes opening a new journal at the same moment wait for each
        other (SQLite refuses some lock upgrades at once rather than wait).
        """
        give_up = _monotonic() + OPEN_LOCKED_S
        while True:
            try:
                return cls._open_once(path, migrate=migrate)
            except _Locked as exc:
                if _monotonic() > give_up:
                    raise JournalError(
                        f"journal {path} stayed locked by another process for "
                        f"{OPEN_LOCKED_S:g}s ({exc}); try again") from None
                _sleep(0.02)

    @classmethod
    def _open_once(cls, path: str | os.PathLike[str], *, migrate: bool) -> Journal:
        p = pathlib.Path(path)
        if not p.parent.is_dir():
            raise JournalError(f"cannot open journal {p}: directory {p.parent} does not exist")
        _check_file(p)
        try:
            conn = sqlite3.connect(str(p), timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {p}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise JournalError(f"journal {p} is corrupt ({ok}); it was left untouched. "
                                   "Move it away to start a new journal.")
            version, tables = _schema_of(conn)
            if version == 0 and tables:
                raise JournalError(f"{p} is an SQLite database but not a Switchboard journal "
                                   f"(it has tables {sorted(tables)}); it was left untouched.")
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {p} has schema version {version}, newer than this Switchboard "
                    f"understands (up to {SCHEMA_VERSION}); upgrade Switchboard or use another "
                    "--state-dir.")
            if 0 < version < SCHEMA_VERSION and not migrate:
                raise JournalError(
                    f"journal {p} has schema version {version}; this Switchboard needs "
                    f"{SCHEMA_VERSION}. Open it with migration allowed to upgrade it in place.")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if version == 0:
                try:
                    conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA_V1 + _MIGRATIONS[2]
                                       + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
                except sqlite3.OperationalError:
                    # Another run made the new journal first (two runs started at once in a
                    # new state directory): its schema is the one we would have written.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if _schema_of(conn)[0] != SCHEMA_VERSION:
                        raise
            else:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    conn.executescript("BEGIN IMMEDIATE;" + _MIGRATIONS[v]
                                       + f"PRAGMA user_version = {v}; COMMIT;")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "locked" in str(exc).lower():
                raise _Locked(str(exc)) from None
            if _cannot_write(exc):
                raise JournalError(
                    f"cannot write the journal {p} ({exc}): check that its directory and "
                    "files are writable and the disk has room; the journal itself is "
                    "untouched") from None
            raise JournalError(f"journal {p} is corrupt or unreadable ({exc}); it was left "
                               "untouched. Move it away to start a new journal.") from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, p)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Journal:
        """Open an existing journal for reading only (`status`, `cancel` checks), never writing.

        Safe while a run writes it: WAL readers see the last committed state and never block
        the writer. Raises JournalError when there is no journal at `path`, when it is not a
        journal, or when its schema is not the current one (a writing command upgrades it).
        """
        p = pathlib.Path(path)
        if not p.is_file():
            raise JournalError(f"no journal at {p}: start a run with `orchestrator run FILE`, "
                               "or pass --state-dir (or set SWITCHBOARD_HOME) where your runs are")
        _check_file(p)
        uri = "file:" + urllib.parse.quote(str(p.resolve())) + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {p}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA query_only = 1")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(f"journal {p} is corrupt or unreadable ({exc})") from None
        if version != SCHEMA_VERSION:
            conn.close()
            if version == 0:
                raise JournalError(f"{p} is not a Switchboard journal (no schema version)")
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {p} has schema version {version}, newer than this Switchboard "
                    f"understands (up to {SCHEMA_VERSION}); upgrade Switchboard.")
            raise JournalError(
                f"journal {p} has schema version {version} (this Switchboard reads "
                f"{SCHEMA_VERSION}); `orchestrator resume` or a new `orchestrator run` with the "
                "same --state-dir upgrades it in place.")
        return cls(conn, p)

    def close(self) -> None:
        self.conn.close()

    def _tx(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._write():
            return self.conn.execute(sql, params)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction, committed on exit; inside `batch()` it joins the batch's."""
        if self._in_batch:
            yield
            return
        with self.conn:
            self.conn.execute("BEGIN")
            yield

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group every write in the block into one transaction, committed when the block
        ends (rolled back if it raises). The write-ahead rule then holds per batch: act on
        what the block wrote (send leases, start dependents) only after it. Re-entrant."""
        if self._in_batch:
            yield
            return
        self._in_batch = True
        try:
            with self.conn:
                self.conn.execute("BEGIN")
                yield
                self._write_queued()
        finally:
            self._in_batch = False
            self._queued.clear()  # rolled back, if the block raised

    def _write_queued(self) -> None:
        """Write the attempts queued in this batch that were not leased in it."""
        if self._queued:
            rows = [(*key, at) for key, at in self._queued.items()]
            self._queued.clear()
            self.conn.executemany(_QUEUED_SQL, rows)

    # ------------------------------------------------------------ runs

    def create_run(self, run_id: str, *, graph_path: str, graph_text: str,
                   name: str | None = None) -> None:
        """A new run of the graph `graph_text` (read from `graph_path`); `name`, its [run]
        name, is kept when given, so `status` need not parse the graph again once the run's
        tasks are rows."""
        import hashlib

        h = hashlib.sha256(graph_text.encode()).hexdigest()
        now = time.time()
        data = {"graph_path": graph_path}
        if name is not None:
            data["name"] = name
        with self._write():
            self.conn.execute(
                "INSERT INTO runs (run_id, graph_path, graph_text, graph_hash, status, started) "
                "VALUES (?, ?, ?, ?, 'running', ?)", (run_id, graph_path, graph_text, h, now))
            self.conn.execute("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                              "VALUES (?, NULL, 'run.created', ?, ?)",
                              (run_id, _dumps(data), now))

    def finish_run(self, run_id: str, status: str, *, summary: Mapping[str, Any] | None = None,
                   reason: str | None = None) -> None:
        now = time.time()
        with self._write():
            self.conn.execute("UPDATE runs SET status = ?, ended = ?, reason = ?, "
                              "summary_json = ? WHERE run_id = ?",
                              (status, now, reason, _dumps(dict(summary or {})), run_id))
            self.conn.execute("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                              "VALUES (?, NULL, 'run.ended', ?, ?)",
                              (run_id, _dumps({"status": status, "reason": reason}), now))

    def reopen_run(self, run_id: str) -> bool:
        """A run that stopped without ending (status "stopped": no worker was left, the disk
        refused writes, or the embedded sim's process exited) runs again: `orchestrator
        resume` calls this before it goes on. Any other run is left as it is. Returns True iff
        the run was reopened."""
        now = time.time()
        with self._write():
            cur = self.conn.execute(
                "UPDATE runs SET status = 'running', ended = NULL, reason = NULL "
                "WHERE run_id = ? AND status = 'stopped'", (run_id,))
            if cur.rowcount != 1:
                return False
            self.conn.execute("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                              "VALUES (?, NULL, 'run.reopened', ?, ?)",
                              (run_id, _dumps({"was": "stopped"}), now))
        return True

    def _run_dict(self, r: sqlite3.Row) -> dict[str, Any]:
        d = dict(r)
        d["summary"] = _loads(d.pop("summary_json"))
        return d

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first (without the graph text)."""
        rows = self.conn.execute(
            "SELECT run_id, graph_path, graph_hash, status, started, ended, reason, summary_json "
            "FROM runs ORDER BY started DESC, run_id DESC").fetchall()
        return [self._run_dict(r) for r in rows]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if r is None else self._run_dict(r)

    def run_name(self, run_id: str) -> str | None:
        """The [run] name given when the run was created; None when none was (a run journaled
        before names were kept: its graph text has it)."""
        r = self.conn.execute("SELECT data_json FROM events WHERE run_id = ? AND "
                              "kind = 'run.created' ORDER BY id LIMIT 1", (run_id,)).fetchone()
        data = _loads(r[0]) if r is not None else None
        name = data.get("name") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None

    def latest_run(self) -> dict[str, Any] | None:
        r = self.conn.execute(
            "SELECT * FROM runs ORDER BY started DESC, run_id DESC LIMIT 1").fetchone()
        return None if r is None else self._run_dict(r)

    def find_run(self, ref: str | None) -> dict[str, Any]:
        """The run whose id is `ref` or starts with it ("latest"/None: the newest run).

        Raises JournalError when there is none or the prefix is ambiguous.
        """
        if ref in (None, "", "latest"):
            run = self.latest_run()
            if run is None:
                raise JournalError(f"no runs in journal {self.path}")
            return run
        assert ref is not None
        run = self.get_run(ref)
        if run is not None:
            return run
        like = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        ids = [r[0] for r in self.conn.execute(
            "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\'", (like,))]
        if not ids:
            raise JournalError(f"no run {ref!r} in journal {self.path} "
                               "(see `orchestrator status --runs` for the list)")
        if len(ids) > 1:
            raise JournalError(f"run {ref!r} is ambiguous: {', '.join(sorted(ids)[:5])}")
        found = self.get_run(ids[0])
        assert found is not None
        return found

    # ------------------------------------------------------------ attempts

    def attempt_queued(self, run_id: str, task_id: str, attempt: int) -> None:
        """An attempt waits for a worker. Inside a batch the row is written by attempt_started
        if the attempt is leased in the same batch (one row write instead of two), else when
        the batch ends: durable, either way, once the batch is."""
        if self._in_batch:
            self._queued.setdefault((run_id, task_id, attempt), time.time())
            return
        self._tx(_QUEUED_SQL, (run_id, task_id, attempt, time.time()))

    # An attempt's start and end are its row's (times, worker, state, error): no event rows of
    # their own, which would say it again at two more index writes per attempt.

    def attempt_started(self, run_id: str, task_id: str, attempt: int, worker_id: str) -> None:
        now = time.time()
        queued = self._queued.pop((run_id, task_id, attempt), None)
        with self._write():
            self.conn.execute(
                "INSERT INTO attempts (run_id, task_id, attempt, worker_id, state, queued, "
                "started) VALUES (?, ?, ?, ?, 'running', ?, ?) ON CONFLICT (run_id, task_id, "
                "attempt) DO UPDATE SET worker_id = excluded.worker_id, state = 'running', "
                "started = excluded.started", (run_id, task_id, attempt, worker_id, queued, now))

    def attempt_ended(self, run_id: str, task_id: str, attempt: int, status: str, *,
                      error: str | None = None, result: Mapping[str, Any] | None = None,
                      usage: Mapping[str, Any] | None = None,
                      stopped_at: str | None = None) -> None:
        """Record how an attempt ended (succeeded, failed, cancelled, lost) and its result.

        A succeeded attempt's result is durable once this returns: `task_records` reports the
        task as succeeded even if the task row was not synced before a crash.
        """
        now = time.time()
        with self._write():
            self._write_queued()
            self.conn.execute(
                "INSERT INTO attempts (run_id, task_id, attempt, state, ended, error, "
                "result_json, usage_json, stopped_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, task_id, attempt) DO UPDATE SET state = excluded.state, "
                "ended = excluded.ended, error = excluded.error, "
                "result_json = excluded.result_json, usage_json = excluded.usage_json, "
                "stopped_at = excluded.stopped_at",
                (run_id, task_id, attempt, status, now, error,
                 _dumps(dict(result) if result is not None else None),
                 _dumps(dict(usage) if usage is not None else None), stopped_at))

    def attempt_refused(self, run_id: str, task_id: str, attempt: int, *, reported: str,
                        why: str, worker_id: str | None,
                        usage: Mapping[str, Any] | None = None,
                        stopped_at: str | None = None) -> None:
        """Record a result that was refused (stale: its attempt had already ended by timeout,
        cancel or loss). Never stores its result, so resume never takes it for a success; an
        attempt row still open becomes "stale"; the tokens it spent are kept."""
        now = time.time()
        with self._write():
            self._write_queued()
            self.conn.execute(
                "INSERT INTO attempts (run_id, task_id, attempt, worker_id, state, ended, error, "
                "usage_json, stopped_at) VALUES (?, ?, ?, ?, 'stale', ?, ?, ?, ?) "
                "ON CONFLICT (run_id, task_id, attempt) DO UPDATE SET "
                "state = CASE WHEN state IN ('queued', 'running') THEN 'stale' ELSE state END, "
                "ended = COALESCE(ended, excluded.ended), error = COALESCE(error, excluded.error), "
                "usage_json = COALESCE(excluded.usage_json, usage_json), "
                "stopped_at = COALESCE(excluded.stopped_at, stopped_at)",
                (run_id, task_id, attempt, worker_id, now, why,
                 _dumps(dict(usage) if usage is not None else None), stopped_at))
            self.conn.execute(
                "INSERT INTO events (run_id, task_id, kind, data_json, at) "
                "VALUES (?, ?, 'result.refused', ?, ?)",
                (run_id, task_id, _dumps({"attempt": attempt, "reported": reported, "why": why,
                                          "worker_id": worker_id}), now))

    def close_open_attempts(self, run_id: str, state: str, error: str, unstarted: str) -> int:
        """End every attempt still queued or running (after a crash, or at the end of a run):
        nobody will report it any more. `error` says why for one a worker held, `unstarted`
        for one still queued (no worker ever took it: "in flight" would not be true of it).
        Returns how many were closed."""
        now = time.time()
        with self._write():
            self._write_queued()
            cur = self.conn.execute(
                "UPDATE attempts SET state = ?, ended = ?, error = COALESCE(error, "
                "CASE WHEN state = 'queued' THEN ? ELSE ? END) "
                "WHERE run_id = ? AND state IN ('queued', 'running')",
                (state, now, unstarted, error, run_id))
            n = cur.rowcount
            if n:
                self.conn.execute("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                                  "VALUES (?, NULL, 'attempts.closed', ?, ?)",
                                  (run_id, _dumps({"state": state, "count": n, "error": error}),
                                   now))
        return int(n)

    def attempts(self, run_id: str, task_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM attempts WHERE run_id = ?"
        params: tuple[Any, ...] = (run_id,)
        if task_id is not None:
            sql += " AND task_id = ?"
            params += (task_id,)
        out = []
        for r in self.conn.execute(sql + " ORDER BY task_id, attempt", params):
            d = dict(r)
            d["result"] = _loads(d.pop("result_json"))
            d["usage"] = _loads(d.pop("usage_json"))
            out.append(d)
        return out

    def usage_summary(self, run_id: str) -> dict[str, Any]:
        """Token and cost totals over every attempt that reported usage:
        {"total": {...}, "by_agent": {agent: {..., "tasks": n, "sub_agents": {..., "tasks": n}}}}.

        A dynamic child (spawned at run time) counts toward the agent of the graph task that
        spawned it (its first non-dynamic ancestor), whatever agent it ran: a parent's totals
        include its sub-agents, and `sub_agents` is their share, shown separately. So the
        agents' totals add up to the run's total.
        """
        keys = ("turns", "input_tokens", "cached_tokens", "output_tokens", "cost_usd")
        total: dict[str, Any] = dict.fromkeys(keys, 0)
        tasks = {tid: (kind, parent, agent) for tid, kind, parent, agent in self.conn.execute(
            "SELECT task_id, kind, parent, agent FROM tasks WHERE run_id = ?", (run_id,))}

        def owner(tid: str) -> tuple[str, bool]:
            """(the agent the usage of task `tid` counts toward, whether it is a sub-agent's)"""
            kind, parent, agent = tasks.get(tid, (None, None, None))
            spawned = False
            seen = {tid}
            while kind == "dynamic" and parent in tasks and parent not in seen:
                spawned = True
                seen.add(parent)
                kind, parent, agent = tasks[parent]
            return agent or "?", spawned

        by_agent: dict[str, dict[str, Any]] = {}
        task_ids: dict[tuple[str, bool], set[str]] = {}  # (agent, spawned) -> task ids
        for tid, usage_json in self.conn.execute(
                "SELECT task_id, usage_json FROM attempts WHERE run_id = ? AND "
                "usage_json IS NOT NULL ORDER BY task_id, attempt", (run_id,)):
            u = _loads(usage_json) or {}
            agent, spawned = owner(tid)
            per = by_agent.get(agent)
            if per is None:
                per = by_agent[agent] = {**dict.fromkeys(keys, 0), "tasks": 0,
                                         "sub_agents": {**dict.fromkeys(keys, 0), "tasks": 0}}
            subs = per["sub_agents"]
            for k in keys:
                v = u.get(k) or 0
                total[k] += v
                per[k] += v
                if spawned:
                    subs[k] += v
            task_ids.setdefault((agent, spawned), set()).add(tid)
        total["cost_usd"] = round(total["cost_usd"], 6)
        for agent, per in by_agent.items():
            subs = len(task_ids.get((agent, True), ()))
            per["tasks"] = len(task_ids.get((agent, False), ())) + subs
            per["sub_agents"]["tasks"] = subs
            per["cost_usd"] = round(per["cost_usd"], 6)
            per["sub_agents"]["cost_usd"] = round(per["sub_agents"]["cost_usd"], 6)
        return {"total": total, "by_agent": by_agent}

    # ------------------------------------------------------------ tasks

    def sync_tasks(self, run_id: str, views: Mapping[str, Any], *,
                   clock_offset: float = 0.0,
                   on_state: Callable[[Any, Any], None] | None = None) -> int:
        """Write the task snapshots (scheduler.TaskView) that changed since the last call,
        with one `task.state` event per state change, in one transaction. Returns how many
        rows were written. A snapshot is unchanged iff it is the same object as last time.
        `clock_offset` turns the snapshots' times (the caller's clock, e.g. trio's) into wall
        time (time.time() - trio.current_time()), which is what the journal stores.
        `on_state(previous snapshot or None, snapshot)` is called for each change of state or
        of failures (a retry with no backoff is queued again before it is synced)."""
        last = self._synced.setdefault(run_id, {})
        log = getattr(views, "log", None)
        cursor = self._cursors.get(run_id)
        if isinstance(log, list):
            # the scheduler's change log: look only at tasks changed since the last call (all
            # of it the first time, which puts the graph's tasks in file order: rows are read
            # back in the order they were first written)
            start = cursor[1] if cursor is not None and cursor[0] is log else 0
            ids = dict.fromkeys(log[start:])
            changed = [(tid, views[tid]) for tid in ids
                       if tid in views and last.get(tid) is not views[tid]]
        else:
            changed = [(tid, v) for tid, v in views.items() if last.get(tid) is not v]
        if isinstance(log, list):
            self._cursors[run_id] = (log, len(log))
        if not changed:
            return 0
        now = time.time()
        rows, events = [], []
        for tid, v in changed:
            prev = last.get(tid)
            rows.append((run_id, tid, v.kind, v.parent, v.agent, v.state, v.attempt, v.failures,
                         v.prompt, _dumps(v.item), _dumps(v.result), v.error, v.reason,
                         None if v.started is None else v.started + clock_offset,
                         None if v.ended is None else v.ended + clock_offset, now))
            if on_state is not None and (prev is None or prev.state != v.state
                                         or prev.failures != v.failures):
                on_state(prev, v)
            if prev is None or prev.state != v.state:
                events.append((run_id, tid, "task.state",
                               _dumps({"state": v.state, "attempt": v.attempt,
                                       "error": v.error, "reason": v.reason}), now))
        with self._write():
            self.conn.executemany(
                "INSERT INTO tasks (run_id, task_id, kind, parent, agent, state, attempt, "
                "failures, prompt, item_json, result_json, error, reason, started, ended, "
                "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, task_id) DO UPDATE SET kind = excluded.kind, "
                "parent = excluded.parent, agent = excluded.agent, state = excluded.state, "
                "attempt = excluded.attempt, failures = excluded.failures, "
                "prompt = excluded.prompt, item_json = excluded.item_json, "
                "result_json = excluded.result_json, error = excluded.error, "
                "reason = excluded.reason, started = excluded.started, "
                "ended = excluded.ended, updated = excluded.updated", rows)
            self.conn.executemany("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                                  "VALUES (?, ?, ?, ?, ?)", events)
        for tid, v in changed:
            last[tid] = v
        return len(rows)

    def task_rows(self, run_id: str) -> list[dict[str, Any]]:
        """Task rows for `status`, in the order they were first written."""
        out = []
        for r in self.conn.execute("SELECT * FROM tasks WHERE run_id = ? ORDER BY rowid",
                                   (run_id,)):
            d = dict(r)
            d["item"] = _loads(d.pop("item_json"))
            d["result"] = _loads(d.pop("result_json"))
            out.append(d)
        return out

    def task_records(self, run_id: str) -> list[dict[str, Any]]:
        """Records for Scheduler.restore: task rows, corrected by journaled attempt results.

        A task whose attempt ended succeeded is reported succeeded with that result even if
        its row was not synced before a crash; the attempt number is at least the highest
        attempt journaled, so a late result from before the crash is stale after resume.
        """
        recs = {r["task_id"]: {k: r.get(k) for k in _TASK_COLS} for r in self.task_rows(run_id)}
        for a in self.attempts(run_id):
            rec = recs.get(a["task_id"])
            if rec is None:
                continue
            rec["attempt"] = max(int(rec["attempt"] or 0), int(a["attempt"]))
            if a["state"] == "succeeded" and rec["state"] != "succeeded" and \
                    a["result"] is not None and rec["state"] not in ("cancelled", "not_run"):
                rec["state"] = "succeeded"
                rec["result"] = a["result"]
                rec["error"] = None
        return list(recs.values())

    # ------------------------------------------------------------ events

    def event(self, run_id: str, task_id: str | None, kind: str,
              data: Mapping[str, Any] | None = None) -> int:
        cur = self._tx("INSERT INTO events (run_id, task_id, kind, data_json, at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (run_id, task_id, kind, _dumps(dict(data or {})), time.time()))
        return int(cur.lastrowid or 0)

    def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Events with id > since, oldest first (pass the last id seen to follow)."""
        out = []
        for r in self.conn.execute("SELECT * FROM events WHERE run_id = ? AND id > ? "
                                   "ORDER BY id", (run_id, since)):
            d = dict(r)
            d["data"] = _loads(d.pop("data_json"))
            out.append(d)
        return out

    # ------------------------------------------------------------ control requests

    def add_request(self, run_id: str, kind: str, *, task_id: str | None = None,
                    arg: str | None = None) -> int:
        """Ask the running orchestrator to do something (kind "cancel" or "scale")."""
        if kind not in ("cancel", "scale"):
            raise JournalError(f"unknown request kind {kind!r} (cancel or scale)")
        cur = self._tx("INSERT INTO requests (run_id, kind, task_id, arg, created) "
                       "VALUES (?, ?, ?, ?, ?)", (run_id, kind, task_id, arg, time.time()))
        return int(cur.lastrowid or 0)

    def open_requests(self, run_id: str) -> list[dict[str, Any]]:
        """The requests for `run_id` the orchestrator has not taken yet, oldest first (read only)."""
        return [dict(r) for r in self.conn.execute(
            "SELECT id, run_id, kind, task_id, arg, created FROM requests "
            "WHERE run_id = ? AND handled IS NULL ORDER BY id", (run_id,))]

    def take_requests(self, run_id: str) -> list[dict[str, Any]]:
        """The open requests for `run_id`, oldest first, marked handled in the same transaction."""
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            rows = [dict(r) for r in self.conn.execute(
                "SELECT id, run_id, kind, task_id, arg, created FROM requests "
                "WHERE run_id = ? AND handled IS NULL ORDER BY id", (run_id,))]
            if rows:
                self.conn.execute(
                    "UPDATE requests SET handled = ? WHERE run_id = ? AND handled IS NULL "
                    "AND id <= ?", (time.time(), run_id, rows[-1]["id"]))
        return rows
