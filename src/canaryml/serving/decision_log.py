"""Durable decision log (SQLite, WAL) and per-deployment controller state for resume.

Write order, so that a crash never acts twice and never loses an entry:

1. `record()` the decision (intent) and commit it to disk — before anything is acted on; the
   serve loop's `append(record, state)` commits the controller state after the decision in
   the same transaction, so a restart never decides a logged step a second time (it would
   act on the new decision while the log keeps the first);
2. the actuator applies it (idempotent per (deployment, step, action): a retry is a no-op);
3. `mark_applied()` (or `mark_failed()`; or `mark_skipped()` for an action that can never be
   applied, e.g. no actuator target: it is not pending and never re-applied).

Group commit (the serve loop's tick): `append_many` writes every decision of a tick, with
each deployment's state, in ONE transaction — one fsync of the WAL per tick, before any of those
actions is applied. `mark_applied_many` then records the tick's landed actions in one
transaction committed without an fsync (`synchronous=NORMAL` for that commit): the marks reach
the disk with the next durable commit; a crash (or power loss) before it leaves them pending,
and the restart re-applies them, which the actuators' idempotency turns into a no-op. `syncs`
counts the durable (fsynced) commits.

After a crash between 1 and 3, `pending()` lists the intents that were never marked; the
controller re-applies them, which the actuators' idempotency turns into a no-op when the first
attempt had landed. Kafka offsets are committed only after step 1 (see `KafkaSource.ack`).

A corrupt file (truncated, bad header, failed `PRAGMA quick_check`) raises `DecisionLogError`
naming the file and the recovery; with `on_corrupt="move_aside"` (what `canaryml serve` uses,
so a bad file cannot crash-loop the controller) it is renamed to
`<name>.corrupt-<UTC time>` (with its -wal/-shm files) and a fresh log is started: the
controller then decides from what it reads in Kubernetes, and `moved_aside` says where the old
file went.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canaryml.control.controller import LogRecord, format_decision
from canaryml.control.types import Action, Decision
from canaryml.errors import CanarymlError, ConfigError

log = logging.getLogger(__name__)
decision_log = logging.getLogger("canaryml.decision")  # one key=value line per decision

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id TEXT    NOT NULL,
    policy        TEXT    NOT NULL,
    step          INTEGER NOT NULL,
    decided_at    REAL    NOT NULL,
    action        TEXT    NOT NULL,
    score         REAL,
    reasons       TEXT    NOT NULL,
    evidence      TEXT    NOT NULL,
    model_version TEXT,
    applied       INTEGER NOT NULL DEFAULT 0,
    applied_at    REAL,
    error         TEXT,
    reason        TEXT,
    UNIQUE (deployment_id, policy, step)
);
CREATE TABLE IF NOT EXISTS controller_state (
    deployment_id TEXT PRIMARY KEY,
    last_step     INTEGER NOT NULL,
    state         TEXT    NOT NULL,
    updated_at    REAL    NOT NULL
);
"""


@dataclass(frozen=True)
class LogEntry(LogRecord):
    """One row of the durable decision log: the controller's `LogRecord` plus its row id and
    apply status. `action` is the `Action`. (Rows written before the `reason` column existed
    read back with the reasons joined as their reason.)"""

    action: Action  # type: ignore[assignment]
    reason: str = ""
    reasons: tuple[str, ...] = ()
    id: int = 0
    applied: bool = False
    applied_at: float | None = None
    error: str | None = None
    skipped: bool = False  # never applied on purpose (the reason is in `error`)

    @property
    def decision(self) -> Decision:
        return Decision(self.action, self.reason or "; ".join(self.reasons), self.score,
                        dict(self.evidence))


def _reasons(decision: Decision) -> list[str]:
    raw = decision.evidence.get("reasons")
    if isinstance(raw, list | tuple) and raw:
        return [str(r) for r in raw]
    return [decision.reason] if decision.reason else []


class DecisionLogError(CanarymlError):
    """The decision log file is not a readable SQLite database (truncated, overwritten)."""


