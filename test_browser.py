"""CORS and beacons as a real browser sees them (issue 5).

HTTP clients do not enforce CORS, browsers do: a test with requests can
pass while every real page is blocked.  These tests start the service with
CORS_ALLOW_ORIGINS listing one origin, serve a small page from that origin
on another local port and load it in Debian's headless Chromium.  The page
does what the provider and the live console do (a preflighted credentialed
POST, a beacon on unload, a credentialed read of /events/recent, an invalid
batch whose error it reads) and writes what it saw as JSON into
<pre id=result>, where the tests read it.  The same page served from an
origin that is not listed must be blocked.

Chromium is driven over its DevTools protocol on a pipe
(--remote-debugging-pipe), with the standard library only.  The tests skip
where chromium is not installed; .ci/run installs it.  Run them alone with
``python -m pytest -v test_browser.py`` and the DATABASE_* variables of
test_analytics.py.
"""

import functools
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import psycopg2
import pytest

from test_analytics import (
    batch,
    database_params,
    event,
    start_server,
    test_database,  # noqa: F401  (a fixture this module uses)
)

CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium)",
)

#: Flags for a headless Chromium on a machine with no network and no
#: screen; without the background-networking ones it keeps dialling out.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
)

#: How long one DevTools command, the page's whole run included, may take.
BROWSER_TIMEOUT_SECONDS = 20

#: How long a beacon, which nobody waits for, gets to reach the database.
BEACON_TIMEOUT_SECONDS = 10

#: The page under test.  It gets its batches and the service's address in
#: CONFIG, does one step after another and writes what it saw as JSON.
PAGE_TEMPLATE = """<!doctype html>
<meta charset="utf-8">
<title>analytics browser test</title>
<link rel="icon" href="data:,">
<pre id="result"></pre>
<script>
const config = CONFIG;

// A credentialed fetch; the status and JSON body it read, or its error.
async function call(path, init) {
  try {
    const answer = await fetch(config.api + path,
                               {credentials: 'include', ...init});
    return {status: answer.status, body: await answer.json()};
  } catch (e) {
    return {error: `${e.name}: ${e.message}`};
  }
}

// The provider's normal flush: JSON, so the browser sends a preflight.
function postBatch(body) {
  return call('/events', {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify(body),
  });
}

async function run() {
  const seen = {origin: location.origin};
  seen.beacon = navigator.sendBeacon(config.api + '/events',
                                     JSON.stringify(config.beacon));
  seen.post = await postBatch(config.batch);
  seen.recent = await call('/events/recent?limit=25&session_id=' +
                           encodeURIComponent(config.batch.session_id));
  seen.invalid = await postBatch(config.invalid);
  document.getElementById('result').textContent = JSON.stringify(seen);
}

window.finished = run();
</script>
"""

#: How Chromium logs a request it refused under CORS; group 1 is the URL.
CORS_BLOCK = re.compile(r"Access to fetch at '([^']+)' .* blocked by CORS")

#: What the test evaluates in the page once it has loaded.
READ_RESULT = """
window.finished.then(() => document.getElementById('result').textContent)
"""


# --- Chromium over the DevTools protocol -------------------------------------

