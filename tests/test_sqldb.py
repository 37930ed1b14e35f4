"""`matcher.sqldb`, the matcher's other databases on either engine: versioned steps applied once however many
matchers open a database at a time, files from before versioning upgraded in place, a newer schema refused, a
PostgreSQL connection the server dropped replaced."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from crossview.kernel.config import StoreConfig
from crossview.matcher.audit import AuditLog
from crossview.matcher.sqldb import open_db, schema_version

STEPS = ["CREATE TABLE things (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);",
         "ALTER TABLE things ADD COLUMN seen REAL;"]  # not repeatable: a second run of either fails


def test_matchers_opening_one_database_at_once_apply_each_step_once(tmp_path, store_section):
    store, dbs, errors = StoreConfig(**store_section), [], []

    def open_one() -> None:
        try:
            dbs.append(open_db("things", tmp_path / "things.db", store, STEPS))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(dbs) == 6 and {schema_version(db) for db in dbs} == {2}
    (new,) = dbs[0].one("INSERT INTO things (name, seen) VALUES (?, ?) RETURNING id", ("a", 1.5))
    assert dbs[-1].all("SELECT id, name, seen FROM things") == [(new, "a", 1.5)]
    with pytest.raises(ValueError, match=r"things: .*schema version 2 is newer than this matcher's 1: upgrade the matcher"):
        open_db("things", tmp_path / "things.db", store, STEPS[:1])
    for db in dbs:
        db.close()


def test_an_audit_log_from_before_versioning_keeps_its_rows_and_becomes_append_only(tmp_path):
    old = sqlite3.connect(tmp_path / "audit.db")
    old.executescript("""
        CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, user TEXT NOT NULL,
                            action TEXT NOT NULL, detail TEXT NOT NULL, results INTEGER);
        CREATE INDEX audit_ts ON audit (ts);
        CREATE TRIGGER audit_append_only BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        INSERT INTO audit (ts, user, action, detail, results) VALUES (1000.0, 'old', 'search', '{}', 1);
    """)
    old.close()
    audit = AuditLog(tmp_path)
    assert [(e["user"], e["ts"]) for e in audit.entries()] == [("old", 1000.0)] and schema_version(audit._db) == 2
    with pytest.raises(audit._db.Error, match="append-only"):
        audit._db.run("DELETE FROM audit")
    assert audit.prune(max_age_days=1, now=1000.0 + 86400 + 1) == 1 and audit.entries() == []
    audit.close()


def test_a_connection_the_server_dropped_is_replaced_at_the_next_call(tmp_path, pg_server):
    section = pg_server.store_section(pg_server.fresh_db())
    db = open_db("things", tmp_path / "things.db", StoreConfig(**section), STEPS)
    db.run("INSERT INTO things (name) VALUES (?)", ("a",))
    with pg_server.connect(section["dbname"]) as admin:  # as a server restart or failover would
        admin.execute("SELECT pg_terminate_backend(%s)", (db.conn.info.backend_pid,))
    with pytest.raises(db.Error):
        db.all("SELECT name FROM things")
    assert db.all("SELECT name FROM things") == [("a",)]
    db.close()