def _open(path: Path) -> sqlite3.Connection:
    """Connect, check integrity, create the schema; `DecisionLogError` when the file is corrupt
    (an OperationalError — locked, unwritable, disk full — is not corruption: it propagates)."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an entry on disk survives power loss
        check = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            raise DecisionLogError("; ".join(check[:3]))
        db.executescript(SCHEMA)
        columns = {str(r[1]) for r in db.execute("PRAGMA table_info(decisions)").fetchall()}
        if "reason" not in columns:  # a log written before the reason had its own column
            db.execute("ALTER TABLE decisions ADD COLUMN reason TEXT")
    except sqlite3.OperationalError:
        db.close()
        raise
    except (sqlite3.DatabaseError, DecisionLogError) as exc:
        db.close()
        raise DecisionLogError(
            f"decision log {path} is corrupt ({exc}). Recovery: stop the controller, move the "
            f"file aside (e.g. `mv {path} {path}.corrupt`, with any {path.name}-wal/-shm next "
            "to it) and start again: a new log is created and the controller resumes from the "
            "state it reads in Kubernetes (replicas, canaryml.io/* annotations); keep the old "
            "file for the audit trail. `canaryml serve` does this itself.") from exc
    return db


class DecisionLog:
    """SQLite-backed, thread-safe. One row per (deployment, policy, step); survives restarts.

    `on_corrupt`: "raise" (`DecisionLogError`) or "move_aside" (rename the corrupt file to
    `<name>.corrupt-<UTC time>`, start a fresh log, record where in `moved_aside`)."""

    def __init__(self, path: str | Path, *, on_corrupt: str = "raise") -> None:
        self.path = Path(path)
        if on_corrupt not in ("raise", "move_aside"):
            raise ConfigError(f"on_corrupt={on_corrupt!r} must be raise or move_aside")
        if self.path.is_dir():
            raise ConfigError(f"decision log {self.path} is a directory; give a file path such as "
                              "data/serve/decisions.sqlite (serve.decision_log)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.syncs = 0  # durable (fsynced) commits so far
        self.moved_aside: Path | None = None
        try:
            self._db = _open(self.path)
        except DecisionLogError as exc:
            if on_corrupt == "raise":
                raise
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.moved_aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    src.replace(self.moved_aside.with_name(self.moved_aside.name + suffix))
            log.error("decision log %s is corrupt (%s); moved it aside to %s and started a new "
                      "log: deployments are decided afresh from the state in Kubernetes",
                      self.path, exc.__cause__ or exc, self.moved_aside)
            self._db = _open(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; `durable=False` commits it without an fsync (WAL, synchronous
        NORMAL): it becomes durable with the next durable commit."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
            if durable:
                self.syncs += 1

    # --- decisions ---------------------------------------------------------------------------
    def append(self, record: LogRecord, state: Mapping[str, Any] | None = None) -> LogEntry:
        """The `DecisionSink` of `Controller.step`: durably log the intent and return the row.
        (The controller emits the key=value line.) With `state`, the deployment's controller
        state after this decision is saved in the same transaction (as `save_state` at
        `record.step`), so a process killed at any later point resumes after this step and
        never decides it again."""
        decision = Decision(Action(record.action), record.reason, record.score,
                            dict(record.evidence))
        entry, _ = self._insert(record.deployment_id, record.step, decision, record.policy,
                                record.decided_at, record.model_version, state)
        return entry

    def append_many(self, items: Sequence[tuple[LogRecord, Mapping[str, Any] | None]]
                    ) -> list[LogEntry]:
        """Group commit: every (record, state) of a tick in one durable transaction (one fsync),
        each as `append(record, state)` would store it; returns the rows in order."""
        if not items:
            return []
        out: list[LogEntry] = []
        with self._tx() as db:
            for record, state in items:
                decision = Decision(Action(record.action), record.reason, record.score,
                                    dict(record.evidence))
                out.append(self._insert_in(db, record.deployment_id, record.step, decision,
                                           record.policy, record.decided_at,
                                           record.model_version, state)[0])
        return out

    def record(self, deployment_id: str, step: int, decision: Decision, *, policy: str = "model",
               decided_at: float | None = None, model_version: str | None = None) -> LogEntry:
        """Durably log the intent to apply `decision` and emit the key=value line.

        Idempotent: a second call for the same (deployment, policy, step) returns the entry
        already on disk and logs nothing new (so a restarted controller cannot double-log).
        """
        decided_at = time.time() if decided_at is None else float(decided_at)
        entry, inserted = self._insert(deployment_id, step, decision, policy, decided_at,
                                       model_version)
        if inserted:
            decision_log.info(format_decision(entry))
        return entry

    def _insert(self, deployment_id: str, step: int, decision: Decision, policy: str,
                decided_at: float, model_version: str | None,
                state: Mapping[str, Any] | None = None) -> tuple[LogEntry, bool]:
        with self._tx() as db:
            return self._insert_in(db, deployment_id, step, decision, policy, decided_at,
                                   model_version, state)

    def _insert_in(self, db: sqlite3.Connection, deployment_id: str, step: int,
                   decision: Decision, policy: str, decided_at: float, model_version: str | None,
                   state: Mapping[str, Any] | None) -> tuple[LogEntry, bool]:
        """Insert one decision (and the state after it) inside the caller's transaction."""
        cur = db.execute(
            "INSERT OR IGNORE INTO decisions (deployment_id, policy, step, decided_at, action,"
            " score, reasons, evidence, model_version, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (deployment_id, policy, int(step), decided_at, str(decision.action),
             None if decision.score is None else float(decision.score),
             json.dumps(_reasons(decision)), json.dumps(decision.evidence, default=str),
             model_version, decision.reason),
        )
        inserted = cur.rowcount == 1
        if inserted:
            row_id = cur.lastrowid
            if state is not None:
                self._save_state(db, deployment_id, step, state)
            row = db.execute("SELECT * FROM decisions WHERE id=?", (row_id,)).fetchone()
        else:
            row = db.execute("SELECT * FROM decisions WHERE deployment_id=? AND policy=? AND "
                             "step=?", (deployment_id, policy, int(step))).fetchone()
        entry = self._entry(row)
        if not inserted:
            log.info("decision for deployment=%s policy=%s step=%d already logged (action=%s)",
                     deployment_id, policy, step, entry.action)
        return entry, inserted

    def mark_applied(self, entry_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE decisions SET applied=1, applied_at=?, error=NULL WHERE id=?",
                       (time.time(), entry_id))

    def mark_applied_many(self, entry_ids: Sequence[int]) -> None:
        """Mark a tick's landed actions in one transaction, committed without an fsync (see
        the module doc: a mark lost in a crash only means an idempotent re-apply)."""
        if not entry_ids:
            return
        now = time.time()
        with self._tx(durable=False) as db:
            db.executemany("UPDATE decisions SET applied=1, applied_at=?, error=NULL WHERE id=?",
                           [(now, int(i)) for i in entry_ids])

    def mark_skipped(self, entry_id: int, reason: str, *, durable: bool = True) -> None:
        """The action will never be applied (stored as applied=-1: not pending, not applied).
        `durable=False`: no fsync of its own (lost in a crash, it is re-applied and skipped
        again)."""
        with self._tx(durable=durable) as db:
            db.execute("UPDATE decisions SET applied=-1, error=? WHERE id=?", (reason, entry_id))

    def mark_failed(self, entry_id: int, error: str, *, durable: bool = True) -> None:
        """Record why the action did not land (it stays pending). `durable=False`: no fsync of
        its own (the serve loop's ticks: the entry is pending on disk either way)."""
        with self._tx(durable=durable) as db:
            db.execute("UPDATE decisions SET applied=0, error=? WHERE id=?", (error, entry_id))

    def entries(self, deployment_id: str | None = None, policy: str | None = None) -> list[LogEntry]:
        sql, args = "SELECT * FROM decisions WHERE 1=1", list[str]()
        if deployment_id is not None:
            sql, args = sql + " AND deployment_id=?", [*args, deployment_id]
        if policy is not None:
            sql, args = sql + " AND policy=?", [*args, policy]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [self._entry(r) for r in rows]

    def pending(self) -> list[LogEntry]:
        """Logged intents that were never marked applied (re-apply them after a restart)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM decisions WHERE applied=0 ORDER BY id").fetchall()
        return [self._entry(r) for r in rows]

    # --- controller state --------------------------------------------------------------------
    def save_state(self, deployment_id: str, step: int, state: Mapping[str, Any]) -> None:
        """Persist the controller's per-deployment state (policy history, batch, phase)."""
        with self._tx() as db:
            self._save_state(db, deployment_id, step, state)

    @staticmethod
    def _save_state(db: sqlite3.Connection, deployment_id: str, step: int,
                    state: Mapping[str, Any]) -> None:
        db.execute(
            "INSERT INTO controller_state (deployment_id, last_step, state, updated_at) "
            "VALUES (?,?,?,?) ON CONFLICT(deployment_id) DO UPDATE SET "
            "last_step=excluded.last_step, state=excluded.state, updated_at=excluded.updated_at",
            (deployment_id, int(step), json.dumps(dict(state), default=str), time.time()),
        )

    def last_steps(self) -> dict[str, int]:
        """The highest logged step per deployment (whatever the policy)."""
        with self._lock:
            rows = self._db.execute("SELECT deployment_id, max(step) FROM decisions "
                                    "GROUP BY deployment_id").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def load_state(self, deployment_id: str) -> tuple[int, dict[str, Any]] | None:
        """(last_step, state) saved for `deployment_id`, or None for a new deployment."""
        with self._lock:
            row = self._db.execute("SELECT last_step, state FROM controller_state WHERE "
                                   "deployment_id=?", (deployment_id,)).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def states(self) -> dict[str, tuple[int, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT deployment_id, last_step, state FROM "
                                    "controller_state").fetchall()
        return {r[0]: (int(r[1]), json.loads(r[2])) for r in rows}

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> LogEntry:
        (id_, dep, policy, step, decided_at, action, score, reasons, evidence, model_version,
         applied, applied_at, error, reason) = row
        return LogEntry(id=int(id_), deployment_id=dep, policy=policy, step=int(step),
                        decided_at=float(decided_at), action=Action(action), score=score,
                        reason=reason if reason is not None else "; ".join(json.loads(reasons)),
                        reasons=tuple(json.loads(reasons)), evidence=json.loads(evidence),
                        model_version=model_version, applied=applied == 1,
                        applied_at=applied_at, error=error, skipped=applied == -1)
