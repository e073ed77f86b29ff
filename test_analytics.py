"""Tests for the analytics ingestion service, over HTTP against PostgreSQL.

Every test talks to a real server process (``python analytics.py``) on a
free port, and that server talks to a real PostgreSQL.  The database comes
from the same DATABASE_* variables the service reads; the tests never touch
its data: they create a scratch database of their own beside it (the role
needs CREATEDB), apply the schema there by starting the service, and drop
it at the end.

Run them with ``python -m pytest -v`` (see README.md).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
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
    """Return a provider-shaped batch of events (a fresh session by default)."""
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


# --- POST /events --------------------------------------------------------------

def test_post_events_provider_batch_by_fetch(api, db):
    body = batch(event(), event("scroll-depth", "article", meta={"depth": 50}))

    answer = post_events(api, body)

    assert answer.status_code == 201
    assert answer.json() == {
        "inserted": 2, "duplicates": 0, "adjusted": 0, "rejected": []
    }
    assert stored_count(db) == 2


# --- Faults and hostile input ------------------------------------------------
# (tests for issue 4 go here: a PostgreSQL cluster of their own, restarts,
# outages, slow clients, several instances, hostile bodies, shutdown)
