"""What only the PostgreSQL store has: its config section, versioned schema, read-only opening and connection errors.

| test                   | what                                                                             |
|------------------------|----------------------------------------------------------------------------------|
| config                 | `store.*` errors name the key; a password in the dsn is refused; the file's is used |
| schema                 | a new database gets every step once; a reopen applies none; a newer one is refused; |
|                        | one from before `schema_version` had a module column is read and upgraded        |
| read-only              | reads beside the writer, refuses writes, and an empty database is no store        |
| wrong password         | a `ConnectionError` naming the server, never the password                          |
| concurrent readers     | queries from several threads at once, each on a pooled connection                  |
| dropped connections    | the writer and the pool reconnect; the matcher rides out a server restart: what     |
|                        | arrived while it was down is not acknowledged and is stored once resent, the API    |
|                        | answers 503 meanwhile                                                              |

The behaviour both backends share is tested on both: store, retention, queries, durability, delivery, migration
and the HTTP API (the `store_section` fixture).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import Pusher, make_sighting, matcher_config, person_world, store_insert, unit_vectors, wait_until

from crossview.kernel.config import ConfigError, StoreConfig, load_matcher_config
from crossview.matcher.pgstore import MIGRATIONS, PgStore


@pytest.fixture
def section(pg_server) -> dict:
    return pg_server.store_section(pg_server.fresh_db())


def test_config_errors_name_the_key_and_the_password_stays_in_its_file(tmp_path, pg_server):
    path = tmp_path / "matcher.yaml"
    base = "ingest: {security: {mode: plain}}\nhttp: {token: test-token-0123456789}\n"
    for store, message in [
        ("{kind: postgres}", "store: Value error, kind postgres needs dsn, or dbname"),
        ("{dsn: 'host=x'}", "store: Value error, dsn: only for kind postgres"),
        ("{kind: postgres, dsn: 'postgresql://u:hunter2-secret@h/db'}", "no password in the connection string"),
        ("{kind: postgres, dbname: x, port: 0}", "store.port: Input should be greater than or equal to 1"),
        ("{kind: mysql}", "store.kind: Input should be 'sqlite' or 'postgres'"),
    ]:
        path.write_text(base + f"store: {store}\n")
        with pytest.raises(ConfigError, match=message) as e:
            load_matcher_config(path)
        assert "hunter2" not in str(e.value)
    (tmp_path / "pw").write_text(pg_server.password_file.read_text())
    path.write_text(base + f"store: {{kind: postgres, host: 127.0.0.1, port: {pg_server.port}, dbname: postgres, "
                           "user: postgres, password_file: pw}\n")
    cfg = load_matcher_config(path).store
    assert cfg.password_file == tmp_path / "pw" and "password=" in cfg.conninfo()
    assert cfg.shown == f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"


def test_schema_steps_run_once_and_a_newer_schema_is_refused(section, pg_server):
    PgStore(StoreConfig(**section)).close()
    PgStore(StoreConfig(**section)).close()  # nothing left to apply
    with pg_server.connect(section["dbname"]) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        db.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(ValueError, match=f"schema version {len(MIGRATIONS) + 1} is newer than this matcher's"):
        PgStore(StoreConfig(**section))


def test_a_store_from_before_the_other_modules_came_is_read_and_upgraded_in_place(section, pg_server):
    with pg_server.connect(section["dbname"]) as db:  # its schema_version had one row, no module column
        db.execute(MIGRATIONS[0])
        db.execute("CREATE TABLE schema_version (version integer NOT NULL); INSERT INTO schema_version VALUES (1)")
    PgStore(StoreConfig(**section), read_only=True).close()
    PgStore(StoreConfig(**section)).close()  # step 1 is not run again
    with pg_server.connect(section["dbname"]) as db:
        assert db.execute("SELECT module, version FROM schema_version").fetchall() == [("store", len(MIGRATIONS))]


def test_read_only_reads_beside_the_writer_and_refuses_writes(section, pg_server):
    cfg = StoreConfig(**section)
    with pytest.raises(FileNotFoundError, match="no matcher store here"):
        PgStore(cfg, read_only=True)
    writer = PgStore(cfg)
    reader = PgStore(cfg, read_only=True)
    try:
        ids = store_insert(writer, [make_sighting(v, frame=k) for k, v in enumerate(unit_vectors(np.random.default_rng(0), 3, 8))])
        assert sorted(reader.records(ids)) == ids and reader.next_id() == 4
        with pytest.raises(PermissionError, match="read-only"):
            reader.delete(ids)
        with pytest.raises(reader.Error, match="read-only transaction"):
            reader._all("DELETE FROM sightings")
    finally:
        reader.close()
        writer.close()


def test_a_wrong_password_is_a_connection_error_naming_the_server(section, tmp_path):
    (tmp_path / "pw").write_text("not-the-password-0123456789")
    with pytest.raises(ConnectionError, match=r"store: postgresql://postgres@127\.0\.0\.1:\d+/t\d+: .*password authentication"
                                              r" failed") as e:
        PgStore(StoreConfig(**{**section, "password_file": tmp_path / "pw"}))
    assert "not-the-password" not in str(e.value)


def test_concurrent_readers_each_get_a_pooled_connection(section, tmp_path):
    store = PgStore(StoreConfig(**section, pool_max=4))
    vecs = unit_vectors(np.random.default_rng(1), 200, 16)
    ids = store_insert(store, [make_sighting(v, frame=k, camera=f"cam{k % 4}") for k, v in enumerate(vecs)])
    got, errors = [], []

    def read(k: int) -> None:
        try:
            for _ in range(20):
                chunks = list(store.vectors("m1"))
                got.append((len(store.records(ids)), sum(len(c[0]) for c in chunks), len(store.recent(f"cam{k % 4}", 100))))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    store.close()
    assert not errors and got == [(200, 200, 50)] * 160


def test_a_matcher_config_with_a_postgres_store_opens_it(tmp_path, section):
    from crossview.matcher.service import Matcher

    m = Matcher(matcher_config(tmp_path, store=section))
    try:
        assert type(m.store) is PgStore and not (tmp_path / "sightings.db").exists()
    finally:
        m.stop()


def test_the_writer_and_the_readers_recover_from_a_dropped_connection(section, pg_server):
    """A server restart or failover drops every connection: the transaction on the dead one fails (the ingest
    pipeline does not acknowledge it, so the edge resends), the next one commits on a new connection, and reads go
    on from the pool."""
    store = PgStore(StoreConfig(**section))
    vecs = unit_vectors(np.random.default_rng(0), 3, 8)
    first = store_insert(store, [make_sighting(vecs[0], frame=0)])
    with pg_server.connect(section["dbname"]) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                      "pg_backend_pid()", (section["dbname"],))
    with pytest.raises(store.Error):
        store_insert(store, [make_sighting(vecs[1], frame=1)])
    second = store_insert(store, [make_sighting(vecs[2], frame=2)])
    assert sorted(store.records(first + second)) == first + second
    store.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no matcher thread may die of it
def test_the_matcher_rides_out_a_server_restart_and_stores_what_the_edges_resend(tmp_path, caplog, own_pg_server):
    """The server stops under a running matcher. What arrives meanwhile is neither stored nor acknowledged, the API
    answers 503, the matcher and every thread of it keep running, and once the server is back the edges' resends are
    stored: no restart of the matcher, nothing lost."""
    import requests

    from crossview.matcher.api import serve
    from crossview.matcher.service import Matcher

    world = person_world(persons=4)
    before, during = world.sightings[:20], world.sightings[20:40]
    hook = {"url": "http://127.0.0.1:9/alerts", "secret": "s" * 16}  # its thread reads the database every second
    cfg = matcher_config(tmp_path, store=own_pg_server.store_section("postgres"), watchlist={"webhooks": [hook]},
                         http={"port": 0})
    m = Matcher(cfg)
    m.start()
    api = serve(m, cfg.http)
    stats = lambda: requests.get(f"{api.url}api/v1/stats", headers={"Authorization": f"Bearer {cfg.http.token}"},  # noqa: E731
                                 timeout=30)
    try:
        with Pusher(m.ingest.endpoint) as push:
            push.send(before)
            wait_until(lambda: m.ingest.accepted == 20, 20, "the first 20 sightings accepted")
            own_pg_server.stop()
            push.send(during)
            wait_until(lambda: "20 sightings not stored, the edges will resend them" in caplog.text, 30,
                       "the batch refused while the server is down")
            assert m.ingest.accepted == 20
            down = stats()
            assert down.status_code == 503 and "store is unavailable" in down.json()["detail"]
            assert requests.get(f"{api.url}api/v1/ready", timeout=30).status_code == 503
            assert requests.get(f"{api.url}api/v1/health", timeout=30).status_code == 200  # alive: no restart wanted
            own_pg_server.resume()
            push.send(during)  # as the edges' publishers do with what was not acknowledged
            wait_until(lambda: m.ingest.accepted == 40, 30, "the resent sightings accepted")
        assert m.store.next_id() == 41 and stats().json()["accepted"] == 40
        assert requests.get(f"{api.url}api/v1/ready", timeout=30).status_code == 200
    finally:
        api.stop()
        m.stop()


def test_a_connection_attempt_gives_up_in_seconds_unless_the_dsn_says_otherwise():
    from psycopg.conninfo import conninfo_to_dict

    from crossview.kernel.config import CONNECT_TIMEOUT_S

    given = StoreConfig(kind="postgres", dsn="host=db dbname=crossview connect_timeout=3").conninfo()
    assert conninfo_to_dict(given)["connect_timeout"] == "3"
    default = StoreConfig(kind="postgres", host="db", dbname="crossview").conninfo()
    assert conninfo_to_dict(default)["connect_timeout"] == str(CONNECT_TIMEOUT_S)