class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe.

    With --remote-debugging-pipe Chromium reads commands on its fd 3 and
    writes answers and events on its fd 4, each a JSON text ending in NUL.
    """

    def __init__(self, profile_dir, log_path):
        commands_in, commands_out = os.pipe()
        answers_in, answers_out = os.pipe()
        self.log_path = log_path
        self._log = open(log_path, "wb")

        # bash moves the pipe ends to fds 3 and 4, where Chromium wants
        # them (dash cannot: it only knows fds 0 to 9)
        shell = f'exec "$@" 3<&{commands_in} 4>&{answers_out}'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, "bash", CHROMIUM, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile_dir}", "--remote-debugging-pipe",
             "about:blank"],
            pass_fds=(commands_in, answers_out),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.close(commands_in)
        os.close(answers_out)

        self._commands = open(commands_out, "wb")
        self._answers = answers_in
        self._buffer = b""
        self._last_id = 0
        self.events = []

    def send(self, method, session=None, **params):
        """Run one DevTools command and return its result."""
        self._last_id += 1
        command = {"id": self._last_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        self._commands.write(json.dumps(command).encode("utf-8") + b"\0")
        self._commands.flush()

        answer = self._receive_until(
            lambda message: message.get("id") == command["id"]
        )
        if "error" in answer:
            raise AssertionError(f"{method} failed: {answer['error']}")
        return answer["result"]

    def wait_for_event(self, session, method, **params):
        """Wait for an event of session whose params include params."""
        def wanted(message):
            return (
                message.get("sessionId") == session
                and message.get("method") == method
                and params.items() <= message.get("params", {}).items()
            )

        if not any(wanted(message) for message in self.events):
            self._receive_until(wanted)

    def log_lines(self, session):
        """Return what the page's console and network logged, as text."""
        return [
            message["params"]["entry"]["text"]
            for message in self.events
            if message.get("method") == "Log.entryAdded"
            and message.get("sessionId") == session
        ]

    def close(self):
        """Ask Chromium to quit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                command = {"id": 0, "method": "Browser.close", "params": {}}
                self._commands.write(json.dumps(command).encode() + b"\0")
                self._commands.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        try:
            self._commands.close()
        except OSError:
            pass  # Chromium is gone and the pipe with it
        os.close(self._answers)
        self._log.close()

    def _receive_until(self, wanted):
        """Read messages until one is wanted; keep the others as events."""
        deadline = time.monotonic() + BROWSER_TIMEOUT_SECONDS
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                self.events.append(message)

            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self._answers], [], [],
                                           max(remaining, 0))
            if not readable:
                raise AssertionError("Chromium did not answer in time")
            chunk = os.read(self._answers, 65536)
            if not chunk:
                log = self.log_path.read_text(errors="replace")
                raise AssertionError(f"Chromium exited:\n{log[-3000:]}")
            self._buffer += chunk


@dataclass
class PageRun:
    """One load of the test page: what it was given and what it saw."""

    sent: dict
    seen: dict
    log: list


def run_page(browser, url, sent):
    """Load the page at url in a new tab and return what it wrote."""
    target = browser.send("Target.createTarget", url="about:blank")
    session = browser.send(
        "Target.attachToTarget", targetId=target["targetId"], flatten=True
    )["sessionId"]
    browser.send("Log.enable", session)
    browser.send("Page.enable", session)
    browser.send("Page.setLifecycleEventsEnabled", session, enabled=True)

    navigation = browser.send("Page.navigate", session, url=url)
    if "errorText" in navigation:
        raise AssertionError(f"{url}: {navigation['errorText']}")
    browser.wait_for_event(session, "Page.lifecycleEvent", name="load",
                           loaderId=navigation["loaderId"])
    answer = browser.send(
        "Runtime.evaluate", session, expression=READ_RESULT,
        awaitPromise=True, returnByValue=True,
    )

    log = browser.log_lines(session)
    if "exceptionDetails" in answer:
        raise AssertionError(f"the page failed: {answer} {log}")
    return PageRun(sent=sent, seen=json.loads(answer["result"]["value"]),
                   log=log)


# --- Fixtures ----------------------------------------------------------------

class QuietHandler(SimpleHTTPRequestHandler):
    """Serve files without a log line per request."""

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    """A static file server on 127.0.0.1 for the test pages."""
    root = tmp_path_factory.mktemp("pages")
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root = root
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def listed_origin(page_server):
    """The page origin the service lists, as docker-compose.yml's is."""
    return f"http://localhost:{page_server.server_address[1]}"


@pytest.fixture(scope="module")
def unlisted_origin(page_server):
    """The same page server under another name: a different origin."""
    return f"http://127.0.0.1:{page_server.server_address[1]}"


