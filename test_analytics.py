"""Tests for the analytics ingestion service, over HTTP against PostgreSQL.

Every test talks to a real server process (``python analytics.py``) on a
free port, and that server talks to a real PostgreSQL.  The database comes
from the same DATABASE_* variables the service reads; the tests never touch
its data: they create a scratch database of their own beside it (the role
needs CREATEDB), apply the schema there by starting the service, and drop
it at the end.

Run them with ``python -m pytest -v`` (see README.md).
"""

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest
import requests

HERE = Path(__file__).resolve().parent
SERVICE = HERE / "analytics.py"

#: The origin the shared test server allows, as docker-compose.yml does.
ALLOWED_ORIGIN = "http://localhost:5173"

#: How long a server gets to start before a test gives up on it.
START_TIMEOUT_SECONDS = 20


# --- Database and server fixtures --------------------------------------------

def database_params(dbname=None):
    """Return psycopg2.connect arguments from the DATABASE_* variables."""
    return {
        "host": os.environ.get("DATABASE_HOST", "localhost"),
        "port": int(os.environ.get("DATABASE_PORT", "5432")),
        "user": os.environ.get("DATABASE_USER", "analytics"),
        "password": os.environ.get("DATABASE_PASSWORD", ""),
        "dbname": dbname or os.environ.get("DATABASE_NAME", "analytics"),
        "connect_timeout": 5,
    }


def free_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running ``python analytics.py`` process and what it logged."""

    def __init__(self, env, log_path):
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVICE)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self):
        """Return everything the server has logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout=START_TIMEOUT_SECONDS):
        """Wait until the server accepts connections; fail if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def stop(self, timeout=15):
        """Send SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(tmp_dir, dbname, wait=True, **overrides):
    """Start the service against dbname; overrides set its environment.

    Returns a Server, ready unless wait is false.  The caller stops it.
    """
    params = database_params(dbname)
    env = dict(os.environ)
    env.update({
        "DATABASE_HOST": params["host"],
        "DATABASE_PORT": str(params["port"]),
        "DATABASE_USER": params["user"],
        "DATABASE_PASSWORD": params["password"],
        "DATABASE_NAME": dbname,
        "CORS_ALLOW_ORIGINS": ALLOWED_ORIGIN,
        "PORT": str(free_port()),
        "THREADS": "8",
        "DATABASE_WAIT_SECONDS": "10",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({name: str(value) for name, value in overrides.items()})
    log_path = Path(tmp_dir) / f"server-{env['PORT']}.log"
    server = Server(env, log_path)
    return server.wait_ready() if wait else server


@pytest.fixture(scope="session")
def test_database():
    """Create a scratch database beside the configured one; drop it after."""
    name = f"analytics_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(**database_params())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def server(test_database, tmp_path_factory):
    """The shared service, with the schema applied to the scratch database."""
    running = start_server(tmp_path_factory.mktemp("server"), test_database)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def db(test_database, server):
    """An autocommit connection to the scratch database, for assertions."""
    conn = psycopg2.connect(**database_params(test_database))
    conn.autocommit = True
    yield conn
    with conn.cursor() as cursor:
        cursor.execute("TRUNCATE engagement_events")
    conn.close()


@pytest.fixture
def api(server, db):
    """The shared server's base URL, with an empty table and no leaks.

    After the test, every pooled connection must be back in the pool.
    """
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE engagement_events")
    yield server.url
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert health["pool"]["in_use"] == 0, health


def query(db, sql, *params):
    """Run sql on the scratch database and return all rows."""
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def stored_count(db):
    """Return how many events are stored."""
    return query(db, "SELECT count(*) FROM engagement_events")[0][0]


def batch(*events, site="press-docs", session_id=None, reason="interval"):
    """Return a provider-shaped batch (a fresh session by default)."""
    body = {
        "site": site,
        "session_id": session_id or str(uuid.uuid4()),
        "events": list(events),
    }
    if reason is not None:
        body["reason"] = reason
    return body


def event(event_type="view", target="hero", **fields):
    """Return one provider-shaped event stamped now unless `at` is given."""
    fields.setdefault("at", now_iso())
    fields.setdefault("meta", {"ratio": 0.75})
    return {"type": event_type, "target": target, **fields}


def now_iso(offset_seconds=0.0):
    """Return the time now (plus an offset) as Date.toISOString() writes it."""
    moment = time.time() + offset_seconds
    millis = int(round(moment * 1000)) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + (
        f".{millis:03d}Z"
    )


def post_events(url, body, **kwargs):
    """POST a batch as the provider's fetch does and return the answer."""
    return requests.post(f"{url}/events", json=body, timeout=10, **kwargs)


# --- POST /events ------------------------------------------------------------

#: The contract's limits.
BODY_LIMIT = 1024 * 1024
BATCH_LIMIT = 500
META_BYTES_LIMIT = 16 * 1024
META_DEPTH_LIMIT = 32

#: A field given this value is left out of batch_text's batch.
MISSING = object()


def post_body(url, data, headers=None):
    """POST raw bytes to /events with no headers but the given ones."""
    return requests.post(
        f"{url}/events", data=data, headers=headers or {}, timeout=10
    )


def json_bytes(body):
    """Return body as JSON.stringify would send it."""
    return json.dumps(body).encode()


def batch_text(**fields):
    """Return a one-event batch as JSON text, with fields replaced.

    A field set to MISSING is left out.
    """
    body = {**batch(event()), **fields}
    return json.dumps({k: v for k, v in body.items() if v is not MISSING})


def padded(body, size):
    """Return body as JSON bytes padded with spaces to exactly size bytes."""
    data = json_bytes(body)
    return data + b" " * (size - len(data))


def nested(levels, container=dict):
    """Return a meta object `levels` deep (the object itself is level 1)."""
    inner = {} if container is dict else []
    for _ in range(levels - 2):
        inner = {"d": inner} if container is dict else [inner]
    return {"d": inner}


def stored_events(db):
    """Return the stored events as dicts of their columns, in id order."""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT site, session_id, event_type, target, occurred_at,"
            " received_at, meta, reason FROM engagement_events ORDER BY id"
        )
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]


def moment_from_now(**delta):
    """Return now plus delta as an aware time, cut to the millisecond."""
    moment = datetime.now(timezone.utc) + timedelta(**delta)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso_z(moment):
    """Write an aware time as Date.toISOString() does."""
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def peak_memory_kib(pid):
    """Return the peak resident memory of a process in KiB (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def gzip_of_zeros(size):
    """Return a gzip stream that inflates to size zero bytes."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    parts = [packer.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + packer.flush()


def test_post_events_provider_batch_by_fetch(api, db):
    body = batch(event(), event("scroll-depth", "article", meta={"depth": 50}))

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert answer.json() == {
        "inserted": 2, "duplicates": 0, "adjusted": 0, "rejected": []
    }
    assert stored_count(db) == 2


def test_post_events_provider_batch_by_beacon(api, db):
    body = batch(event(), event("view-end", "hero", meta={"ms": 1200}))

    answer = requests.post(
        f"{api}/events",
        data=json.dumps(body),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        timeout=10,
    )

    assert answer.status_code == 201
    assert answer.json()["inserted"] == 2
    assert stored_count(db) == 2


def test_post_events_stores_event_as_sent(api, db):
    moment = moment_from_now(minutes=-5)
    body = batch(
        event("scroll-depth", "article", at=iso_z(moment),
              meta={"depth": 50, "marks": [25, 50], "seen": True}),
        session_id="0b6f0d6e-3c1f-4f6e-9a51-8d1f0c2e7b11",
        reason="visibility",
    )

    post_events(api, body)

    [row] = stored_events(db)
    del row["received_at"]
    assert row == {
        "site": "press-docs",
        "session_id": "0b6f0d6e-3c1f-4f6e-9a51-8d1f0c2e7b11",
        "event_type": "scroll-depth",
        "target": "article",
        "occurred_at": moment,
        "meta": {"depth": 50, "marks": [25, 50], "seen": True},
        "reason": "visibility",
    }


@pytest.mark.parametrize("content_type", [
    "application/json",
    "APPLICATION/JSON",
    "application/json; charset=utf-8",
    "Application/Json;Charset=UTF-8",
    "text/plain",
    "text/plain;charset=UTF-8",
    "TEXT/PLAIN; charset=utf-8",
])
def test_post_events_json_content_type_accepted(api, db, content_type):
    data = json_bytes(batch(event()))

    answer = post_body(api, data, {"Content-Type": content_type})

    assert answer.status_code == 201
    assert stored_count(db) == 1


def test_post_events_without_content_type_accepted(api, db):
    data = json_bytes(batch(event()))

    answer = post_body(api, data)

    assert "Content-Type" not in answer.request.headers
    assert answer.status_code == 201
    assert stored_count(db) == 1


@pytest.mark.parametrize("content_type", [
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/xml",
    "text/html",
    "text/csv",
    "application/octet-stream",
])
def test_post_events_other_content_type_refused(api, db, content_type):
    data = json_bytes(batch(event()))

    answer = post_body(api, data, {"Content-Type": content_type})

    assert answer.status_code == 415
    assert "Content-Type" in answer.json()["error"]
    assert stored_count(db) == 0


@pytest.mark.parametrize("encoding", [
    "br", "deflate", "compress", "zstd", "gzip, br",
])
def test_post_events_other_content_encoding_refused(api, db, encoding):
    data = json_bytes(batch(event()))
    headers = {"Content-Type": "application/json",
               "Content-Encoding": encoding}

    answer = post_body(api, data, headers)

    assert answer.status_code == 415
    assert "Content-Encoding" in answer.json()["error"]
    assert stored_count(db) == 0


def test_post_events_gzip_body_accepted(api, db):
    data = gzip.compress(json_bytes(batch(event(), event("dwell"))))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    answer = post_body(api, data, headers)

    assert answer.status_code == 201
    assert stored_count(db) == 2


@pytest.mark.parametrize("make_data", [
    pytest.param(lambda gz: gz[10:], id="not-gzip"),
    pytest.param(lambda gz: gz[:-12], id="truncated"),
    pytest.param(lambda gz: gz + b"trailing", id="data-after-end"),
    pytest.param(lambda gz: b"", id="empty"),
])
def test_post_events_bad_gzip_refused(api, db, make_data):
    data = make_data(gzip.compress(json_bytes(batch(event()))))
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    answer = post_body(api, data, headers)

    assert answer.status_code == 400
    assert "gzip" in answer.json()["error"]
    assert stored_count(db) == 0


def test_post_events_gzip_bomb_refused_without_inflating(api, db, server):
    data = gzip_of_zeros(128 * 1024 * 1024)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    peak_before = peak_memory_kib(server.proc.pid)

    answer = post_body(api, data, headers)

    assert len(data) < BODY_LIMIT
    assert answer.status_code == 413
    assert str(BODY_LIMIT) in answer.json()["error"]
    assert peak_memory_kib(server.proc.pid) - peak_before < 32 * 1024


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_post_events_body_at_limit_accepted(api, db, encoding):
    data = padded(batch(event()), BODY_LIMIT)
    if encoding == "gzip":
        data = gzip.compress(data)
    headers = {"Content-Type": "application/json",
               "Content-Encoding": encoding}

    answer = post_body(api, data, headers)

    assert answer.status_code == 201
    assert stored_count(db) == 1


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_post_events_body_over_limit_refused(api, db, encoding):
    data = padded(batch(event()), BODY_LIMIT + 1)
    if encoding == "gzip":
        data = gzip.compress(data)
    headers = {"Content-Type": "application/json",
               "Content-Encoding": encoding}

    answer = post_body(api, data, headers)

    assert answer.status_code == 413
    assert str(BODY_LIMIT) in answer.json()["error"]
    assert stored_count(db) == 0


def test_post_events_body_far_over_limit_refused(api, db):
    data = padded(batch(event()), 3 * BODY_LIMIT)

    answer = post_body(api, data, {"Content-Type": "application/json"})

    assert answer.status_code == 413
    assert stored_count(db) == 0


def test_post_events_body_far_over_limit_answer_names_the_limit(api):
    """Ensure waitress's own refusal reads like the service's answers."""
    data = padded(batch(event()), 3 * BODY_LIMIT)

    answer = post_body(api, data, {"Content-Type": "application/json",
                                   "Origin": ALLOWED_ORIGIN})

    assert answer.headers["Content-Type"] == "application/json"
    assert str(BODY_LIMIT) in answer.json()["error"]
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


def test_post_events_full_batch_accepted(api, db):
    events = [event(target=f"t{i}") for i in range(BATCH_LIMIT)]

    answer = post_events(api, batch(*events))

    assert answer.status_code == 201
    assert answer.json()["inserted"] == BATCH_LIMIT
    assert stored_count(db) == BATCH_LIMIT


def test_post_events_batch_over_limit_refused(api, db):
    events = [event(target=f"t{i}") for i in range(BATCH_LIMIT + 1)]

    answer = post_events(api, batch(*events))

    assert answer.status_code == 413
    assert str(BATCH_LIMIT) in answer.json()["error"]
    assert stored_count(db) == 0


@pytest.mark.parametrize("meta", [
    pytest.param({"p": "x" * (META_BYTES_LIMIT - 8)}, id="16-KiB"),
    pytest.param(nested(META_DEPTH_LIMIT), id="32-levels-of-objects"),
    pytest.param(nested(META_DEPTH_LIMIT, list), id="32-levels-of-arrays"),
])
def test_post_events_meta_at_limit_accepted(api, db, meta):
    body = batch(event(meta=meta))

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert answer.json()["rejected"] == []
    assert stored_events(db)[0]["meta"] == meta


