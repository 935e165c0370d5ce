"""Crash-safe store of per-sample outcomes: one SQLite database in the output directory.

Each finished unit of work (one model, one chunk of samples, one stage) is one row, written in its own
transaction, so a killed process loses at most the unit in flight; ``synchronous=FULL`` makes a committed
transaction survive a power cut too. Several processes (torchrun ranks, model workers) write to the same file;
SQLite's locking serialises them and ``timeout`` makes a writer wait for the lock instead of failing.

The ``meta`` table holds the run's settings and each model's outputs on a few test samples; a resumed run must
bring the same settings and a model that still gives those outputs, or its units would mix two different
evaluations.
"""
from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable

import numpy as np

FILENAME = "outcomes.sqlite"
LOCK_TIMEOUT_S = 600
# How far a resumed run's model may move the recorded outputs, relative to their largest magnitude (at least
# 1): numerical noise (another thread count, another GPU of the same kind), far below what a change of the
# model's code makes.
OUTPUT_TOLERANCE = 1e-3


# Stamped into the database header (PRAGMA application_id, bytes 68-71) when the store is made, so that an
# outcome store is told from another file of its name by what it holds ("LKEV").
APPLICATION_ID = 0x4C4B4556
_SQLITE_MAGIC = b"SQLite format 3\x00"


# The files SQLite keeps beside a database: its rollback journal, write-ahead log and shared memory, and a
# super-journal (``-mj`` and hex digits).
_SQLITE_SIDE_FILE = re.compile(re.escape(FILENAME) + r"-(journal|wal|shm|mj[0-9A-Fa-f]+)")
# The tables an outcome store holds, and the columns of each: a store an earlier lipkern made, before the
# application id, is told by them.
_STORE_TABLES = {"meta": ["key", "value"], "units": ["model", "chunk", "unit", "data", "seconds"]}


def is_store_file(path) -> bool:
    """Whether ``path`` is an outcome store lipkern made or one of SQLite's files beside one (a killed run's
    journal), told by content: the database by the application id in its header, by its tables where an earlier
    lipkern left the id unset, or empty (a run killed while SQLite made it: it holds nothing); a file of SQLite's
    by its name and the database it belongs to."""
    path = Path(path)
    if path.name != FILENAME:
        return (_SQLITE_SIDE_FILE.fullmatch(path.name) is not None and path.is_file()
                and is_store_file(path.with_name(FILENAME)))
    try:
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return False
    if not head:
        return True
    if not head.startswith(_SQLITE_MAGIC) or len(head) < 72:
        return False
    application_id = int.from_bytes(head[68:72], "big")
    return application_id == APPLICATION_ID or (application_id == 0 and _tables(path) in ({}, _STORE_TABLES))


def _tables(path: Path) -> dict[str, list[str]] | None:
    """The tables of the SQLite database at ``path`` and their columns, read without writing or waiting on a
    lock; None where it cannot be read."""
    try:
        db = _read_only(path)
        try:
            names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {name: [row[1] for row in db.execute(f"PRAGMA table_info({name!r})")] for name in names}
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that neither writes to the database at ``path`` nor waits long on its lock."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)


class NotAStoreError(ValueError):
    """The output directory holds a file of the store's name that no lipkern made."""


class SettingsMismatchError(ValueError):
    """A resumed run's settings differ from those the store was started with."""


def unit_count(out_dir) -> int | None:
    """How many finished units the store in ``out_dir`` holds (0 without a store), read without writing or
    waiting on a lock; None where a store is there but cannot be read."""
    path = Path(out_dir) / FILENAME
    if not path.is_file():
        return 0
    try:
        db = _read_only(path)
        try:
            return db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError as e:
        return 0 if "no such table" in str(e) else None
    except sqlite3.Error:
        return None


def holds_outcomes(out_dir) -> bool:
    """Whether the store in ``out_dir`` holds a finished unit; a store that cannot be read counts as holding
    some (the caller then keeps it)."""
    count = unit_count(out_dir)
    return count is None or count > 0


