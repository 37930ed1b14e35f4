"""Several operators, accountably: per-user tokens with roles, and the append-only audit log of who looked for whom.
On both backends (`store_section`); on PostgreSQL two matchers share the users and the log."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import yaml
from helpers import Pusher, make_sighting, matcher_config, unit_vectors, wait_until

from crossview.cli import main
from crossview.kernel.config import StoreConfig
from crossview.matcher.api import serve
from crossview.matcher.audit import MAX_DETAIL, AuditLog
from crossview.matcher.client import MatcherClient
from crossview.matcher.service import Matcher
from crossview.matcher.users import Users

TOKEN = "admin-token-0123456789"


def cli_place(data_dir, store_section: dict) -> list[str]:
    """The CLI's arguments for this matcher's data: --data-dir (SQLite), or a --config naming the database."""
    if not store_section:
        return ["--data-dir", str(data_dir)]
    path = data_dir.parent / "matcher.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(data_dir), "store": store_section, "http": {"token": TOKEN},
                                    "ingest": {"security": {"mode": "plain"}}}))
    return ["--config", str(path)]


@pytest.fixture
def site(tmp_path, store_section):
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN}, store=store_section)
    m = Matcher(cfg)
    m.start()
    vecs = unit_vectors(np.random.default_rng(3), 6, 16)
    with Pusher(m.ingest.endpoint) as push:
        push.send([make_sighting(v, camera="gate" if i % 2 else "lobby", track=i, frame=i) for i, v in enumerate(vecs)])
    wait_until(lambda: m.ingest.accepted == 6, 10, "6 sightings")
    server = serve(m, cfg.http)
    yield m, server.url.rstrip("/"), cli_place(cfg.data_dir, store_section)
    server.stop()
    m.stop()


def _cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_viewers_search_admins_also_change_and_every_look_is_logged_with_its_user(site, capsys):
    m, url, place = site
    out = _cli(capsys, "users", "add", "alice", "--role", "viewer", *place)
    alice = out.strip().splitlines()[-1]
    bob = _cli(capsys, "users", "add", "bob", "--role", "admin", *place).strip().splitlines()[-1]
    assert len({alice, bob, TOKEN}) == 3 and alice not in str(m.users._connect().all("SELECT * FROM users"))
    assert not (m.cfg.data_dir / "users.db").exists() or alice not in (m.cfg.data_dir / "users.db").read_text(errors="ignore")

    viewer = MatcherClient(url, alice)
    answer = viewer.query({"sighting_id": 1, "top_k": 3})
    assert requests.get(f"{url}/api/v1/sightings/1/thumbnail", headers={"Authorization": f"Bearer {alice}"},
                        timeout=10).status_code in (200, 404)
    with pytest.raises(PermissionError, match="viewer role; this needs admin"):
        viewer.watch({"name": "suspect", "sighting_id": 1})
    with pytest.raises(PermissionError):
        viewer.audit()
    entry = MatcherClient(url, bob).watch({"name": "suspect", "sighting_id": 1})
    assert requests.delete(f"{url}/api/v1/watchlist/{entry['id']}", headers={"Authorization": f"Bearer {bob}"},
                           timeout=10).status_code == 200
    with pytest.raises(LookupError):
        viewer.query({"sighting_id": 999})

    log = MatcherClient(url, bob).audit()
    rows = [(e["user"], e["action"]) for e in log]
    assert rows == [("alice", "search"), ("alice", "thumbnail"), ("bob", "watchlist.add"), ("bob", "watchlist.remove"),
                    ("alice", "search")]
    first = log[0]
    assert first["asked"]["sighting_id"] == 1 and first["asked"]["top_k"] == 3
    assert first["results"] == sum(len(hits) for hits in answer["cameras"].values()) > 0
    assert "refused" in log[-1]["asked"] and log[-1]["results"] == 0
    # The admins' own reading is logged too; the export has every entry as a JSON line.
    out = _cli(capsys, "audit", "export", *place)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["action"] for x in lines][-1] == "audit.read" and len(lines) == len(log) + 1

    # Revoked: refused at the next request, and the log keeps what they did.
    _cli(capsys, "users", "revoke", "alice", *place)
    with pytest.raises(PermissionError, match="missing or wrong token"):
        viewer.query({"sighting_id": 1})
    assert "revoked" in _cli(capsys, "users", "list", *place).splitlines()[0]
    assert main(["users", "add", "alice", *place]) == 2  # the name stays taken: a clear error


def test_the_configured_token_is_the_admin_and_embeddings_are_not_logged(site):
    m, url, _ = site
    vec = [0.25] * 16
    MatcherClient(url, TOKEN).query({"embedding": vec, "model": "m1", "top_k": 2})
    (e,) = [x for x in m.audit.entries() if x["action"] == "search"]
    assert e["user"] == "admin" and e["asked"]["embedding"] == "16 numbers" and e["asked"]["model"] == "m1"


def test_the_log_is_append_only_bounded_and_has_its_own_retention(tmp_path, store_section):
    audit = AuditLog(tmp_path, store=StoreConfig(**store_section))
    audit.record("eve", "search", {"name": "x" * 100_000}, 0)
    (e,) = audit.entries()
    assert len(json.dumps(e["asked"])) <= MAX_DETAIL + 100 and "truncated" in e["asked"]
    tamper = ["UPDATE audit SET \"user\" = 'mallory'", "DELETE FROM audit"] + (["TRUNCATE audit"] if store_section else [])
    for sql in tamper:
        with pytest.raises(audit._db.Error, match="append-only"):
            audit._db.run(sql)
    assert len(audit.entries()) == 1
    with pytest.raises(ValueError, match="unknown"):
        audit.record("eve", "peek", {})
    assert audit.prune(max_age_days=1) == 0
    assert audit.prune(max_age_days=1, now=time.time() + 2 * 86400) == 1 and audit.entries() == []


def test_two_matchers_on_one_postgres_share_users_and_the_audit_log(tmp_path, pg_server):
    store = StoreConfig(**pg_server.store_section(pg_server.fresh_db()))
    with pytest.raises(FileNotFoundError, match="no audit log"):
        AuditLog(tmp_path / "cli", read_only=True, store=store)
    one, other = AuditLog(tmp_path / "one", store=store), AuditLog(tmp_path / "other", store=store)
    one.record("alice", "search", {"sighting_id": 1}, 2)
    other.record("bob", "thumbnail", {"sighting_id": 1})
    assert [(e["user"], e["action"]) for e in other.entries()] == [("alice", "search"), ("bob", "thumbnail")]
    assert [e["user"] for e in AuditLog(tmp_path / "cli", read_only=True, store=store).entries()] == ["alice", "bob"]
    token = Users(tmp_path / "one", store).add("carol", "viewer")
    assert Users(tmp_path / "other", store).lookup(token).name == "carol" and not (tmp_path / "other" / "users.db").exists()
    one.close()
    other.close()


def test_user_names_and_roles_are_checked(tmp_path, store_section):
    users = Users(tmp_path, StoreConfig(**store_section))
    for name, role, match in [("a b", "viewer", "user name"), ("x" * 65, "viewer", "user name"),
                              ("carol", "root", "role")]:
        with pytest.raises(ValueError, match=match):
            users.add(name, role)
    with pytest.raises(LookupError, match="no active user"):
        users.revoke("nobody")
    assert users.lookup("") is None and users.lookup("guess") is None