@pytest.mark.parametrize("bad_event, pattern", [
    pytest.param("view", r"\bobject\b", id="a-string"),
    pytest.param(42, r"\bobject\b", id="a-number"),
    pytest.param([], r"\bobject\b", id="an-array"),
    pytest.param(None, r"\bobject\b", id="null"),
    pytest.param({"target": "hero"}, r"\btype\b", id="type-missing"),
    pytest.param({"type": " ", "target": "hero"}, r"\btype\b",
                 id="type-blank"),
    pytest.param({"type": 5, "target": "hero"}, r"\btype\b",
                 id="type-a-number"),
    pytest.param({"type": "view"}, r"\btarget\b", id="target-missing"),
    pytest.param({"type": "view", "target": ""}, r"\btarget\b",
                 id="target-blank"),
    pytest.param({"type": "view", "target": {"id": 1}}, r"\btarget\b",
                 id="target-an-object"),
    pytest.param(event(at="yesterday"), r"\bat\b", id="at-not-a-time"),
    pytest.param(event(at="2024-13-45T25:61:00Z"), r"\bat\b",
                 id="at-impossible-date"),
    pytest.param(event(at=""), r"\bat\b", id="at-empty"),
    pytest.param(event(at=1715971402318), r"\bat\b", id="at-a-number"),
    pytest.param(event(at=now_iso().replace("T", "x")), r"\bat\b",
                 id="at-odd-separator"),
    pytest.param(event(at=now_iso()[:10]), r"\bat\b", id="at-date-only"),
    pytest.param(event(at="2026-W49-4T10:00:00Z"), r"\bat\b",
                 id="at-week-date"),
    pytest.param(event(occurred_at="soon", at=MISSING), r"\bat\b",
                 id="occurred_at-not-a-time"),
    pytest.param(event(meta=[1, 2]), r"\bmeta\b", id="meta-an-array"),
    pytest.param(event(meta="ratio=1"), r"\bmeta\b", id="meta-a-string"),
    pytest.param(event(meta={"p": "x" * (META_BYTES_LIMIT - 7)}),
                 str(META_BYTES_LIMIT), id="meta-over-16-KiB"),
    # 12 KiB as sent, but jsonb writes 5e-324 out as 326 characters
    pytest.param(event(meta={"a": [5e-324] * 2000}),
                 str(META_BYTES_LIMIT), id="meta-over-16-KiB-written-out"),
    pytest.param(event(meta=nested(META_DEPTH_LIMIT + 1)),
                 rf"\b{META_DEPTH_LIMIT}\b", id="meta-33-levels-of-objects"),
    pytest.param(event(meta=nested(META_DEPTH_LIMIT + 1, list)),
                 rf"\b{META_DEPTH_LIMIT}\b", id="meta-33-levels-of-arrays"),
    pytest.param(event(id=7), r"\bid\b", id="id-a-number"),
    pytest.param(event(id=""), r"\bid\b", id="id-blank"),
])
def test_post_events_bad_event_rejected(api, db, bad_event, pattern):
    if isinstance(bad_event, dict):
        bad_event = {k: v for k, v in bad_event.items() if v is not MISSING}
    body = batch(event(target="good"), bad_event)

    answer = post_events(api, body)

    assert answer.status_code == 201
    [rejected] = answer.json()["rejected"]
    assert rejected["index"] == 1
    assert re.search(pattern, rejected["error"]), rejected
    assert [row["target"] for row in stored_events(db)] == ["good"]


def test_post_events_partial_batch_answer(api, db):
    body = batch(
        event(target="first"),
        {"type": "view"},
        event(target="third"),
        "not an event",
    )

    answer = post_events(api, body)

    assert answer.status_code == 201
    result = answer.json()
    assert (result["inserted"], result["duplicates"]) == (2, 0)
    assert [r["index"] for r in result["rejected"]] == [1, 3]
    assert all(isinstance(r["error"], str) for r in result["rejected"])
    assert [row["target"] for row in stored_events(db)] == ["first", "third"]


def test_post_events_all_events_bad_refused(api, db):
    body = batch({"type": "view"}, event(at="never"))

    answer = post_events(api, body)

    assert answer.status_code == 422
    result = answer.json()
    assert result["error"]
    assert [r["index"] for r in result["rejected"]] == [0, 1]
    assert stored_count(db) == 0


_NAN_BATCH = batch_text().replace('"ratio": 0.75', '"ratio": NaN')


@pytest.mark.parametrize("text, pattern", [
    pytest.param('{"site": "press-docs",', "JSON", id="not-json"),
    pytest.param("", "JSON", id="empty-body"),
    pytest.param(batch_text() + " []", "JSON", id="data-after-json"),
    pytest.param(_NAN_BATCH, "JSON", id="NaN"),
    pytest.param(_NAN_BATCH.replace("NaN", "Infinity"), "JSON",
                 id="Infinity"),
    pytest.param(_NAN_BATCH.replace("NaN", "-Infinity"), "JSON",
                 id="minus-Infinity"),
    pytest.param(_NAN_BATCH.replace("NaN", "1e999"), "JSON",
                 id="number-overflows-a-double"),
    pytest.param(_NAN_BATCH.replace("NaN", "1" + "0" * 400), "JSON",
                 id="huge-integer"),
    pytest.param(f"[{batch_text()}]", r"\bobject\b", id="an-array"),
    pytest.param('"press-docs"', r"\bobject\b", id="a-string"),
    pytest.param("42", r"\bobject\b", id="a-number"),
    pytest.param("null", r"\bobject\b", id="null"),
    pytest.param(batch_text(site=MISSING), r"\bsite\b", id="site-missing"),
    pytest.param(batch_text(site=None), r"\bsite\b", id="site-null"),
    pytest.param(batch_text(site=7), r"\bsite\b", id="site-a-number"),
    pytest.param(batch_text(site=""), r"\bsite\b", id="site-blank"),
    pytest.param(batch_text(site=["a"]), r"\bsite\b", id="site-an-array"),
    pytest.param(batch_text(session_id=MISSING), r"\bsession_id\b",
                 id="session_id-missing"),
    pytest.param(batch_text(session_id=None), r"\bsession_id\b",
                 id="session_id-null"),
    pytest.param(batch_text(session_id=12345), r"\bsession_id\b",
                 id="session_id-a-number"),
    pytest.param(batch_text(session_id="  "), r"\bsession_id\b",
                 id="session_id-blank"),
    pytest.param(batch_text(session_id={}), r"\bsession_id\b",
                 id="session_id-an-object"),
    pytest.param(batch_text(events=MISSING), r"\bevents\b",
                 id="events-missing"),
    pytest.param(batch_text(events=None), r"\bevents\b", id="events-null"),
    pytest.param(batch_text(events={"0": event()}), r"\bevents\b",
                 id="events-an-object"),
    pytest.param(batch_text(events="view"), r"\bevents\b",
                 id="events-a-string"),
    pytest.param(batch_text(events=[]), r"\bevents\b", id="events-empty"),
])
def test_post_events_unusable_batch_refused(api, db, text, pattern):
    data = text.encode()

    answer = post_body(api, data, {"Content-Type": "application/json"})

    assert answer.status_code == 400
    assert answer.headers["Content-Type"] == "application/json"
    assert re.search(pattern, answer.json()["error"]), answer.json()
    assert stored_count(db) == 0


@pytest.mark.parametrize("event_type", [
    "view", "view-end", "scroll-depth", "dwell", "interaction",
    "video: 50% played",
])
def test_post_events_any_event_type_accepted(api, db, event_type):
    answer = post_events(api, batch(event(event_type)))

    assert answer.status_code == 201
    assert stored_events(db)[0]["event_type"] == event_type


def test_post_events_event_type_alias_accepted(api, db):
    body = batch({"event_type": "dwell", "target": "article"})

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert stored_events(db)[0]["event_type"] == "dwell"


def test_post_events_occurred_at_alias_accepted(api, db):
    moment = moment_from_now(hours=-2)
    body = batch({"type": "view", "target": "hero",
                  "occurred_at": iso_z(moment)})

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert stored_events(db)[0]["occurred_at"] == moment


def test_post_events_non_uuid_session_id_accepted(api, db):
    body = batch(event(), session_id="18c1f0a2b3c-9f8e7d6c5b4a")

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert stored_events(db)[0]["session_id"] == "18c1f0a2b3c-9f8e7d6c5b4a"


def test_post_events_reason_stored_with_each_event(api, db):
    body = batch(event(), event("dwell"), reason="unload")

    post_events(api, body)

    assert [row["reason"] for row in stored_events(db)] == ["unload"] * 2


def test_post_events_without_reason_accepted(api, db):
    body = batch(event(), reason=None)

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert stored_events(db)[0]["reason"] is None


def test_post_events_duplicate_within_batch_counted(api, db):
    same = event()

    answer = post_events(api, batch(same, dict(same)))

    assert answer.json()["inserted"] == 1
    assert answer.json()["duplicates"] == 1
    assert stored_count(db) == 1


def test_post_events_duplicate_client_id_within_batch_counted(api, db):
    at = now_iso()
    body = batch(event(target="a", id="e-1", at=at),
                 event(target="b", id="e-1", at=at))

    answer = post_events(api, body)

    assert answer.json()["inserted"] == 1
    assert answer.json()["duplicates"] == 1
    assert stored_count(db) == 1


def test_post_events_resent_batch_all_duplicates(api, db):
    body = batch(event(), event("dwell", "article"), event(id="e-1"))
    post_events(api, body)

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert answer.json() == {
        "inserted": 0, "duplicates": 3, "adjusted": 0, "rejected": []
    }
    assert stored_count(db) == 3


def test_post_events_client_id_duplicate_across_batches(api, db):
    at = now_iso()
    post_events(api, batch(event(target="a", id="e-1", at=at)))

    answer = post_events(api, batch(event(target="b", id="e-1", at=at)))

    assert answer.json()["duplicates"] == 1
    assert stored_count(db) == 1


def test_post_events_client_id_scoped_to_site(api, db):
    at = now_iso()
    post_events(api, batch(event(id="e-1", at=at), site="one"))

    answer = post_events(api, batch(event(id="e-1", at=at), site="two"))

    assert answer.json()["inserted"] == 1
    assert stored_count(db) == 2


def test_post_events_same_event_other_session_stored(api, db):
    same = event()
    post_events(api, batch(same))

    answer = post_events(api, batch(same))

    assert answer.json()["inserted"] == 1
    assert stored_count(db) == 2


def test_post_events_meta_key_order_not_part_of_identity(api, db):
    at = now_iso()
    first = batch(event(at=at, meta={"a": 1, "b": 2}))
    again = {**first, "events": [event(at=at, meta={"b": 2, "a": 1})]}
    post_events(api, first)

    answer = post_events(api, again)

    assert answer.json()["duplicates"] == 1
    assert stored_count(db) == 1


def test_post_events_resent_event_without_at_stored_again(api, db):
    body = batch({"type": "view", "target": "hero"})
    post_events(api, body)

    answer = post_events(api, body)

    assert answer.json()["inserted"] == 1
    assert stored_count(db) == 2


@pytest.mark.parametrize("offset", [
    timedelta(0), timedelta(hours=2), timedelta(hours=-5, minutes=-30),
    timedelta(hours=14), timedelta(hours=20), timedelta(hours=-23,
                                                        minutes=-59),
])
def test_post_events_at_offset_honoured(api, db, offset):
    moment = moment_from_now(hours=-3)
    text = moment.astimezone(timezone(offset)).isoformat(
        timespec="milliseconds")

    post_events(api, batch(event(at=text)))

    assert stored_events(db)[0]["occurred_at"] == moment


def test_post_events_at_z_honoured(api, db):
    moment = moment_from_now(hours=-3)

    post_events(api, batch(event(at=iso_z(moment))))

    assert stored_events(db)[0]["occurred_at"] == moment


def test_post_events_at_lower_case_z_honoured(api, db):
    moment = moment_from_now(hours=-3)

    post_events(api, batch(event(at=iso_z(moment).replace("Z", "z"))))

    assert stored_events(db)[0]["occurred_at"] == moment


def test_post_events_meta_exponent_numbers_within_limit_kept(api, db):
    meta = {"small": 1.5e-7, "large": -2.25e+21, "list": [1e-300] * 40}

    answer = post_events(api, batch(event(meta=meta)))

    assert answer.json()["inserted"] == 1
    assert stored_events(db)[0]["meta"] == meta


def test_post_events_at_without_offset_is_utc(api, db):
    moment = moment_from_now(hours=-3)
    text = moment.replace(tzinfo=None).isoformat(timespec="milliseconds")

    post_events(api, batch(event(at=text)))

    assert stored_events(db)[0]["occurred_at"] == moment


def test_post_events_without_at_is_receipt_time(api, db):
    before = datetime.now(timezone.utc)

    post_events(api, batch({"type": "view", "target": "hero"}))

    [row] = stored_events(db)
    assert row["occurred_at"] == row["received_at"]
    assert before <= row["received_at"] <= datetime.now(timezone.utc)


@pytest.mark.parametrize("at", [
    pytest.param(timedelta(days=1, minutes=5), id="over-a-day-ahead"),
    pytest.param(timedelta(days=-365, minutes=-5), id="over-a-year-behind"),
    pytest.param("1970-01-01T00:00:00.000Z", id="1970"),
    pytest.param("9999-12-31T23:59:59.999Z", id="year-9999"),
    pytest.param("0001-01-01T00:30:00+01:00", id="before-year-1-in-utc"),
])
def test_post_events_skewed_clock_adjusted(api, db, at):
    if isinstance(at, timedelta):
        at = iso_z(datetime.now(timezone.utc) + at)

    answer = post_events(api, batch(event(at=at)))

    assert answer.status_code == 201
    assert answer.json() == {
        "inserted": 1, "duplicates": 0, "adjusted": 1, "rejected": []
    }
    [row] = stored_events(db)
    assert row["occurred_at"] == row["received_at"]