def _differences(recorded: dict, settings: dict, prefix: str = ""):
    """(key, recorded value, new value) of each setting that differs; a dict on both sides by its entries
    (``budget.pgd_steps``), so that a refusal does not print two whole budgets, or by its ``name`` entry alone
    where that differs (the other entries of the quick and the full budget differ because they are two)."""
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            if "name" in old and "name" in new and old["name"] != new["name"]:
                yield prefix + key, old["name"], new["name"]
            else:
                yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield prefix + key, old, new


def _named(key: str, named: dict[str, str]) -> str:
    """What ``named`` calls a setting: by its key, or an entry of a dict-valued one by its parent's name."""
    parent, _, entry = key.partition(".")
    if key in named or not (entry and parent in named):
        return named.get(key, key)
    return f"{entry} of {named[parent]}"


def _shown(formatter, old, new) -> tuple[str, str]:
    """Two differing values as ``formatter`` writes them, or in full where it writes both alike."""
    if formatter is not None and formatter(old) != formatter(new):
        return formatter(old), formatter(new)
    return repr(old), repr(new)


class OutcomeStore:
    def __init__(self, out_dir):
        self.path = Path(out_dir) / FILENAME
        if self.path.exists() and not is_store_file(self.path):
            # Opening it would add the store's tables to a database of the user's and mark it lipkern's.
            raise NotAStoreError(f"{self.path} is not an outcome store lipkern made; move it away, or choose "
                                 "another directory")
        self._db = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            # Marked when made; an earlier lipkern's store is told by its tables and stays as it is, since
            # opening it may end in a refusal, which must leave it untouched.
            if self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            # `seconds`: the unit's own compute time, read without its outcomes' blob.
            self._db.execute("CREATE TABLE IF NOT EXISTS units (model TEXT NOT NULL, chunk INTEGER NOT NULL, "
                             "unit TEXT NOT NULL, data BLOB NOT NULL, seconds REAL NOT NULL, "
                             "PRIMARY KEY (model, chunk, unit))")

    def _transaction(self):
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    def bind_settings(self, model: str, settings: dict, hashed: dict[str, str] | None = None,
                      run_models=None, shown: dict[str, Callable[[Any], str]] | None = None,
                      named: dict[str, str] | None = None) -> None:
        """Records ``settings`` for ``model`` and ``run_models`` (the names of every model of the run sharing
        this store), or checks them against those already recorded; nothing is recorded unless all of it
        passes. A refusal names the settings that differ (a dict-valued one by its entries that differ) as
        ``named`` calls them (key or ``parent.entry`` -> what the caller set; by key where it has no name),
        those in ``hashed`` (a digest's key -> what it digests) in words, and shows the values of those in
        ``shown`` (key -> formatter) as it formats them."""
        text = json.dumps(settings, sort_keys=True)
        settings = json.loads(text)  # compared as stored: tuples come back as lists
        key = f"settings:{model}"
        with self._transaction():  # a refusal raised inside rolls back, so a refused run records nothing
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._check_settings(model, json.loads(row[0]), settings, hashed or {}, shown or {}, named or {})
            recorded_models = self.run_models()
            models = None if run_models is None else sorted(set(run_models))
            if models is not None and recorded_models is not None and recorded_models != models:
                raise SettingsMismatchError(f"{self.path} holds a run of {', '.join(recorded_models)}, and this one "
                                            f"is of {', '.join(models)}; resume with the same models, or start "
                                            "over (--overwrite; from Python, another out_dir)")
            if row is None:
                self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, text))
            if models is not None and recorded_models is None:
                self._db.execute("INSERT INTO meta VALUES ('run_models', ?)", (json.dumps(models),))

    def _check_settings(self, model: str, recorded: dict, settings: dict, hashed: dict[str, str],
                        shown: dict[str, Callable[[Any], str]], named: dict[str, str]) -> None:
        if recorded.get("store_format") != settings.get("store_format"):
            raise SettingsMismatchError(f"{self.path} holds a run of {model} stored by another version of lipkern "
                                        f"(store format {recorded.get('store_format')}, this one's "
                                        f"{settings.get('store_format')}); it cannot be resumed: start over "
                                        "(--overwrite; from Python, another out_dir)")
        details = [f"{hashed[key]} differ" if key in hashed else
                   "{}: recorded {}, now {}".format(_named(key, named), *_shown(shown.get(key), old, new))
                   for key, old, new in _differences(recorded, settings)]
        if details:
            raise SettingsMismatchError(f"{self.path} holds a run of {model} with other settings "
                                        f"({'; '.join(details)}); resume with the same arguments, or start over "
                                        "(--overwrite; from Python, another out_dir)")

    def run_models(self) -> list[str] | None:
        """The models the run was started with (None where its starter did not record them)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'run_models'").fetchone()
        return None if row is None else json.loads(row[0])

    def bind_outputs(self, model: str, outputs: np.ndarray) -> None:
        """Records ``model``'s outputs on a few fixed samples, or checks them against those already recorded:
        the settings hash the weights, not the code that runs them."""
        outputs = np.asarray(outputs, dtype=np.float64)
        key = f"outputs:{model}"
        with self._transaction():
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES (?, ?)", (key, json.dumps(outputs.tolist())))
                return
        recorded = np.asarray(json.loads(row[0]), dtype=np.float64)
        finite = np.abs(recorded[np.isfinite(recorded)])
        tolerance = OUTPUT_TOLERANCE * max(1.0, float(finite.max(initial=0.0)))
        if recorded.shape != outputs.shape:
            how = f"recorded shape {recorded.shape}, now {outputs.shape}"
        else:
            differs = ~np.isclose(outputs, recorded, rtol=0, atol=tolerance, equal_nan=True)
            if not differs.any():
                return
            apart = np.abs(outputs - recorded)[differs]
            finite = apart[np.isfinite(apart)]
            how = (f"{int(differs.sum())} of {differs.size} values, "
                   + (f"by up to {float(finite.max()):.3g}" if finite.size else "NaN or infinite on one side")
                   + f"; tolerance {tolerance:.3g}")
        raise SettingsMismatchError(f"{self.path} holds a run of {model} whose outputs on the first {len(recorded)} "
                                    f"test samples differ from this model's ({how}): its code or inputs changed; "
                                    "resume with the same model, or start over (--overwrite; from Python, another "
                                    "out_dir)")

    def models(self) -> list[str]:
        """The models whose settings the store holds (those a run had started on)."""
        rows = self._db.execute("SELECT key FROM meta WHERE key LIKE 'settings:%'").fetchall()
        return sorted(key.removeprefix("settings:") for (key,) in rows)

    def has(self, model: str, chunk: int, unit: str) -> bool:
        return self._db.execute("SELECT 1 FROM units WHERE model = ? AND chunk = ? AND unit = ?",
                                (model, chunk, unit)).fetchone() is not None

    def put(self, model: str, chunk: int, unit: str, arrays: dict[str, np.ndarray], seconds: float) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?)",
                             (model, chunk, unit, buffer.getvalue(), seconds))

    def unit_seconds(self, model: str) -> list[tuple[str, float]]:
        """Each stored unit of ``model`` and the seconds it took, whichever process or session ran it."""
        return self._db.execute("SELECT unit, seconds FROM units WHERE model = ?", (model,)).fetchall()

    def get(self, model: str, chunk: int, unit: str, keys=None) -> dict[str, np.ndarray]:
        """The arrays of one unit (only ``keys`` when given: the others are not decoded)."""
        row = self._db.execute("SELECT data FROM units WHERE model = ? AND chunk = ? AND unit = ?",
                               (model, chunk, unit)).fetchone()
        if row is None:
            raise KeyError(f"{self.path}: no outcomes for {model}, chunk {chunk}, {unit}")
        with np.load(io.BytesIO(row[0]), allow_pickle=False) as f:
            return {k: f[k] for k in (f.files if keys is None else keys)}

    def count(self, model: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM units WHERE model = ?", (model,)).fetchone()[0]


class _Transaction:
    """BEGIN IMMEDIATE .. COMMIT, ROLLBACK on error: the write lock is taken up front, so two writers never
    deadlock upgrading a read lock."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