@pytest.fixture(scope="module")
def service(test_database, listed_origin, tmp_path_factory):
    """The service, allowing the listed origin only."""
    running = start_server(
        tmp_path_factory.mktemp("browser-server"), test_database,
        CORS_ALLOW_ORIGINS=listed_origin,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def db(test_database, service):
    """An autocommit connection to the scratch database, for assertions."""
    conn = psycopg2.connect(**database_params(test_database))
    conn.autocommit = True
    yield conn
    conn.close()


def load_test_page(page_server, origin, service, tmp_dir):
    """Serve a fresh test page at origin, run it in a new browser.

    Returns the browser, still open (a beacon may be in flight), and the
    PageRun.  The caller closes the browser.
    """
    invalid = batch(event())
    del invalid["session_id"]
    sent = {
        "api": service.url,
        "batch": batch(
            event("view", "hero", meta={"ratio": 0.75}),
            event("scroll-depth", "article", meta={"depth": 50}),
        ),
        "beacon": batch(event("view-end", "hero"), reason="unload"),
        "invalid": invalid,
    }
    name = f"page-{sent['batch']['session_id']}.html"
    page = PAGE_TEMPLATE.replace("CONFIG", json.dumps(sent))
    (page_server.root / name).write_text(page, encoding="utf-8")

    browser = Browser(tmp_dir / "profile", tmp_dir / "chromium.log")
    try:
        run = run_page(browser, f"{origin}/{name}", sent)
        assert run.seen["origin"] == origin, run.seen
    except BaseException:
        browser.close()
        raise
    return browser, run


@pytest.fixture(scope="module")
def listed_page(page_server, listed_origin, service, tmp_path_factory):
    """The test page's run from the listed origin."""
    tmp_dir = tmp_path_factory.mktemp("chromium-listed")
    browser, run = load_test_page(page_server, listed_origin, service,
                                  tmp_dir)
    yield run
    browser.close()


@pytest.fixture(scope="module")
def unlisted_page(page_server, unlisted_origin, service, tmp_path_factory):
    """The test page's run from an origin the service does not list."""
    tmp_dir = tmp_path_factory.mktemp("chromium-unlisted")
    browser, run = load_test_page(page_server, unlisted_origin, service,
                                  tmp_dir)
    yield run
    browser.close()


def stored_events(db, session_id):
    """Return (event_type, target, reason) of the session's stored events."""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT event_type, target, reason FROM engagement_events"
            " WHERE session_id = %s ORDER BY event_type",
            (session_id,),
        )
        return cursor.fetchall()


def wait_for_events(db, session_id, timeout=BEACON_TIMEOUT_SECONDS):
    """Poll until the session has stored events; return them (or [])."""
    deadline = time.monotonic() + timeout
    while True:
        rows = stored_events(db, session_id)
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# --- From the listed origin --------------------------------------------------

def test_listed_origin_post_is_answered_and_readable(listed_page):
    assert listed_page.seen["post"] == {
        "status": 201,
        "body": {"inserted": 2, "duplicates": 0, "adjusted": 0,
                 "rejected": []},
    }, listed_page.log


def test_listed_origin_post_is_stored(listed_page, db):
    session_id = listed_page.sent["batch"]["session_id"]

    assert stored_events(db, session_id) == [
        ("scroll-depth", "article", "interval"),
        ("view", "hero", "interval"),
    ]


def test_listed_origin_beacon_is_queued(listed_page):
    assert listed_page.seen["beacon"] is True


def test_listed_origin_beacon_is_stored(listed_page, db):
    session_id = listed_page.sent["beacon"]["session_id"]

    assert wait_for_events(db, session_id) == [("view-end", "hero", "unload")]


def test_listed_origin_recent_events_are_readable(listed_page):
    sent = listed_page.sent["batch"]
    recent = listed_page.seen["recent"]

    assert recent.get("status") == 200, (recent, listed_page.log)
    assert sorted(
        (e["session_id"], e["event_type"], e["target"])
        for e in recent["body"]["events"]
    ) == [
        (sent["session_id"], "scroll-depth", "article"),
        (sent["session_id"], "view", "hero"),
    ]


def test_listed_origin_error_answer_is_readable(listed_page):
    invalid = listed_page.seen["invalid"]

    assert invalid.get("status") == 400, (invalid, listed_page.log)
    assert "session_id" in invalid["body"]["error"]


# --- From an origin that is not listed ---------------------------------------

@pytest.mark.parametrize("step", ["post", "recent", "invalid"])
def test_unlisted_origin_credentialed_reads_are_blocked(unlisted_page, step):
    assert unlisted_page.seen[step] == {"error": "TypeError: Failed to fetch"}


def test_unlisted_origin_blocks_are_cors_blocks(unlisted_page):
    # Chromium says why it refused, so a service that is merely down
    # (which also makes fetch fail with TypeError) cannot pass for CORS.
    blocked = [
        urlsplit(match.group(1)).path
        for match in map(CORS_BLOCK.match, unlisted_page.log) if match
    ]

    assert sorted(blocked) == ["/events", "/events", "/events/recent"]


def test_unlisted_origin_preflighted_post_is_not_stored(unlisted_page, db):
    # A refused preflight means the POST itself is never sent.  (The
    # beacon, a simple text/plain request, is sent and stored all the same:
    # CORS guards what a page may read, not what it may send.)
    session_id = unlisted_page.sent["batch"]["session_id"]

    assert stored_events(db, session_id) == []