@pytest.mark.parametrize("delta", [
    pytest.param(timedelta(hours=23), id="23-hours-ahead"),
    pytest.param(timedelta(days=-364), id="364-days-behind"),
])
def test_post_events_clock_inside_window_kept(api, db, delta):
    moment = moment_from_now() + delta

    answer = post_events(api, batch(event(at=iso_z(moment))))

    assert answer.json()["adjusted"] == 0
    assert stored_events(db)[0]["occurred_at"] == moment


@pytest.mark.parametrize("char", ["\x00", "\ud800", "\udfff"])
@pytest.mark.parametrize("make_body, stored", [
    pytest.param(lambda text: batch(event(), site=text),
                 lambda row: row["site"], id="site"),
    pytest.param(lambda text: batch(event(), session_id=text),
                 lambda row: row["session_id"], id="session_id"),
    pytest.param(lambda text: batch(event(), reason=text),
                 lambda row: row["reason"], id="reason"),
    pytest.param(lambda text: batch(event(text)),
                 lambda row: row["event_type"], id="type"),
    pytest.param(lambda text: batch(event(target=text)),
                 lambda row: row["target"], id="target"),
    pytest.param(lambda text: batch(event(meta={"k": [text]})),
                 lambda row: row["meta"]["k"][0], id="meta-value"),
    pytest.param(lambda text: batch(event(meta={text: 1})),
                 lambda row: next(iter(row["meta"])), id="meta-key"),
])
def test_post_events_unstorable_text_replaced(
        api, db, make_body, stored, char):
    data = json_bytes(make_body(f"a{char}b"))

    answer = post_body(api, data, {"Content-Type": "application/json"})

    assert answer.status_code == 201
    assert stored(stored_events(db)[0]) == "a\ufffdb"


def test_post_events_surrogate_pair_kept(api, db):
    data = json_bytes(batch(event(target="smile \U0001F600")))

    post_body(api, data, {"Content-Type": "application/json"})

    assert stored_events(db)[0]["target"] == "smile \U0001F600"


def test_post_events_invalid_utf8_replaced(api, db):
    data = json_bytes(batch(event(target="caf\u00e9"))).replace(
        b"\\u00e9", b"\xe9")

    answer = post_body(api, data, {"Content-Type": "application/json"})

    assert answer.status_code == 201
    assert stored_events(db)[0]["target"] == "caf\ufffd"


def test_post_events_64_concurrent_batches_all_stored(api, db):
    bodies = [batch(*(event(target=f"t{i}") for i in range(5)))
              for _ in range(64)]

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda body: post_events(api, body), bodies))

    assert [answer.status_code for answer in answers] == [201] * 64
    acknowledged = sum(answer.json()["inserted"] for answer in answers)
    assert acknowledged == stored_count(db) == 64 * 5


# --- GET /events/recent ------------------------------------------------------

#: What the live console reads of each listed event.
CONSOLE_FIELDS = {
    "id", "site", "session_id", "event_type", "target", "occurred_at",
    "received_at", "meta", "reason", "client_id",
}

#: An ISO 8601 time that carries its offset.
EXPLICIT_OFFSET = re.compile(r"T\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def recent(url, **params):
    """GET /events/recent with these query parameters."""
    return requests.get(f"{url}/events/recent", params=params, timeout=10)


def recent_targets(url, **params):
    """Return the targets /events/recent lists, in its order."""
    return [e["target"] for e in recent(url, **params).json()["events"]]


def post_many(url, count):
    """Store count events (targets t0, t1, ...) in full batches."""
    for start in range(0, count, BATCH_LIMIT):
        stop = min(start + BATCH_LIMIT, count)
        events = [event(target=f"t{i}") for i in range(start, stop)]
        assert post_events(url, batch(*events)).status_code == 201


def test_recent_events_newest_received_first(api):
    post_events(api, batch(event(target="a1"), event(target="a2")))
    post_events(api, batch(event(target="b1"), event(target="b2")))

    targets = recent_targets(api)

    assert targets == ["b2", "b1", "a2", "a1"]


def test_recent_events_ordered_by_receipt_not_event_time(api):
    post_events(api, batch(event(target="old", at=now_iso())))
    post_events(api, batch(event(target="late", at=now_iso(-3600))))

    targets = recent_targets(api)

    assert targets == ["late", "old"]


def test_recent_events_empty(api):
    answer = recent(api)

    assert answer.status_code == 200
    assert answer.json() == {"events": []}


def test_recent_events_default_limit_25(api):
    post_many(api, 30)

    targets = recent_targets(api)

    assert targets == [f"t{i}" for i in range(29, 4, -1)]


def test_recent_events_limit_honoured(api):
    post_many(api, 10)

    targets = recent_targets(api, limit=3)

    assert targets == ["t9", "t8", "t7"]


@pytest.mark.parametrize("limit", ["1000", "1001", "99999999999999999999",
                                   "9" * 5000])
def test_recent_events_limit_up_to_1000(api, limit):
    post_many(api, 1001)

    answer = recent(api, limit=limit)

    assert answer.status_code == 200
    assert len(answer.json()["events"]) == 1000


@pytest.mark.parametrize("limit", [
    "0", "-1", "abc", "1.5", "1e3", "", "ten", "+5", " 5", "1_0",
    "\u0665", "\uff15",
])
def test_recent_events_bad_limit_refused(api, limit):
    answer = recent(api, limit=limit)

    assert answer.status_code == 400
    assert re.search(r"\blimit\b", answer.json()["error"])


@pytest.mark.parametrize("params, expected", [
    ({"site": "site-b"}, ["b1"]),
    ({"session_id": "s-1"}, ["a1", "a2"]),
    ({"type": "view"}, ["a1", "b1"]),
    ({"site": "site-a", "type": "view"}, ["a1"]),
    ({"site": "nowhere"}, []),
    ({"site": ""}, ["a1", "a2", "b1"]),
])
def test_recent_events_filtered(api, params, expected):
    post_events(api, batch(event("view", "a1"), event("dwell", "a2"),
                           site="site-a", session_id="s-1"))
    post_events(api, batch(event("view", "b1"),
                           site="site-b", session_id="s-2"))

    targets = recent_targets(api, **params)

    assert sorted(targets) == expected


def test_recent_events_console_fields(api):
    body = batch(event("dwell", "article", meta={"ms": 5000}),
                 session_id="18c1f0a2b3c-9f8e7d6c5b4a", reason="unload")
    post_events(api, body)

    [listed] = recent(api).json()["events"]

    assert set(listed) == CONSOLE_FIELDS
    assert listed["id"] is not None
    assert {k: listed[k] for k in CONSOLE_FIELDS - {
        "id", "occurred_at", "received_at"}} == {
        "site": "press-docs",
        "session_id": "18c1f0a2b3c-9f8e7d6c5b4a",
        "event_type": "dwell",
        "target": "article",
        "meta": {"ms": 5000},
        "reason": "unload",
        "client_id": None,
    }


@pytest.mark.parametrize("field", ["occurred_at", "received_at"])
def test_recent_events_times_have_explicit_offset(api, field):
    post_events(api, batch(event()))

    [listed] = recent(api).json()["events"]

    assert EXPLICIT_OFFSET.search(listed[field]), listed[field]


def test_recent_events_occurred_at_is_the_stored_instant(api, db):
    moment = moment_from_now(minutes=-90)
    post_events(api, batch(event(at=iso_z(moment))))

    [listed] = recent(api).json()["events"]

    assert datetime.fromisoformat(listed["occurred_at"]) == moment


def test_recent_events_meta_is_an_object(api):
    post_events(api, batch(event(meta={"ratio": 0.5, "path": ["a"]})))

    [listed] = recent(api).json()["events"]

    assert listed["meta"] == {"ratio": 0.5, "path": ["a"]}


# --- GET /health and database outages ----------------------------------------

class DatabaseProxy:
    """A TCP relay to PostgreSQL that a test can break on purpose.

    It relays from the start.  cut() drops the open connections, as a
    database restart does; blackhole() swallows every byte, on open
    connections and new ones, like a host that went away; refuse() cuts
    and closes the port, like a stopped server.  relay() undoes the last
    two.
    """

    def __init__(self, upstream):
        self.upstream = upstream
        self.answering = True
        self._lock = threading.Lock()
        self._open = []
        self.port = 0
        self._listen()

    def _listen(self):
        self._listener = socket.create_server(("127.0.0.1", self.port),
                                              backlog=64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(
            target=self._accept, args=(self._listener,), daemon=True
        ).start()

    def cut(self):
        """Close every relayed connection."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            _shut(sock)

    def blackhole(self):
        """Swallow what arrives and answer nothing, open or new."""
        self.answering = False

    def refuse(self):
        """Cut, then refuse new connections."""
        _shut(self._listener)
        self.cut()

    def relay(self):
        """Relay again, cutting what lost bytes in a blackhole."""
        if not self.answering:
            self.cut()
        self.answering = True
        if self._listener.fileno() == -1:
            self._listen()

    def close(self):
        """Stop listening and close everything."""
        self.refuse()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refuse() closed the listener
            with self._lock:
                self._open.append(client)
            if self.answering:
                threading.Thread(
                    target=self._connect, args=(client,), daemon=True
                ).start()

    def _connect(self, client):
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _shut(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.append(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(source, sink), daemon=True
            ).start()

    def _pump(self, source, sink):
        # Copy one direction until either side closes, then close both.
        try:
            while data := source.recv(65536):
                if self.answering:
                    sink.sendall(data)
        except OSError:
            pass
        _shut(source)
        _shut(sink)


def _shut(sock):
    # shutdown() wakes a thread blocked in recv() or accept(); close alone
    # does not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture(scope="module")
def proxied_server(test_database, tmp_path_factory):
    """A server of its own, reaching PostgreSQL through a DatabaseProxy."""
    params = database_params()
    proxy = DatabaseProxy((params["host"], params["port"]))
    try:
        running = start_server(tmp_path_factory.mktemp("proxied"),
                               test_database, DATABASE_HOST="127.0.0.1",
                               DATABASE_PORT=proxy.port)
        yield running, proxy
        running.stop()
    finally:
        proxy.close()


@pytest.fixture
def proxied(proxied_server):
    """The proxied server, its database reachable and answering."""
    server, proxy = proxied_server
    proxy.relay()
    assert health(server.url).status_code == 200
    yield server, proxy
    proxy.relay()


def health(url):
    """GET /health."""
    return requests.get(f"{url}/health", timeout=10)


def timed(call, *args, **kwargs):
    """Return call's result and how many seconds it took."""
    started = time.monotonic()
    result = call(*args, **kwargs)
    return result, time.monotonic() - started


def test_health_ok(api):
    answer = health(api)

    assert answer.status_code == 200
    assert answer.json()["status"] == "ok"


def test_health_reports_timescaledb(api, db):
    installed = query(
        db, "SELECT extversion FROM pg_extension WHERE extname = %s",
        "timescaledb",
    )

    result = health(api).json()

    assert result["timescaledb"] is bool(installed)
    assert result["timescaledb_version"] == (
        installed[0][0] if installed else None)


@pytest.mark.parametrize("outage", [
    pytest.param(lambda proxy: proxy.blackhole(), id="host-gone"),
    pytest.param(lambda proxy: (proxy.cut(), proxy.blackhole()),
                 id="host-gone-no-pooled-connection"),
    pytest.param(lambda proxy: proxy.refuse(), id="server-stopped"),
])
def test_health_database_unreachable_503_within_3_seconds(proxied, outage):
    server, proxy = proxied
    outage(proxy)

    answer, seconds = timed(health, server.url)

    assert answer.status_code == 503
    assert answer.headers["Retry-After"].isdigit()
    assert seconds < 3


def test_health_database_unreachable_answer_says_no_more(proxied):
    server, proxy = proxied
    proxy.refuse()

    answer = health(server.url)

    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["status"] != "ok"
    assert len(answer.json()["error"]) < 100
    for secret in ("Traceback", "psycopg2", "could not", str(proxy.port),
                   database_params()["user"]):
        assert secret not in answer.text


@pytest.mark.parametrize("method, path", [
    ("POST", "/events"), ("GET", "/events/recent"),
])
def test_database_unreachable_503_with_retry_after(
        proxied, db, method, path):
    server, proxy = proxied
    body = batch(event(), session_id="outage-" + uuid.uuid4().hex)
    proxy.refuse()

    answer, seconds = timed(requests.request, method, server.url + path,
                            json=body, timeout=10)

    assert answer.status_code == 503
    assert answer.headers["Retry-After"].isdigit()
    assert "error" in answer.json()
    assert seconds < 5
    assert not query(db, "SELECT 1 FROM engagement_events"
                     " WHERE session_id = %s", body["session_id"])


def test_health_recovers_after_outage(proxied):
    server, proxy = proxied
    proxy.blackhole()
    assert health(server.url).status_code == 503

    proxy.relay()

    assert health(server.url).status_code == 200


def test_health_recovers_after_database_restart(proxied):
    server, proxy = proxied
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(health, [server.url] * 8))
    proxy.cut()

    statuses = [health(server.url).status_code for _ in range(4)]

    assert statuses == [200] * 4


def test_post_events_recovers_after_database_restart(proxied, db):
    server, proxy = proxied
    proxy.cut()

    answer = post_events(server.url, batch(event()))

    assert answer.status_code == 201


def test_cors_allowed_origin_on_503(proxied):
    server, proxy = proxied
    proxy.refuse()

    answer = send(server.url, "GET", "/health", None, Origin=ALLOWED_ORIGIN)

    assert answer.status_code == 503
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


def test_post_events_locked_table_503_quickly(api, test_database):
    """Ensure a table someone holds locked gives quick 503s and leaves
    /health answering, not threads stuck for the statement timeout."""
    holder = psycopg2.connect(**database_params(test_database))
    with holder.cursor() as cursor:
        cursor.execute("LOCK engagement_events IN ACCESS EXCLUSIVE MODE")
    try:
        with ThreadPoolExecutor(16) as pool:
            posts = [pool.submit(post_events, api, batch(event()))
                     for _ in range(16)]
            started = time.monotonic()
            health = requests.get(f"{api}/health", timeout=10)
            health_seconds = time.monotonic() - started
            answers = [post.result() for post in posts]
    finally:
        holder.rollback()
        holder.close()

    assert {answer.status_code for answer in answers} == {503}
    assert all("Retry-After" in answer.headers for answer in answers)
    assert health.status_code == 200
    assert health_seconds < 3


def test_post_events_refused_grant_503_then_recovers(api, db):
    execute(db, "REVOKE INSERT ON engagement_events FROM CURRENT_USER")
    try:
        refused = post_events(api, batch(event()))
    finally:
        execute(db, "GRANT INSERT ON engagement_events TO CURRENT_USER")

    accepted = post_events(api, batch(event()))

    assert refused.status_code == 503
    assert "Retry-After" in refused.headers
    assert accepted.status_code == 201


# --- GET /config and start-up log --------------------------------------------

@pytest.fixture(scope="module")
def secret_server(test_database, tmp_path_factory):
    """A server of its own, and the database password it was given.

    Where the database lets any password through (trust), the password is
    made up, so that it cannot appear anywhere by chance; elsewhere it is
    the configured one.
    """
    password = f"pw-{uuid.uuid4().hex}"
    try:
        psycopg2.connect(**{**database_params(), "password": password}).close()
    except psycopg2.OperationalError:
        password = database_params()["password"]
    running = start_server(tmp_path_factory.mktemp("secret"), test_database,
                           DATABASE_PASSWORD=password)
    yield running, password
    running.stop()


def test_config_names_the_database(api, test_database):
    params = database_params()

    answer = requests.get(f"{api}/config", timeout=10)

    assert answer.status_code == 200
    assert answer.json()["database"] == {
        "host": params["host"], "port": params["port"], "name": test_database,
    }


def test_config_holds_no_credentials(secret_server, test_database):
    server, password = secret_server
    user = database_params()["user"]

    answer = requests.get(f"{server.url}/config", timeout=10)

    text = answer.text.replace(json.dumps(test_database), '""')
    assert not re.search(r'"(user|username|password)"', text), text
    assert password not in text
    assert user not in text


def test_startup_log_says_where_it_listens(server):
    log = server.log()

    assert re.search(rf"listening on \S+:{server.port}\b", log), log


def test_startup_log_names_the_database(server, test_database):
    params = database_params()

    lines = [line for line in server.log().splitlines()
             if test_database in line]

    assert any(params["host"] in line and str(params["port"]) in line
               for line in lines), lines


def test_startup_log_never_shows_the_password(secret_server, test_database):
    server, password = secret_server
    if password in (database_params()["user"], test_database):
        pytest.skip("the database checks passwords and the configured "
                    "password is also the user's name")

    log = server.log()

    assert "listening" in log
    assert password not in log


def test_startup_log_says_plain_table_or_hypertable(server, db):
    hypertable = query(
        db, "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")

    log = server.log()

    assert ("hypertable" if hypertable else "plain table") in log


@pytest.mark.parametrize("name, value", [
    ("THREADS", "0"),
    ("PORT", "70000"),
    ("DATABASE_PORT", "abc"),
    ("DATABASE_WAIT_SECONDS", "nan"),
])
def test_startup_bad_setting_exits_naming_it(test_database, tmp_path,
                                             name, value):
    server = start_server(tmp_path, test_database, wait=False,
                          **{name: value})

    code = server.proc.wait(START_TIMEOUT_SECONDS)
    server.stop()

    assert code == 2
    assert f"{name} must be a number" in server.log()
    assert "Traceback" not in server.log()


def test_startup_port_in_use_exits_with_one_line(server, test_database,
                                                 tmp_path):
    other = start_server(tmp_path, test_database, wait=False,
                         PORT=server.port)

    code = other.proc.wait(START_TIMEOUT_SECONDS)
    other.stop()

    errors = [line for line in other.log().splitlines() if "ERROR" in line]
    assert code == 1
    assert len(errors) == 1 and f"port {server.port}" in errors[0]
    assert "Traceback" not in other.log()


# --- CORS --------------------------------------------------------------------

#: Requests that succeed on the shared server: (method, path, JSON body).
SUCCESSES = [
    ("GET", "/health", None),
    ("GET", "/config", None),
    ("GET", "/events/recent", None),
    ("POST", "/events", batch(event())),
]

#: Requests the shared server refuses, with the status each gets.
REFUSALS = [
    pytest.param("POST", "/events", "{", 400, id="400-bad-json"),
    pytest.param("GET", "/events/recent?limit=0", None, 400,
                 id="400-bad-limit"),
    pytest.param("GET", "/nowhere", None, 404, id="404"),
    pytest.param("DELETE", "/events", None, 405, id="405"),
    pytest.param("POST", "/events",
                 batch(*[event(target=f"t{i}") for i in range(501)]), 413,
                 id="413"),
    pytest.param("POST", "/events", batch({"type": "view"}), 422, id="422"),
]


def send(url, method, path, body, **headers):
    """Send a request: a JSON body, raw text (str) or none."""
    if isinstance(body, str):
        return requests.request(method, url + path, data=body.encode(),
                                headers=headers, timeout=10)
    return requests.request(method, url + path, json=body, headers=headers,
                            timeout=10)


def preflight(url, path, origin, method="POST"):
    """Send the preflight a browser sends before a credentialed fetch."""
    return requests.options(url + path, timeout=10, headers={
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type",
    })


def cors_headers(answer):
    """Return the Access-Control-Allow-* headers of an answer."""
    return {name: value for name, value in answer.headers.items()
            if name.lower().startswith("access-control-allow")}


@pytest.fixture(scope="module")
def cors_server(test_database, tmp_path_factory):
    """Return a server for a CORS_ALLOW_ORIGINS value, started once."""
    started = {}

    def server_for(origins):
        if origins not in started:
            started[origins] = start_server(
                tmp_path_factory.mktemp("cors"), test_database,
                CORS_ALLOW_ORIGINS=origins,
            )
        return started[origins]

    yield server_for
    for running in started.values():
        running.stop()


@pytest.mark.parametrize("method, path, body", SUCCESSES)
def test_cors_allowed_origin_on_success(api, method, path, body):
    answer = send(api, method, path, body, Origin=ALLOWED_ORIGIN)

    assert answer.status_code in (200, 201)
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in answer.headers["Vary"]


@pytest.mark.parametrize("method, path, body, status", REFUSALS)
def test_cors_allowed_origin_on_errors(api, method, path, body, status):
    answer = send(api, method, path, body, Origin=ALLOWED_ORIGIN)

    assert answer.status_code == status
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in answer.headers["Vary"]


@pytest.mark.parametrize("path, method", [
    ("/events", "POST"),
    ("/events/recent", "GET"),
    ("/health", "GET"),
    ("/config", "GET"),
])
def test_cors_preflight_answered(api, path, method):
    answer = preflight(api, path, ALLOWED_ORIGIN, method)

    assert answer.status_code == 204
    assert answer.content == b""
    assert method in answer.headers["Access-Control-Allow-Methods"]
    allowed = answer.headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed
    assert int(answer.headers["Access-Control-Max-Age"]) > 0
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_preflight_needs_no_database(proxied):
    server, proxy = proxied
    proxy.refuse()

    answer = preflight(server.url, "/events", ALLOWED_ORIGIN)

    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


@pytest.mark.parametrize("origin", [
    "http://evil.test",
    "http://localhost:5173.evil.test",
    "https://localhost:5173",
    "http://localhost:5174",
    "null",
])
@pytest.mark.parametrize("ask", [
    pytest.param(lambda url, origin: send(
        url, "GET", "/events/recent", None, Origin=origin), id="get"),
    pytest.param(lambda url, origin: send(
        url, "POST", "/events", batch(event()), Origin=origin), id="post"),
    pytest.param(lambda url, origin: preflight(url, "/events", origin),
                 id="preflight"),
])
def test_cors_other_origin_gets_no_cors_headers(api, ask, origin):
    answer = ask(api, origin)

    assert answer.status_code < 300
    assert cors_headers(answer) == {}


def test_cors_null_origin_allowed_when_listed(cors_server):
    url = cors_server("null").url

    answer = send(url, "GET", "/config", None, Origin="null")

    assert answer.headers["Access-Control-Allow-Origin"] == "null"
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize("origin", ["http://a.test", "http://b.test"])
def test_cors_origin_list_ignores_spaces_and_trailing_slash(
        cors_server, origin):
    url = cors_server(" http://a.test/ , http://b.test").url

    answer = send(url, "GET", "/config", None, Origin=origin)

    assert answer.headers["Access-Control-Allow-Origin"] == origin
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"


def test_cors_origin_list_refuses_others(cors_server):
    url = cors_server(" http://a.test/ , http://b.test").url

    answer = send(url, "GET", "/config", None, Origin="http://c.test")

    assert cors_headers(answer) == {}


@pytest.mark.parametrize("origin", ["http://any.test", "null"])
def test_cors_star_allows_any_origin_without_credentials(
        cors_server, origin):
    url = cors_server("*").url

    answer = send(url, "GET", "/config", None, Origin=origin)

    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers


def test_cors_star_preflight_answered_without_credentials(cors_server):
    url = cors_server("*").url

    answer = preflight(url, "/events", "http://any.test")

    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in answer.headers


def test_cors_no_origin_works_as_usual(api, db):
    answer = post_events(api, batch(event()))

    assert answer.status_code == 201
    assert cors_headers(answer) == {}


# --- Routing, answers and the access log -------------------------------------

@pytest.mark.parametrize("path", [
    "/", "/nowhere", "/events/", "/events/recent/1", "/EVENTS", "/health/x",
])
def test_unknown_path_404(api, path):
    answer = requests.get(api + path, timeout=10)

    assert answer.status_code == 404
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["error"]


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/events", "POST"),
    ("PUT", "/events", "POST"),
    ("DELETE", "/events/recent", "GET"),
    ("POST", "/events/recent", "GET"),
    ("POST", "/health", "GET"),
    ("PATCH", "/config", "GET"),
])
def test_wrong_method_405_with_allow(api, method, path, allowed):
    answer = requests.request(method, api + path, timeout=10)

    assert answer.status_code == 405
    assert allowed in answer.headers["Allow"].split(", ")
    assert answer.json()["error"]


