"""Several operators, accountably: per-user tokens with roles, and the append-only audit log of who looked for whom."""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
import requests
from helpers import Pusher, make_sighting, matcher_config, unit_vectors, wait_until

from crossview.cli import main
from crossview.matcher.api import serve
from crossview.matcher.audit import MAX_DETAIL, AuditLog
from crossview.matcher.client import MatcherClient
from crossview.matcher.service import Matcher
from crossview.matcher.users import Users

TOKEN = "admin-token-0123456789"


@pytest.fixture
def site(tmp_path):
    cfg = matcher_config(tmp_path / "matcher", http={"port": 0, "token": TOKEN})
    m = Matcher(cfg)
    m.start()
    vecs = unit_vectors(np.random.default_rng(3), 6, 16)
    with Pusher(m.ingest.endpoint) as push:
        push.send([make_sighting(v, camera="gate" if i % 2 else "lobby", track=i, frame=i) for i, v in enumerate(vecs)])
    wait_until(lambda: m.ingest.accepted == 6, 10, "6 sightings")
    server = serve(m, cfg.http)
    yield m, server.url.rstrip("/"), cfg.data_dir
    server.stop()
    m.stop()


def _cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_viewers_search_admins_also_change_and_every_look_is_logged_with_its_user(site, capsys):
    m, url, data = site
    out = _cli(capsys, "users", "add", "alice", "--role", "viewer", "--data-dir", str(data))
    alice = out.strip().splitlines()[-1]
    bob = _cli(capsys, "users", "add", "bob", "--role", "admin", "--data-dir", str(data)).strip().splitlines()[-1]
    assert len({alice, bob, TOKEN}) == 3 and alice not in (data / "users.db").read_bytes().decode(errors="ignore")

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
    out = _cli(capsys, "audit", "export", "--data-dir", str(data))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["action"] for x in lines][-1] == "audit.read" and len(lines) == len(log) + 1

    # Revoked: refused at the next request, and the log keeps what they did.
    _cli(capsys, "users", "revoke", "alice", "--data-dir", str(data))
    with pytest.raises(PermissionError, match="missing or wrong token"):
        viewer.query({"sighting_id": 1})
    assert "revoked" in _cli(capsys, "users", "list", "--data-dir", str(data)).splitlines()[0]
    assert main(["users", "add", "alice", "--data-dir", str(data)]) == 2  # the name stays taken: a clear error


def test_the_configured_token_is_the_admin_and_embeddings_are_not_logged(site):
    m, url, _ = site
    vec = [0.25] * 16
    MatcherClient(url, TOKEN).query({"embedding": vec, "model": "m1", "top_k": 2})
    (e,) = [x for x in m.audit.entries() if x["action"] == "search"]
    assert e["user"] == "admin" and e["asked"]["embedding"] == "16 numbers" and e["asked"]["model"] == "m1"


def test_the_log_is_append_only_bounded_and_has_its_own_retention(tmp_path):
    audit = AuditLog(tmp_path)
    audit.record("eve", "search", {"name": "x" * 100_000}, 0)
    (e,) = audit.entries()
    assert len(json.dumps(e["asked"])) <= MAX_DETAIL + 100 and "truncated" in e["asked"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        audit._db.execute("UPDATE audit SET user = 'mallory'")
    with pytest.raises(ValueError, match="unknown"):
        audit.record("eve", "peek", {})
    assert audit.prune(max_age_days=1) == 0
    assert audit.prune(max_age_days=1, now=time.time() + 2 * 86400) == 1 and audit.entries() == []


def test_user_names_and_roles_are_checked(tmp_path):
    users = Users(tmp_path)
    for name, role, match in [("a b", "viewer", "user name"), ("x" * 65, "viewer", "user name"),
                              ("carol", "root", "role")]:
        with pytest.raises(ValueError, match=match):
            users.add(name, role)
    with pytest.raises(LookupError, match="no active user"):
        users.revoke("nobody")
    assert users.lookup("") is None and users.lookup("guess") is None