@pytest.mark.parametrize("method, path, body", SUCCESSES + [
    pytest.param(*refusal.values[:3], id=refusal.id) for refusal in REFUSALS
] + [
    pytest.param("POST", "/events", "[" * 100_000, id="400-deep-json"),
])
def test_every_answer_is_json_without_traceback(api, method, path, body):
    answer = send(api, method, path, body)

    assert answer.headers["Content-Type"] == "application/json"
    assert isinstance(answer.json(), dict)
    assert "Traceback" not in answer.text


def raw_exchange(port, data):
    """Send raw bytes on a new connection; return all it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"X\r\n\r\n", id="no-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
                 id="space-in-header-name"),
    pytest.param(b"POST /events HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                 id="unsupported-transfer-encoding"),
])
def test_malformed_request_answered_400_and_closed(server, request_bytes):
    answer = raw_exchange(server.port, request_bytes)

    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head)
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"]


def test_malformed_requests_leave_no_connection_behind(server):
    """Ensure refused requests free their connection (waitress keeps at
    most CONNECTION_LIMIT; leaked ones would starve everyone)."""
    for _ in range(150):
        raw_exchange(server.port, b"X\r\n\r\n")

    answer = requests.get(f"{server.url}/health", timeout=5)

    assert answer.status_code == 200
    assert "Traceback" not in server.log()


def test_access_log_one_line_per_request(api, server):
    before = len(server.log())

    post_events(api, batch(event(), event("dwell"), {"type": "view"}))

    lines = server.log()[before:].splitlines()
    assert len(lines) == 1, lines
    assert re.search(
        r"POST /events 201 \d+(\.\d+)?ms stored=2 rejected=1", lines[0])


def test_access_log_line_for_refused_request(api, server):
    before = len(server.log())

    requests.get(f"{api}/nowhere", timeout=10)

    lines = server.log()[before:].splitlines()
    assert len(lines) == 1, lines
    assert re.search(r"GET /nowhere 404 \d+(\.\d+)?ms", lines[0])


# --- Storage and schema ------------------------------------------------------

def execute(conn, sql, *params):
    """Run a statement that returns no rows."""
    with conn.cursor() as cursor:
        cursor.execute(sql, params)


@pytest.fixture
def fresh_database():
    """Create an empty scratch database for one test; drop it after."""
    name = f"analytics_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(**database_params())
    admin.autocommit = True
    execute(admin, f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def failing_insert(db):
    """Make the database fail any insert of an event whose target is boom."""
    execute(db, """
        CREATE FUNCTION test_refuse_boom() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.target = 'boom' THEN
                RAISE EXCEPTION 'boom';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse_boom BEFORE INSERT ON engagement_events
            FOR EACH ROW EXECUTE FUNCTION test_refuse_boom();
    """)
    yield
    execute(db, "DROP TRIGGER test_refuse_boom ON engagement_events;"
                " DROP FUNCTION test_refuse_boom()")


def test_post_events_failed_insert_stores_nothing(api, db, failing_insert):
    body = batch(event(target="first"), event(target="boom"),
                 event(target="third"))

    answer = post_events(api, body)

    assert answer.status_code == 503
    assert "Retry-After" in answer.headers
    assert answer.headers["Content-Type"] == "application/json"
    assert "Traceback" not in answer.text
    assert stored_count(db) == 0


@pytest.mark.parametrize("statement", [
    "UPDATE engagement_events SET target = 'changed'",
    "DELETE FROM engagement_events",
])
def test_schema_refuses_changing_stored_events(api, db, statement):
    post_events(api, batch(event(target="kept")))

    with pytest.raises(psycopg2.Error):
        execute(db, statement)

    assert [row["target"] for row in stored_events(db)] == ["kept"]


def test_schema_allows_truncate(api, db):
    post_events(api, batch(event()))

    execute(db, "TRUNCATE engagement_events")

    assert stored_count(db) == 0


def test_schema_has_the_contract_columns(db):
    rows = query(db, "SELECT column_name, data_type"
                     " FROM information_schema.columns"
                     " WHERE table_name = 'engagement_events'")

    columns = dict(rows)

    assert columns["meta"] == "jsonb"
    assert columns["occurred_at"] == "timestamp with time zone"
    assert columns["received_at"] == "timestamp with time zone"
    assert {"id", "site", "session_id", "event_type", "target",
            "reason"} <= set(columns)


@pytest.mark.parametrize("columns", [
    "(received_at DESC, id DESC)",
    "(site, occurred_at DESC)",
])
def test_schema_indexes_serve_queries(db, columns):
    rows = query(db, "SELECT indexdef FROM pg_indexes"
                     " WHERE tablename = 'engagement_events'")

    assert any(columns in indexdef for (indexdef,) in rows), rows


def test_schema_unique_index_on_key_and_time(db):
    rows = query(db, "SELECT indexdef FROM pg_indexes"
                     " WHERE tablename = 'engagement_events'")

    assert any(indexdef.startswith("CREATE UNIQUE INDEX")
               and "(event_key, occurred_at)" in indexdef
               for (indexdef,) in rows), rows


def test_schema_reapplied_on_restart_keeps_data(
        api, db, test_database, tmp_path):
    post_events(api, batch(event()))

    second = start_server(tmp_path, test_database)
    try:
        status = health(second.url).status_code
    finally:
        exit_code = second.stop()

    assert (status, exit_code) == (200, 0)
    assert stored_count(db) == 1


def test_schema_several_instances_start_together(fresh_database, tmp_path):
    servers = [start_server(tmp_path, fresh_database, wait=False)
               for _ in range(3)]
    try:
        statuses = [health(s.wait_ready().url).status_code for s in servers]
    finally:
        for running in servers:
            running.stop()

    assert statuses == [200] * 3


def test_schema_hypertable_where_timescaledb_is_available(db):
    available = query(db, "SELECT 1 FROM pg_available_extensions"
                          " WHERE name = 'timescaledb'")
    if not available:
        pytest.skip("TimescaleDB is not installed on this PostgreSQL server")

    rows = query(db, "SELECT column_name"
                     " FROM timescaledb_information.dimensions"
                     " WHERE hypertable_name = 'engagement_events'")

    assert rows == [("occurred_at",)]


# --- Faults and hostile input ------------------------------------------------
# These tests run the service against a PostgreSQL cluster of their own,
# made with initdb in a temporary folder and listening on a free port of
# 127.0.0.1, so that they can stop, kill and restart it without touching
# the shared database.  initdb and postgres refuse to run as root, so as
# root the cluster runs as the postgres user.  Where the binaries or that
# user are missing (inside the compose container, say) these tests skip.

# Imports only this section needs (kept here while the file above is
# being edited; they belong with the others at the top).
import collections  # noqa: E402
import math  # noqa: E402
import pwd  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

#: The cluster's superuser; the service logs in as it (trust auth).
CLUSTER_USER = "analytics"

#: The longest an answer may take while the database is away.
OUTAGE_ANSWER_SECONDS = 7.0

#: From this long after the database accepts connections again, every
#: request must succeed.
RECOVERY_SECONDS = 2.0

#: The restart tests keep the database down at least this long.
OUTAGE_SECONDS = 1.5

#: A service waiting for the database at start-up serves this soon after
#: the database accepts (it tries once a second).
STARTUP_RETRY_SECONDS = 3.0

#: /health must answer within this when the database host is unreachable.
HEALTH_ANSWER_SECONDS = 3.0

#: The service's statement timeout (analytics.STATEMENT_TIMEOUT_MS).
STATEMENT_SECONDS = 5.0

#: Rounds of two services starting together on an empty database.
INSTANCE_ROUNDS = 3

#: How soon after SIGTERM a service whose requests are quick must exit.
SHUTDOWN_SECONDS = 3.0

#: How long the shutdown tests keep batches in flight after SIGTERM.
IN_FLIGHT_SECONDS = 2.0


def find_postgres_bin():
    """Return the folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found:
        folder = Path(found).resolve().parent
        if (folder / "pg_ctl").exists():
            return folder

    def version(folder):
        name = folder.parent.name
        return int(name) if name.isdigit() else 0

    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version)
    for folder in reversed(installed):
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


class PgCluster:
    """A throwaway PostgreSQL cluster driven with pg_ctl."""

    def __init__(self, bin_dir, os_user=None):
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="analytics-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._run_as = []
        if os_user is not None:
            self._run_as = ["runuser", "-u", os_user.pw_name, "--"]
            os.chown(self.root, os_user.pw_uid, os_user.pw_gid)

    def run(self, program, *args, check=True):
        """Run one of the cluster's programs as its owner."""
        command = [*self._run_as, str(self.bin_dir / program), *args]
        done = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{program} {' '.join(args)} exited with {done.returncode}:"
                f"\n{done.stdout}{done.stderr}"
            )
        return done

    def create(self):
        """Make the cluster: trust auth, 127.0.0.1 only, no fsync."""
        self.run(
            "initdb", "-D", str(self.data), "-U", CLUSTER_USER,
            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
        )
        # fsync off is safe for a killed server (the OS keeps its writes);
        # synchronous_commit stays on, so a commit is never lost to a kill.
        settings = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",
            "full_page_writes": "off",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            for name, value in settings.items():
                conf.write(f"{name} = {value}\n")

    def start(self, wait=True):
        """Start the server, by default waiting until it accepts."""
        self.run(
            "pg_ctl", "start", "-D", str(self.data), "-l",
            str(self.log_path), "-w" if wait else "-W", "-t", "60",
        )

    def stop(self, mode="fast"):
        """Stop the server: fast, or immediate (a kill: crash recovery)."""
        self.run("pg_ctl", "stop", "-D", str(self.data), "-m", mode,
                 "-w", "-t", "60")

    def is_running(self):
        """Tell whether the server is running."""
        status = self.run("pg_ctl", "status", "-D", str(self.data),
                          check=False)
        return status.returncode == 0

    def ensure_running(self):
        """Start the server unless it runs."""
        if not self.is_running():
            self.start()

    def connect(self, dbname="postgres"):
        """Return an autocommit connection to dbname."""
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=CLUSTER_USER,
            dbname=dbname, connect_timeout=5,
        )
        conn.autocommit = True
        return conn

    def query(self, dbname, sql, *params):
        """Run sql on dbname over a connection of its own; return rows."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def create_database(self):
        """Create an empty database and return its name."""
        name = f"faults_{uuid.uuid4().hex[:12]}"
        self.query("postgres", f'CREATE DATABASE "{name}"')
        return name

    def wait_accepting(self, timeout=60):
        """Poll until a connection succeeds; return when that attempt began.

        The time is time.monotonic(), taken before the first attempt that
        succeeded, so it is no later than the moment the server accepted.
        """
        deadline = time.monotonic() + timeout
        while True:
            began = time.monotonic()
            try:
                self.connect().close()
                return began
            except psycopg2.OperationalError:
                if began > deadline:
                    raise
            time.sleep(0.02)

    def destroy(self):
        """Kill the server and remove its folder."""
        if self.data.exists():
            self.run("pg_ctl", "stop", "-D", str(self.data), "-m",
                     "immediate", "-w", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster of the tests' own, or a skip saying why not."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("initdb and pg_ctl are not in PATH or "
                    "/usr/lib/postgresql/*/bin")
    os_user = None
    if os.geteuid() == 0:
        try:
            os_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to "
                        "run initdb as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root, and runuser is missing")

    made = PgCluster(bin_dir, os_user)
    try:
        made.create()
        made.start()
        yield made
    finally:
        made.destroy()


@pytest.fixture
def pg_cluster_up(pg_cluster):
    """The test cluster, running when the test starts and after it ends."""
    pg_cluster.ensure_running()
    yield pg_cluster
    pg_cluster.ensure_running()


def start_cluster_server(tmp_dir, cluster, dbname, wait=True,
                         **overrides):
    """Start the service against a database of the test cluster."""
    settings = {
        "DATABASE_HOST": "127.0.0.1",
        "DATABASE_PORT": cluster.port,
        "DATABASE_USER": CLUSTER_USER,
        "DATABASE_PASSWORD": "",
    }
    settings.update(overrides)
    return start_server(tmp_dir, dbname, wait, **settings)


@pytest.fixture(scope="session")
def fault_database(pg_cluster):
    """The database the shared fault-test service uses.

    fault_server applies the schema to it.
    """
    return pg_cluster.create_database()


@pytest.fixture(scope="session")
def fault_server(pg_cluster, fault_database, tmp_path_factory):
    """A service on the test cluster, shared by the fault tests."""
    running = start_cluster_server(
        tmp_path_factory.mktemp("fault-server"), pg_cluster, fault_database
    )
    yield running
    running.stop()


@pytest.fixture
def fault_api(pg_cluster_up, fault_database, fault_server):
    """The shared fault service's URL, with an empty table and no leaks."""
    pg_cluster_up.query(fault_database, "TRUNCATE engagement_events")
    yield fault_server.url
    pg_cluster_up.ensure_running()
    health = settled_health(fault_server.url)
    assert health.get("pool", {}).get("in_use") == 0, health


def settled_health(url, timeout=15):
    """Poll /health until it is 200 with no connection in use; return it.

    Returns the last answer's JSON when that does not happen in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = requests.get(f"{url}/health", timeout=5)
            health = answer.json()
        except (requests.RequestException, ValueError) as e:
            health = {"error": repr(e)}
        else:
            if answer.status_code == 200 and health["pool"]["in_use"] == 0:
                return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def stored_ids(cluster, dbname):
    """Return a Counter of the client ids stored in dbname."""
    rows = cluster.query(dbname, "SELECT client_id FROM engagement_events")
    return collections.Counter(client_id for client_id, in rows)


def poll_until(condition, timeout, message):
    """Wait until condition() is true; fail with message when it is not."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.02)


def timed_get(url, timeout=10):
    """GET url; return (status or None, seconds taken)."""
    started = time.monotonic()
    try:
        status = requests.get(url, timeout=timeout).status_code
    except requests.RequestException:
        status = None
    return status, time.monotonic() - started


# Faults: restart under load.

@dataclass
class LoadAttempt:
    """One batch a load client posted, and what became of it."""

    started: float
    ended: float
    ids: list
    status: object = None
    retry_after: object = None
    answer: dict = field(default_factory=dict)

    @property
    def acknowledged(self):
        return self.status is not None and 200 <= self.status < 300


class PostingClients:
    """Threads that post small batches with fresh client ids until stopped.

    Each thread keeps its connection alive, as a browser does, and pauses
    briefly after an error answer so an outage is not a busy loop.
    """

    def __init__(self, url, count=8, batch_size=5, timeout=15):
        self.url = url
        self.batch_size = batch_size
        self.timeout = timeout
        self.attempts = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._post_until_stopped, daemon=True)
            for _ in range(count)
        ]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def count(self, predicate):
        """Return how many attempts so far satisfy predicate."""
        with self._lock:
            return sum(1 for attempt in self.attempts if predicate(attempt))

    def wait_for(self, predicate, number, timeout):
        """Wait until number attempts satisfy predicate."""
        poll_until(
            lambda: self.count(predicate) >= number, timeout,
            f"fewer than {number} attempts matched in {timeout} s",
        )

    def _post_until_stopped(self):
        with requests.Session() as session:
            while not self._stopping.is_set():
                attempt = self._post(session)
                with self._lock:
                    self.attempts.append(attempt)
                if not attempt.acknowledged:
                    self._stopping.wait(0.02)

    def _post(self, session):
        ids = [uuid.uuid4().hex for _ in range(self.batch_size)]
        body = batch(*(event(target=f"load-{n}", id=client_id)
                       for n, client_id in enumerate(ids)))
        attempt = LoadAttempt(time.monotonic(), 0.0, ids)
        try:
            answer = session.post(
                f"{self.url}/events", json=body, timeout=self.timeout
            )
            attempt.status = answer.status_code
            attempt.retry_after = answer.headers.get("Retry-After")
            if attempt.acknowledged:
                attempt.answer = answer.json()
        except requests.RequestException:
            pass
        attempt.ended = time.monotonic()
        return attempt


@dataclass
class RestartRun:
    """What the load clients saw while the database restarted."""

    mode: str
    attempts: list
    stored: collections.Counter
    down_at: float
    up_at: float

    def figures(self):
        """Return the run's figures as one printable paragraph."""
        attempts = self.attempts
        ok = [a for a in attempts if a.acknowledged]
        unavailable = [a for a in attempts if a.status == 503]
        acknowledged = sum(len(a.ids) for a in ok)
        failed = [a for a in attempts if not a.acknowledged]
        last_failure = max((a.ended for a in failed), default=self.up_at)
        return (
            f"restart ({self.mode}): {len(attempts)} requests, "
            f"{len(ok)} 2xx, {len(unavailable)} 503, "
            f"{len(attempts) - len(ok) - len(unavailable)} other; "
            f"{acknowledged} events acknowledged, "
            f"{sum(self.stored.values())} stored; "
            f"longest error window {longest_error_window(attempts):.2f} s; "
            f"database down {self.up_at - self.down_at:.2f} s; "
            f"last error {last_failure - self.up_at:+.2f} s after it "
            f"accepted again; slowest answer "
            f"{max(a.ended - a.started for a in attempts):.2f} s"
        )


def longest_error_window(attempts):
    """Return the longest stretch of time in which no request succeeded.

    A stretch runs from the start of a failed request to the end of the
    last failed one, until a request that started later succeeds.
    """
    longest = 0.0
    window_start = None
    window_end = 0.0
    for attempt in sorted(attempts, key=lambda a: a.started):
        if attempt.acknowledged:
            if window_start is not None:
                longest = max(longest, window_end - window_start)
            window_start = None
            continue
        if window_start is None:
            window_start = attempt.started
        window_end = max(window_end, attempt.ended)
    if window_start is not None:
        longest = max(longest, window_end - window_start)
    return longest


@pytest.fixture(scope="module", params=["fast", "immediate"])
def restart_run(request, pg_cluster, fault_database, fault_server):
    """Restart the database while 8 clients post; return what they saw.

    fast is pg_ctl's orderly shutdown; immediate kills the server, which
    then runs crash recovery when it starts.
    """
    mode = request.param
    pg_cluster.ensure_running()
    pg_cluster.query(fault_database, "TRUNCATE engagement_events")

    with PostingClients(fault_server.url) as clients:
        clients.wait_for(lambda a: a.acknowledged, 40, timeout=20)
        down_at = time.monotonic()
        pg_cluster.stop(mode)
        clients.wait_for(
            lambda a: a.started > down_at + OUTAGE_SECONDS
            and a.status == 503, 8, timeout=20,
        )
        pg_cluster.start(wait=False)
        up_at = pg_cluster.wait_accepting()
        recovered = up_at + RECOVERY_SECONDS
        clients.wait_for(
            lambda a: a.started > recovered and a.acknowledged, 40,
            timeout=20,
        )

    run = RestartRun(mode, clients.attempts,
                     stored_ids(pg_cluster, fault_database), down_at, up_at)
    print(f"\n{run.figures()}")
    return run


@pytest.mark.slow
def test_restart_answers_are_2xx_or_503(restart_run):
    statuses = collections.Counter(a.status for a in restart_run.attempts)

    assert set(statuses) <= {200, 201, 503}, statuses


@pytest.mark.slow
def test_restart_503_answers_carry_retry_after(restart_run):
    unavailable = [a for a in restart_run.attempts if a.status == 503]

    assert unavailable
    assert all(a.retry_after for a in unavailable)


@pytest.mark.slow
def test_restart_no_answer_takes_more_than_a_few_seconds(restart_run):
    slowest = max(a.ended - a.started for a in restart_run.attempts)

    assert slowest < OUTAGE_ANSWER_SECONDS


@pytest.mark.slow
def test_restart_every_request_succeeds_2s_after_database_is_back(
        restart_run):
    recovered = restart_run.up_at + RECOVERY_SECONDS
    later = [a for a in restart_run.attempts if a.started >= recovered]

    assert later
    assert [a.status for a in later if not a.acknowledged] == []


@pytest.mark.slow
def test_restart_acknowledged_events_stored_exactly_once(restart_run):
    acknowledged = [client_id for a in restart_run.attempts
                    if a.acknowledged for client_id in a.ids]

    copies = collections.Counter(restart_run.stored[i] for i in acknowledged)

    assert copies == {1: len(acknowledged)}


@pytest.mark.slow
def test_restart_503_batches_stored_whole_or_not_at_all(restart_run):
    unavailable = [a for a in restart_run.attempts if a.status == 503]

    partly = [a.ids for a in unavailable
              if len({restart_run.stored[i] for i in a.ids}) != 1]

    assert partly == []


@pytest.mark.slow
def test_restart_stores_only_events_sent_and_none_twice(restart_run):
    sent = {client_id for a in restart_run.attempts for client_id in a.ids}

    assert set(restart_run.stored) <= sent
    assert set(restart_run.stored.values()) <= {1}


@pytest.mark.slow
def test_restart_2xx_answers_count_every_event(restart_run):
    miscounted = [
        a.answer for a in restart_run.attempts if a.acknowledged
        and a.answer["inserted"] + a.answer["duplicates"] != len(a.ids)
    ]

    assert miscounted == []


# Faults: down at start-up and while idle.

@pytest.mark.slow
def test_startup_waits_for_database_and_serves_once_it_is_up(
        pg_cluster_up, fault_database, tmp_path):
    pg_cluster_up.stop()
    server = start_cluster_server(
        tmp_path, pg_cluster_up, fault_database, wait=False,
        DATABASE_WAIT_SECONDS=60,
    )
    try:
        poll_until(lambda: "(attempt 2)" in server.log(), 20,
                   "the service did not log its attempts")
        pg_cluster_up.start()
        up_at = time.monotonic()
        server.wait_ready()
        ready_seconds = time.monotonic() - up_at
        answer = post_events(server.url, batch(event()))
    finally:
        server.stop()

    assert answer.status_code == 201
    assert ready_seconds < STARTUP_RETRY_SECONDS
    assert "database not ready (attempt 1)" in server.log()


@pytest.mark.slow
def test_startup_exits_nonzero_with_one_message_when_database_never_up(
        tmp_path):
    server = start_server(
        tmp_path, "analytics", wait=False, DATABASE_HOST="127.0.0.1",
        DATABASE_PORT=free_port(), DATABASE_WAIT_SECONDS=2,
    )
    server.proc.wait(timeout=START_TIMEOUT_SECONDS)
    code = server.stop()
    log = server.log()

    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert code != 0
    assert len(errors) == 1 and "did not answer within 2 s" in errors[0]
    assert "Traceback" not in log


# A new connection to a host that drops packets, and /health coming back
# afterwards, are covered above, in "GET /health and database outages".

@pytest.fixture
def fault_proxy(pg_cluster_up):
    """A DatabaseProxy in front of the test cluster.

    Its blackhole() models a database host that drops packets: the
    connections stay open and nothing comes back, neither answers nor
    resets.
    """
    running = DatabaseProxy(("127.0.0.1", pg_cluster_up.port))
    yield running
    running.close()


@pytest.fixture
def fault_proxied_server(pg_cluster_up, fault_database, fault_proxy,
                         tmp_path):
    """A service that reaches the test cluster through the proxy."""
    running = start_cluster_server(tmp_path, pg_cluster_up, fault_database,
                                   DATABASE_PORT=fault_proxy.port)
    yield running
    running.stop()


@pytest.mark.slow
def test_health_503_within_3s_when_database_drops_packets(
        fault_proxied_server, fault_proxy):
    assert timed_get(f"{fault_proxied_server.url}/health")[0] == 200
    fault_proxy.blackhole()

    status, seconds = timed_get(f"{fault_proxied_server.url}/health")

    assert status == 503
    assert seconds < HEALTH_ANSWER_SECONDS


@pytest.mark.slow
def test_post_events_503_within_a_few_seconds_when_database_drops_packets(
        fault_proxied_server, fault_proxy):
    assert timed_get(f"{fault_proxied_server.url}/health")[0] == 200
    fault_proxy.blackhole()

    started = time.monotonic()
    answer = post_events(fault_proxied_server.url, batch(event()))
    seconds = time.monotonic() - started

    assert answer.status_code == 503
    assert seconds < OUTAGE_ANSWER_SECONDS


@pytest.mark.slow
def test_health_503_within_3s_when_database_refuses_connections(
        fault_api, pg_cluster_up):
    assert timed_get(f"{fault_api}/health")[0] == 200
    pg_cluster_up.stop()

    status, seconds = timed_get(f"{fault_api}/health")

    assert status == 503
    assert seconds < HEALTH_ANSWER_SECONDS


@pytest.mark.slow
def test_health_200_right_after_database_restarts(fault_api, pg_cluster_up):
    assert timed_get(f"{fault_api}/health")[0] == 200
    pg_cluster_up.stop()
    pg_cluster_up.start()

    status, _ = timed_get(f"{fault_api}/health")

    assert status == 200


# Faults: more clients than connections.

def send_and_leave(port, data):
    """Send data on a new connection and close it, reading nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)


def request_head(port, length, path="/events"):
    """Return the head of a JSON POST declaring length bytes of body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
        f"\r\n"
    ).encode("ascii")


@dataclass
class CrowdRun:
    """What 200 concurrent requests got while the table was locked."""

    answers: dict
    stored: collections.Counter


def crowd_request(url, port, number):
    """Send the crowd's request number; return (kind, status or None)."""
    ids = [f"crowd-{number}-{n}" for n in range(3)]
    good = batch(*(event(target=f"crowd-{number}", id=client_id)
                   for client_id in ids))
    kind = ("bad-json", "bad-text", "no-usable-event", "client-timeout",
            "disconnect-mid-body", "good", "good", "good", "good",
            "good")[number % 10]
    try:
        if kind == "bad-json":
            answer = requests.post(f"{url}/events", data=b'{"site": "x",',
                                   timeout=30)
        elif kind == "bad-text":
            good["site"] = "crowd\x00\ud800"
            answer = requests.post(
                f"{url}/events",
                data=json.dumps(good).replace("crowd-", "\\u0000-"),
                timeout=30,
            )
        elif kind == "no-usable-event":
            answer = requests.post(f"{url}/events", json=batch({"type": 7}),
                                   timeout=30)
        elif kind == "client-timeout":
            answer = requests.post(f"{url}/events", json=good, timeout=1)
        elif kind == "disconnect-mid-body":
            body = json.dumps(good).encode("utf-8")
            send_and_leave(port, request_head(port, len(body)) + body[:40])
            return kind, None
        else:
            answer = requests.post(f"{url}/events", json=good, timeout=30)
    except requests.RequestException:
        return kind, None
    return kind, answer.status_code


@pytest.fixture(scope="module")
def crowd_run(pg_cluster, fault_database, fault_server):
    """Send 200 requests at once to a service with 8 threads.

    The table stays locked until a good batch has run into the lock
    timeout and been answered 503; the rest wait meanwhile.
    Every tenth request is invalid JSON, one in ten has text PostgreSQL
    cannot hold, one in ten has no usable event, one in ten gives up
    after a second and one in ten disconnects in the middle of its body.
    """
    pg_cluster.ensure_running()
    pg_cluster.query(fault_database, "TRUNCATE engagement_events")
    url, port = fault_server.url, fault_server.port
    lock = pg_cluster.connect(fault_database)
    with lock.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("LOCK TABLE engagement_events IN EXCLUSIVE MODE")
    timed_out = threading.Event()

    def release():
        timed_out.wait(STATEMENT_SECONDS * 3)
        lock.close()

    releaser = threading.Thread(target=release)
    releaser.start()
    start = threading.Barrier(200)

    def send(number):
        start.wait()
        kind, status = crowd_request(url, port, number)
        # Released once a good batch has been refused: releasing on any
        # 503 (a bad-text batch's) could let every good one through.
        if kind == "good" and status == 503:
            timed_out.set()
        return kind, status

    try:
        with ThreadPoolExecutor(200) as executor:
            answers = dict(enumerate(executor.map(send, range(200))))
    finally:
        timed_out.set()
        releaser.join()
    outcomes = collections.Counter(answers.values())
    print(f"\ncrowd of 200: {dict(sorted(outcomes.items(), key=str))}")
    return CrowdRun(answers, stored_ids(pg_cluster, fault_database))


@pytest.mark.slow
def test_crowd_answers_2xx_or_503(crowd_run):
    statuses = collections.Counter(
        status for kind, status in crowd_run.answers.values()
        if kind in ("good", "bad-text")
    )

    assert set(statuses) <= {201, 503}, statuses


@pytest.mark.slow
def test_crowd_answers_no_other_5xx(crowd_run):
    statuses = collections.Counter(
        status for _, status in crowd_run.answers.values()
    )

    assert [s for s in statuses if s and s >= 500 and s != 503] == []


@pytest.mark.slow
def test_crowd_gets_503_while_table_locked_then_2xx(crowd_run):
    statuses = collections.Counter(
        status for kind, status in crowd_run.answers.values()
        if kind == "good"
    )

    assert statuses[503] > 0 and statuses[201] > 0, statuses


@pytest.mark.slow
def test_crowd_stores_acknowledged_batches_only(crowd_run):
    expected = collections.Counter(
        f"crowd-{number}-{n}"
        for number, (kind, status) in crowd_run.answers.items()
        if kind == "good" and status == 201 for n in range(3)
    )

    stored = collections.Counter(
        client_id for client_id in crowd_run.stored
        if client_id.startswith("crowd-")
        and crowd_run.answers[int(client_id.split("-")[1])][0] == "good"
    )

    assert stored == expected


@pytest.mark.slow
def test_crowd_leaves_every_connection_back_in_the_pool(
        crowd_run, fault_server):
    health = settled_health(fault_server.url)

    assert health.get("pool", {}).get("in_use") == 0, health


# Faults: slow and broken clients.

def trickle_then_leave(sock, head, body, sent, gone):
    """Send the head, then half the body a byte at a time; disconnect."""
    sock.sendall(head)
    sent.release()
    for byte in body[:len(body) // 2]:
        if gone.is_set():
            return
        sock.sendall(bytes([byte]))
        time.sleep(0.02)


def send_less_then_hang(sock, head, body, sent, gone):
    """Send less than Content-Length promised and wait, connected."""
    sock.sendall(head + body[:len(body) // 2])
    sent.release()
    gone.wait(30)


def send_less_then_close(sock, head, body, sent, gone):
    """Send less than Content-Length promised and close at once."""
    sock.sendall(head + body[:len(body) // 2])
    sent.release()


def half_close_mid_body(sock, head, body, sent, gone):
    """Send part of the body, say no more is coming, and wait."""
    sock.sendall(head + body[:len(body) // 2])
    sock.shutdown(socket.SHUT_WR)
    sent.release()
    gone.wait(30)


def stop_mid_head_then_hang(sock, head, body, sent, gone):
    """Send half the head and wait, connected."""
    sock.sendall(head[:len(head) // 2])
    sent.release()
    gone.wait(30)


def run_broken_client(port, behave, number, sent, gone):
    """Connect to post a valid batch, then behave badly."""
    body = json.dumps(batch(*(
        event(target="broken", id=f"broken-{number}-{n}") for n in range(3)
    ))).encode("utf-8")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            behave(sock, request_head(port, len(body)), body, sent, gone)
        except OSError:
            sent.release()


@pytest.mark.slow
@pytest.mark.parametrize(
    "behave",
    [trickle_then_leave, send_less_then_hang, send_less_then_close,
     half_close_mid_body, stop_mid_head_then_hang],
    ids=lambda behave: behave.__name__,
)
def test_broken_clients_hold_up_no_one_and_store_nothing(
        behave, fault_api, fault_server, pg_cluster_up, fault_database):
    # More broken clients than the service has threads.
    gone = threading.Event()
    sent = threading.Semaphore(0)
    clients = [
        threading.Thread(
            target=run_broken_client,
            args=(fault_server.port, behave, number, sent, gone),
        )
        for number in range(12)
    ]
    for client in clients:
        client.start()
    for _ in clients:
        assert sent.acquire(timeout=10)

    statuses, slowest = [], 0.0
    for number in range(8):
        began = time.monotonic()
        answer = requests.post(
            f"{fault_api}/events",
            json=batch(event(target="good", id=f"good-{number}")), timeout=5,
        )
        slowest = max(slowest, time.monotonic() - began)
        statuses.append(answer.status_code)
    gone.set()
    for client in clients:
        client.join(30)
    broken = pg_cluster_up.query(
        fault_database,
        "SELECT count(*) FROM engagement_events WHERE target = 'broken'",
    )[0][0]

    assert statuses == [201] * 8
    assert slowest < 1.0
    assert broken == 0


# Faults: several instances.

def start_two_instances(cluster, tmp_dir):
    """Start two services at once on a new empty database.

    Returns the database's name and, for each service, the status of a
    batch posted to it (None when it did not come up).
    """
    dbname = cluster.create_database()
    servers = [start_cluster_server(tmp_dir, cluster, dbname, wait=False)
               for _ in range(2)]
    statuses = []
    try:
        for server in servers:
            try:
                server.wait_ready()
            except AssertionError:
                statuses.append(None)
                continue
            statuses.append(post_events(server.url, batch(event()))
                            .status_code)
    finally:
        for server in servers:
            server.stop()
    return dbname, statuses


@pytest.mark.slow
def test_two_instances_started_together_on_empty_database_both_serve(
        pg_cluster_up, tmp_path):
    # Without the lock, CREATE ... IF NOT EXISTS races; it does not lose
    # every time, so several rounds.
    rounds = [start_two_instances(pg_cluster_up, tmp_path)
              for _ in range(INSTANCE_ROUNDS)]

    stored = [pg_cluster_up.query(dbname,
                                  "SELECT count(*) FROM engagement_events")
              for dbname, _ in rounds]

    assert [statuses for _, statuses in rounds] == [[201, 201]] * len(rounds)
    assert stored == [[(2,)]] * len(rounds)


# Faults: hostile bodies.

#: How many mutated batches the hostile test posts, and from what seed.
HOSTILE_BATCHES = 3000
HOSTILE_SEED = 20240517

#: Values of the wrong type for any field.
WRONG_VALUES = [0, -1, 1.5, True, False, None, [], {}, [1, "a"],
                {"a": 1}, "", "   "]

#: Numbers at and past the ends of a double, as values and as raw text.
HUGE_NUMBERS = [1e308, -1.7976931348623157e308, 10 ** 308, 2 ** 63,
                2 ** 64 + 1, 9007199254740993, -(10 ** 300)]
HUGE_LITERALS = ["1e400", "-1e400", "1" * 400, "9" * 309, "1.8e308",
                 "1E308", "1" * 5000]
TINY_NUMBERS = [5e-324, -5e-324, 1e-320, 2.2250738585072014e-308, -0.0,
                1e-7]
TINY_LITERALS = ["1e-400", "-0", "-0.0e0", "0." + "0" * 400 + "1"]

#: Number-like text JSON does not allow.
BAD_LITERALS = ["NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1",
                "0x10", "1_000", "--1"]

#: Characters that need care in text: controls, separators, a BOM.
CONTROL_CHARS = ["\x00", "\x01", "\x07", "\x1b", "\x1f", "\x7f", "\x85",
                 "\u2028", "\u2029", "\ufeff", "\r\n", "\t"]

#: Lone surrogates, a valid pair and a reversed pair.
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d\ude00",
              "\ude00\ud83d"]

#: Byte sequences that are not UTF-8.
BAD_BYTES = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3\x28",
             b"\xe2\x82", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80",
             b"\xf4\x90\x80\x80"]

#: at values that are not quite times, or are far away.
ODD_TIMES = ["", "now", "2024-02-30T00:00:00Z", "0001-01-01T00:00:00+14:00",
             "9999-12-31T23:59:59-14:00", "2024-05-17T18:43:22",
             "2024-05-17T18:43:22.318+05:30", "1e10", "2024-05-17T25:00Z",
             "2024-05-17T18:43:22.318Z\x00", 1715971402, "x" * 100]

#: Characters long strings are made of, one to four UTF-8 bytes each.
LONG_CHARS = ["a", "\u00e9", "\u20ac", "\U0001f600", " ", "\x00"]

#: Lengths around the limits on names (256) and targets (2048), and one
#: that makes the body pass 1 MiB with four-byte characters.
LONG_LENGTHS = [255, 256, 257, 2047, 2048, 2049, 20000, 270000]


class HostileBatches:
    """Valid batches, each mutated a few ways; seeded, so runs repeat.

    Mutations work on the document (wrong types, numbers, nesting, text,
    duplicated keys, long strings, odd times, aliases, missing fields,
    odd shapes), on its JSON text (raw fragments spliced in) and on its
    bytes (invalid UTF-8, truncation, a byte-order mark).  tried counts
    what was done.
    """

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.tried = collections.Counter()
        self.times = set()
        self._raw = {}
        self._bytes = {}

    def make(self, number):
        """Return the bytes of mutated batch number."""
        rng = self.rng
        self._raw, self._bytes = {}, {}
        doc = self.valid_batch(number)
        mutations = rng.sample(self.DOCUMENT_MUTATIONS,
                               rng.choice([1, 1, 1, 2, 3]))
        for mutate in mutations:
            self.tried[mutate.__name__] += 1
            doc = mutate(self, doc)

        ensure_ascii = rng.random() < 0.5
        text = json.dumps(doc, ensure_ascii=ensure_ascii)
        for placeholder, raw in reversed(self._raw.items()):
            text = text.replace(json.dumps(placeholder), raw)
        body = text.encode("utf-8", "surrogatepass")
        for marker, bad in self._bytes.items():
            body = body.replace(marker.encode("ascii"), bad)

        roll = rng.random()
        if roll < 0.05:
            self.tried["truncated"] += 1
            body = body[:rng.randrange(len(body) + 1)]
        elif roll < 0.08:
            self.tried["invalid_utf8_anywhere"] += 1
            at = rng.randrange(len(body) + 1)
            body = body[:at] + rng.choice(BAD_BYTES) + body[at:]
        elif roll < 0.10:
            self.tried["byte_order_mark"] += 1
            body = b"\xef\xbb\xbf" + body
        return body

    def valid_batch(self, number):
        rng = self.rng
        events = []
        for n in range(rng.randint(1, 4)):
            at = now_iso(-rng.uniform(0, 3600))
            self.times.add(at)
            events.append({
                "id": f"hostile-{number}-{n}",
                "type": rng.choice(["view", "view-end", "scroll-depth",
                                    "dwell", "interaction"]),
                "target": f"target-{number}-{n}",
                "at": at,
                "meta": {"ratio": rng.random(),
                         "depth": rng.randint(0, 100), "label": "hero"},
            })
        return {
            "site": "hostile",
            "session_id": f"session-{number}",
            "reason": rng.choice(["interval", "capacity", "visibility",
                                  "unload"]),
            "events": events,
        }

    # Helpers: where to mutate, and splicing raw text or bytes in.

    def _slots(self, doc, strings=False):
        found = []
        containers = [doc] if isinstance(doc, dict) else []
        events = doc.get("events") if isinstance(doc, dict) else None
        for item in events if isinstance(events, list) else []:
            if isinstance(item, dict):
                containers.append(item)
                if isinstance(item.get("meta"), dict):
                    containers.append(item["meta"])
        for container in containers:
            for key, value in container.items():
                if not strings or isinstance(value, str):
                    found.append((container, key))
        return found

    def _pick(self, doc, strings=False):
        slots = self._slots(doc, strings)
        return self.rng.choice(slots) if slots else (None, None)

    def _events(self, doc):
        events = doc.get("events") if isinstance(doc, dict) else None
        if not isinstance(events, list):
            return []
        return [item for item in events if isinstance(item, dict)]

    def _splice(self, raw):
        placeholder = f"@@raw{len(self._raw)}@@"
        self._raw[placeholder] = raw
        return placeholder

    def _insert(self, text, piece):
        at = self.rng.randrange(len(text) + 1)
        return text[:at] + piece + text[at:]

    def _raw_object(self, items):
        return "{" + ", ".join(
            f"{json.dumps(key)}: {json.dumps(value)}" for key, value in items
        ) + "}"

    # Mutations of the document.

    def wrong_type(self, doc):
        container, key = self._pick(doc)
        if container is not None:
            container[key] = self.rng.choice(WRONG_VALUES)
        return doc

    def huge_number(self, doc):
        return self._number(doc, HUGE_NUMBERS, HUGE_LITERALS)

    def tiny_number(self, doc):
        return self._number(doc, TINY_NUMBERS, TINY_LITERALS)

    def bad_number_literal(self, doc):
        return self._number(doc, [], BAD_LITERALS)

    def _number(self, doc, values, literals):
        rng = self.rng
        if literals and (not values or rng.random() < 0.5):
            value = self._splice(rng.choice(literals))
        else:
            value = rng.choice(values)
        events = self._events(doc)
        meta = rng.choice(events).get("meta") if events else None
        if isinstance(meta, dict) and rng.random() < 0.8:
            meta[rng.choice(["n", "ratio", "deep"])] = value
        else:
            container, key = self._pick(doc)
            if container is not None:
                container[key] = value
        return doc

    def deep_nesting(self, doc):
        rng = self.rng
        depth = rng.choice([31, 32, 33, 64, 900, 5000, 20000])
        if rng.random() < 0.5:
            nested = '{"n": ' * (depth - 1) + "{}" + "}" * (depth - 1)
        else:
            nested = ('{"n": ' + "[" * (depth - 2) + "1" + "]" * (depth - 2)
                      + "}")
        events = self._events(doc)
        if events:
            rng.choice(events)["meta"] = self._splice(nested)
        return doc

    def control_chars(self, doc):
        return self._odd_text(doc, CONTROL_CHARS)

    def surrogates(self, doc):
        return self._odd_text(doc, SURROGATES)

    def _odd_text(self, doc, pieces):
        rng = self.rng
        piece = rng.choice(pieces)
        events = self._events(doc)
        meta = rng.choice(events).get("meta") if events else None
        if isinstance(meta, dict) and meta and rng.random() < 0.3:
            # in a key of meta
            key = rng.choice(list(meta))
            meta[self._insert(key, piece)] = meta.pop(key)
            return doc
        container, key = self._pick(doc, strings=True)
        if container is not None:
            container[key] = self._insert(container[key], piece)
        return doc

    def raw_control_char(self, doc):
        container, key = self._pick(doc)
        if container is not None:
            char = self.rng.choice(["\x00", "\x01", "\x1f", "\n", "\t"])
            container[key] = self._splice(f'"raw{char}text"')
        return doc

    def invalid_utf8(self, doc):
        container, key = self._pick(doc, strings=True)
        if container is not None:
            marker = f"@@bytes{len(self._bytes)}@@"
            self._bytes[marker] = self.rng.choice(BAD_BYTES)
            container[key] = self._insert(container[key], marker)
        return doc

    def duplicated_keys(self, doc):
        rng = self.rng
        events = self._events(doc)
        target = rng.choice(events) if events and rng.random() < 0.7 else doc
        if not isinstance(target, dict) or not target:
            return doc
        items = list(target.items())
        key, value = rng.choice(items)
        twin = rng.choice([value, "twin", 7, None, {"twin": True}])
        items.insert(rng.randrange(len(items) + 1), (key, twin))
        raw = self._splice(self._raw_object(items))
        if target is doc:
            return raw
        doc["events"][doc["events"].index(target)] = raw
        return doc

    def long_string(self, doc):
        rng = self.rng
        text = rng.choice(LONG_CHARS) * rng.choice(LONG_LENGTHS)
        events = self._events(doc)
        if events and rng.random() < 0.3:
            # meta just under, at and over its 16 KiB limit
            size = 16 * 1024 - len('{"v":""}') + rng.choice([-1, 0, 1])
            rng.choice(events)["meta"] = {"v": "m" * size}
            return doc
        container, key = self._pick(doc, strings=True)
        if container is not None:
            container[key] = text
        return doc

    def odd_time(self, doc):
        events = self._events(doc)
        if events:
            self.rng.choice(events)["at"] = self.rng.choice(ODD_TIMES)
        return doc

    def aliases(self, doc):
        for item in self._events(doc):
            if "type" in item and self.rng.random() < 0.5:
                item["event_type"] = item.pop("type")
            if "at" in item and self.rng.random() < 0.5:
                item["occurred_at"] = item.pop("at")
            if self.rng.random() < 0.2:
                item["event_type"] = "alias-too"
        return doc

    def missing_field(self, doc):
        container, key = self._pick(doc)
        if container is not None:
            del container[key]
        return doc

    def odd_shape(self, doc):
        rng = self.rng
        choice = rng.randrange(5)
        if choice == 0 or not self._events(doc):
            return rng.choice([[], None, "batch", 0, {}, [doc]])
        if choice == 1:
            doc["events"] = []
        elif choice == 2:
            doc["events"] = doc["events"] * (501 // len(doc["events"]) + 1)
        elif choice == 3:
            doc["events"] = [1, "view", None, []] + doc["events"]
        else:
            doc["extra"] = {"unknown": [1, 2, 3]}
        return doc

    DOCUMENT_MUTATIONS = [
        wrong_type, huge_number, tiny_number, bad_number_literal,
        deep_nesting, control_chars, surrogates, raw_control_char,
        invalid_utf8, duplicated_keys, long_string, odd_time, aliases,
        missing_field, odd_shape,
    ]


_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def parse_as_contract_says(body):
    """Parse a body as the contract describes; None when it is malformed.

    Invalid UTF-8 becomes U+FFFD, a leading byte-order mark is dropped,
    NaN, Infinity and numbers that overflow a double are malformed, the
    last of duplicated keys wins, and NUL and lone surrogates in strings
    and keys become U+FFFD.
    """
    def refuse(name):
        raise ValueError(name)

    def finite_float(text):
        value = float(text)
        if math.isinf(value):
            raise ValueError(text)
        return value

    def finite_int(text):
        if math.isinf(float(text)):
            raise ValueError(text)
        return int(text)

    def storable(doc):
        # A loop rather than recursion: JSON nests deeper than the stack.
        root = [doc]
        pending = [(root, 0)]
        while pending:
            container, key = pending.pop()
            value = container[key]
            if isinstance(value, str):
                container[key] = _UNSTORABLE_TEXT.sub("\ufffd", value)
            elif isinstance(value, list):
                pending += [(value, index) for index in range(len(value))]
            elif isinstance(value, dict):
                fixed = {_UNSTORABLE_TEXT.sub("\ufffd", name): item
                         for name, item in value.items()}
                value.clear()
                value.update(fixed)
                pending += [(value, name) for name in value]
        return root[0]

    text = body.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        doc = json.loads(text, parse_constant=refuse,
                         parse_float=finite_float, parse_int=finite_int)
        return storable(doc)
    except (ValueError, RecursionError):
        return None


def comparable(value):
    """Return value as canonical JSON in which equal numbers look equal."""
    def numbers(item):
        if isinstance(item, bool) or item is None or isinstance(item, str):
            return item
        if isinstance(item, (int, float)):
            try:
                return float(item) + 0.0
            except OverflowError:
                return item
        if isinstance(item, list):
            return [numbers(x) for x in item]
        return {key: numbers(x) for key, x in item.items()}

    return json.dumps(numbers(value), sort_keys=True, ensure_ascii=False)


def expected_rows(doc, answer):
    """Return the rows an acknowledged batch says it stored, by index."""
    rejected = {item["index"] for item in answer["rejected"]}
    rows = {}
    for index, item in enumerate(doc["events"]):
        if index in rejected:
            continue
        event_type = item.get("type")
        if event_type is None:
            event_type = item.get("event_type")
        meta = item.get("meta")
        rows[index] = (
            doc["site"], doc["session_id"], event_type, item.get("target"),
            item.get("id"), doc.get("reason"),
            comparable({} if meta is None else meta),
        )
    return rows


@dataclass
class HostileRun:
    """The bodies posted, their answers, and the rows stored.

    docs holds each acknowledged body as the contract parses it.
    """

    bodies: list
    answers: list
    docs: dict
    rows: list
    tried: collections.Counter
    times: set
    health: dict


@pytest.fixture(scope="module")
def hostile_run(pg_cluster, fault_database, fault_server):
    """Post HOSTILE_BATCHES mutated batches from 4 threads."""
    pg_cluster.ensure_running()
    pg_cluster.query(fault_database, "TRUNCATE engagement_events")
    generator = HostileBatches(HOSTILE_SEED)
    bodies = [generator.make(number) for number in range(HOSTILE_BATCHES)]
    local = threading.local()

    def post(body):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            answer = local.session.post(
                f"{fault_server.url}/events", data=body, timeout=30,
                headers={"Content-Type": "application/json"},
            )
        except requests.RequestException as e:
            return None, repr(e)
        try:
            return answer.status_code, answer.json()
        except ValueError:
            return answer.status_code, answer.text

    with ThreadPoolExecutor(4) as executor:
        answers = list(executor.map(post, bodies))
    rows = pg_cluster.query(
        fault_database,
        "SELECT site, session_id, event_type, target, client_id, reason, "
        "meta, occurred_at FROM engagement_events",
    )
    docs = {
        number: parse_as_contract_says(bodies[number])
        for number, (status, _) in enumerate(answers) if status == 201
    }
    run = HostileRun(bodies, answers, docs, rows, generator.tried,
                     generator.times, settled_health(fault_server.url))
    statuses = collections.Counter(status for status, _ in answers)
    print(f"\nhostile: {len(bodies)} batches, seed {HOSTILE_SEED}; "
          f"answers {dict(sorted(statuses.items()))}; "
          f"{len(rows)} events stored; tried {dict(generator.tried)}")
    return run


@pytest.mark.slow
def test_hostile_bodies_never_get_5xx(hostile_run):
    server_errors = [
        (status, answer) for status, answer in hostile_run.answers
        if status is None or status >= 500
    ]

    assert server_errors == []


@pytest.mark.slow
def test_hostile_bodies_leave_service_answering(hostile_run):
    assert hostile_run.health.get("status") == "ok", hostile_run.health


@pytest.mark.slow
def test_hostile_bodies_acknowledged_only_when_json_is_valid(hostile_run):
    wrongly = [
        hostile_run.bodies[number][:200]
        for number, doc in hostile_run.docs.items() if doc is None
    ]

    assert wrongly == []


@pytest.mark.slow
def test_hostile_answer_counts_add_up(hostile_run):
    wrong = []
    for number, doc in hostile_run.docs.items():
        answer = hostile_run.answers[number][1]
        counted = (answer["inserted"] + answer["duplicates"]
                   + len(answer["rejected"]))
        if doc is None or counted != len(doc["events"]):
            wrong.append((number, answer))
    inserted = sum(answer["inserted"] for status, answer
                   in hostile_run.answers if status == 201)

    assert wrong == []
    assert inserted == len(hostile_run.rows)


@pytest.mark.slow
def test_hostile_stored_events_have_the_values_sent(hostile_run):
    expected = set()
    for number, doc in hostile_run.docs.items():
        answer = hostile_run.answers[number][1]
        expected.update(expected_rows(doc, answer).values())

    stored = {
        (site, session_id, event_type, target, client_id, reason,
         comparable(meta))
        for site, session_id, event_type, target, client_id, reason, meta,
        _ in hostile_run.rows
    }

    assert sorted(expected - stored, key=repr)[:5] == []
    assert sorted(stored - expected, key=repr)[:5] == []


@pytest.mark.slow
def test_hostile_stored_events_keep_the_time_sent(hostile_run):
    sent = {}
    for number, doc in hostile_run.docs.items():
        answer = hostile_run.answers[number][1]
        for index in expected_rows(doc, answer):
            item = doc["events"][index]
            at = item.get("at")
            if at is None:
                at = item.get("occurred_at")
            if at in hostile_run.times and isinstance(item.get("id"), str):
                sent.setdefault(item["id"], set()).add(at)
    rows = collections.Counter(row[4] for row in hostile_run.rows)

    wrong = [
        (client_id, occurred_at, sent[client_id])
        for *_, client_id, _, _, occurred_at in hostile_run.rows
        if len(sent.get(client_id, ())) == 1 and rows[client_id] == 1
        and datetime.fromisoformat(next(iter(sent[client_id])))
        != occurred_at
    ]

    assert sent
    assert wrong == []


# Faults: shutdown.

@pytest.fixture
def fault_own_server(pg_cluster_up, fault_database, fault_server, tmp_path):
    """A service of the test's own on the test cluster; an empty table."""
    pg_cluster_up.query(fault_database, "TRUNCATE engagement_events")
    running = start_cluster_server(tmp_path, pg_cluster_up, fault_database)
    yield running
    running.stop()


def refuses_connections(port):
    """Tell whether nothing accepts connections on port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def sleeping_in_inserts(cluster, dbname):
    """Return how many of the service's statements sleep in a trigger."""
    return cluster.query(
        dbname,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = 'analytics' AND wait_event = 'PgSleep'",
    )[0][0]


class BatchesInFlight:
    """Batches posted from threads, held in the database by a trigger
    that sleeps (a lock would not do: the service gives up on locks after
    LOCK_TIMEOUT_MS)."""

    def __init__(self, url, cluster, dbname, count=4):
        self.answers = {}
        self._cluster, self._dbname = cluster, dbname
        cluster.query(dbname, f"""
            CREATE FUNCTION test_slow_insert() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_sleep({IN_FLIGHT_SECONDS + 0.5});
                RETURN NULL;
            END $$;
            CREATE TRIGGER test_slow_insert
                BEFORE INSERT ON engagement_events
                FOR EACH STATEMENT EXECUTE FUNCTION test_slow_insert();
        """)
        self._threads = [
            threading.Thread(target=self._post, args=(url, number))
            for number in range(count)
        ]
        for thread in self._threads:
            thread.start()
        poll_until(
            lambda: sleeping_in_inserts(cluster, dbname) == count, 10,
            "the batches did not reach the database",
        )

    def finish(self):
        """Return the answers once all have come; drop the trigger."""
        for thread in self._threads:
            thread.join(30)
        self._cluster.query(
            self._dbname,
            "DROP TRIGGER IF EXISTS test_slow_insert ON engagement_events;"
            " DROP FUNCTION IF EXISTS test_slow_insert()",
        )
        return self.answers

    def _post(self, url, number):
        body = batch(*(event(id=f"flight-{number}-{n}") for n in range(5)))
        try:
            self.answers[number] = post_events(url, body).status_code
        except requests.RequestException as e:
            self.answers[number] = repr(e)


@pytest.fixture
def fault_in_flight(fault_own_server, pg_cluster_up, fault_database):
    """Four batches in flight on a service that has just got SIGTERM."""
    flight = BatchesInFlight(fault_own_server.url, pg_cluster_up,
                             fault_database)
    fault_own_server.proc.send_signal(signal.SIGTERM)
    yield flight
    flight.finish()


def stops_accepting(port, timeout=5):
    """Tell whether port refuses connections within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not refuses_connections(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_sigterm_stops_accepting_connections(
        fault_in_flight, fault_own_server):
    assert stops_accepting(fault_own_server.port)


@pytest.mark.slow
def test_sigterm_answers_batches_in_flight_and_stores_them(
        fault_in_flight, fault_own_server, pg_cluster_up, fault_database):
    assert stops_accepting(fault_own_server.port)

    # Held longer than a shutdown that merely waits for its threads would.
    time.sleep(IN_FLIGHT_SECONDS)
    answers = fault_in_flight.finish()
    fault_own_server.proc.wait(15)
    stored = stored_ids(pg_cluster_up, fault_database)

    assert answers == {0: 201, 1: 201, 2: 201, 3: 201}
    assert sum(stored.values()) == 20


@pytest.mark.slow
def test_sigterm_exits_0_after_batches_in_flight(
        fault_in_flight, fault_own_server):
    assert stops_accepting(fault_own_server.port)

    time.sleep(IN_FLIGHT_SECONDS)
    fault_in_flight.finish()
    code = fault_own_server.proc.wait(15)

    assert code == 0
    assert "stopped" in fault_own_server.log()


@dataclass
class ShutdownRun:
    """What 8 posting clients saw when the service got SIGTERM."""

    attempts: list
    stored: collections.Counter
    exit_code: int
    exit_seconds: float


@pytest.fixture(scope="module")
def shutdown_run(pg_cluster, fault_database, fault_server, tmp_path_factory):
    """Send SIGTERM while 8 clients post on kept-alive connections."""
    pg_cluster.ensure_running()
    pg_cluster.query(fault_database, "TRUNCATE engagement_events")
    server = start_cluster_server(
        tmp_path_factory.mktemp("shutdown"), pg_cluster, fault_database
    )
    try:
        with PostingClients(server.url) as clients:
            clients.wait_for(lambda a: a.acknowledged, 40, timeout=20)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = server.proc.wait(SHUTDOWN_SECONDS + 15)
            except subprocess.TimeoutExpired:
                code = None
            exit_seconds = time.monotonic() - signalled
    finally:
        server.stop()
    run = ShutdownRun(clients.attempts, stored_ids(pg_cluster, fault_database),
                      code, exit_seconds)
    acknowledged = [a for a in run.attempts if a.acknowledged]
    print(f"\nshutdown under load: {len(run.attempts)} requests, "
          f"{len(acknowledged)} acknowledged, "
          f"{sum(len(a.ids) for a in acknowledged)} events acknowledged, "
          f"{sum(run.stored.values())} stored; exit {code} after "
          f"{exit_seconds:.2f} s")
    return run


@pytest.mark.slow
def test_sigterm_under_load_exits_0_promptly(shutdown_run):
    assert shutdown_run.exit_code == 0
    assert shutdown_run.exit_seconds < SHUTDOWN_SECONDS


@pytest.mark.slow
def test_sigterm_under_load_batches_stored_and_acknowledged_or_neither(
        shutdown_run):
    stored = shutdown_run.stored

    wrong = [
        (a.status, [stored[i] for i in a.ids])
        for a in shutdown_run.attempts
        if [stored[i] for i in a.ids] != [int(a.acknowledged)] * len(a.ids)
    ]

    assert wrong == []
