"""Throughput benchmark for the analytics service, with its two ceilings.

Starts the service (``python analytics.py``) against a scratch database
created beside the configured one, drives POST /events with wrk and a Lua
script that sends a fresh provider-shaped batch on every request, and
prints events per second, latency p50/p99, the service's peak memory,
the events acknowledged against the events stored (they must be equal),
the CPU time per event of the service and of its database connections,
and the latency of GET /events/recent over sequential requests.

In the same run it measures two ceilings on this machine and gives the
service's figure as a share of each:

    (a) the database alone: the same batches inserted through psycopg2
        from as many threads as wrk has connections, by four methods (one
        statement expanding JSON on the server, the same prepared,
        execute_values, and COPY); the fastest is the ceiling;
    (b) the HTTP layer alone: waitress with the service's thread count
        answering the same requests after json.loads, with no database.

From the CPU time per event of each ceiling (the waitress process, and the
database server processes running the service's own statement) it works
out a bound: all cores spent on those two halves alone, with nothing for
checks, keys, the driver or wrk.  No service built of these two parts can
go faster on this machine.

With ``--rows N`` the service is measured twice: on the empty table, and
again after N events spread over the last 300 days have been loaded, so
insert throughput and GET /events/recent latency can be compared.

Usage (with the project's virtualenv active, from the repository):

    python bench.py                        # 25 events, 16 connections, 15 s
    python bench.py --rows 10000000        # also on a table of 10M events
    python bench.py --service /tmp/copy/analytics.py --no-ceilings

The database comes from DATABASE_HOST, DATABASE_PORT, DATABASE_USER,
DATABASE_PASSWORD and DATABASE_NAME, as for the service and the tests; the
role needs CREATEDB.  wrk must be on PATH (Debian package wrk).  The exit
status is 1 when an acknowledged count differs from the stored count or a
request failed, 0 otherwise; targets are reported, not enforced.

Limitations: wrk, the service and PostgreSQL share the machine, so every
figure includes their competition for its cores; repeat runs and compare
figures from one run.  The database ceiling uses made-up keys, so it does
not pay for hashing, and COPY does not check for duplicates.
"""

import argparse
import http.client
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import psycopg2.extras

import analytics
# The tests' own helpers: where the database is (DATABASE_*, with no
# statement timeout, which a bulk load would run into) and a free port.
from test_analytics import database_params, free_port


# --- Settings and targets ---------------------------------------------------

HERE = Path(__file__).resolve().parent

#: The provider flushes at 25 events; the issue measures 16 connections.
DEFAULT_BATCH_SIZE = 25
DEFAULT_CONNECTIONS = 16
DEFAULT_DURATION_SECONDS = 15

#: The service's own default THREADS, used for the HTTP ceiling too.
DEFAULT_SERVICE_THREADS = 8

#: wrk threads driving the connections.  Each costs a core's share that
#: the service and PostgreSQL then lack, so keep it small.
WRK_THREADS = 2

#: After the measured window, requests in flight get this long to come
#: back before wrk stops, so every stored batch has been acknowledged.
DRAIN_SECONDS = 2

#: Seconds of load before each measurement of the service, so that its
#: pool is full and its caches are warm.
WARM_UP_SECONDS = 2

#: The origin the requests come from, as a browser on the site sends it.
ORIGIN = "http://localhost:5173"

#: Sequential GET /events/recent requests per latency measurement.
RECENT_REQUESTS = 1000

#: Events loaded per INSERT ... SELECT with --rows, and their time span.
LOAD_CHUNK_ROWS = 1_000_000
LOAD_SPAN_DAYS = 300

#: How long the service gets to start before the benchmark gives up.
START_TIMEOUT_SECONDS = 30

#: The issue's targets for batches of 25 on 16 connections.
TARGET_EVENTS_PER_SECOND = 32_000
TARGET_P99_MS = 25.0
TARGET_PEAK_MEMORY_MB = 80.0
TARGET_LOADED_SHARE = 0.90
TARGET_RECENT_MEDIAN_MS = 5.0

#: The four kinds of event in every batch, in turn: type, target, meta.
#: Event i of a batch fills %d with 4 * i (depth) or 5 * i (seconds), as
#: the Lua script does.
EVENT_KINDS = (
    ("view", "hero", '{"ratio":0.75}'),
    ("scroll-depth", "article", '{"depth":%d}'),
    ("dwell", "article", '{"seconds":%d,"visible":true}'),
    ("interaction", "cta-signup", '{"kind":"click","label":"Start"}'),
)

SITES = ("press-docs", "press-blog")


# --- The wrk script ---------------------------------------------------------

# Each wrk thread runs this in a Lua state of its own; setup() and done()
# run in the main state, which reaches the threads' counters through the
# thread objects.  After the window, delay() holds every connection back
# so that wrk stops with nothing in flight.
LUA_SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clock_id, bench_timespec *ts);
]]
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(0, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local BATCH = {batch_size}
local NONCE = "{nonce}"
local SITES = {{"press-docs", "press-blog"}}

local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

function init(args)
  window = tonumber(args[1])
  acked, created, failed, sent = 0, 0, 0, 0
  first, last, deadline = nil, nil, nil
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Origin"] = "{origin}"
end

local second, second_text = -1, ""

local function iso(t)
  local whole = math.floor(t)
  if whole ~= second then
    second, second_text = whole, os.date("!%Y-%m-%dT%H:%M:%S", whole)
  end
  return string.format("%s.%03dZ", second_text,
                       math.floor((t - whole) * 1000))
end

local function event(i, t)
  local kind = i % 4
  local at = iso(t)
  if kind == 0 then
    return '{{"type":"view","target":"hero","meta":{{"ratio":0.75}},' ..
           '"at":"' .. at .. '"}}'
  elseif kind == 1 then
    return '{{"type":"scroll-depth","target":"article",' ..
           '"meta":{{"depth":' .. (4 * i) .. '}},' ..
           '"at":"' .. at .. '"}}'
  elseif kind == 2 then
    return '{{"type":"dwell","target":"article",' ..
           '"meta":{{"seconds":' .. (5 * i) .. ',"visible":true}},' ..
           '"at":"' .. at .. '"}}'
  end
  return '{{"type":"interaction","target":"cta-signup",' ..
         '"meta":{{"kind":"click","label":"Start"}},"at":"' .. at .. '"}}'
end

-- 0 ms until the window closes, then longer than wrk will run.
function delay()
  local t = now()
  if deadline == nil then
    first, deadline = t, t + window
  end
  if t >= deadline then
    return 3600000
  end
  return 0
end

function request()
  sent = sent + 1
  local t = now()
  local events = {{}}
  for i = 1, BATCH do
    events[i] = event(i, t - (BATCH - i) * 0.04)
  end
  local body = string.format(
    '{{"site":"%s","session_id":"%s-%04x-4000-8000-%012x",' ..
    '"reason":"capacity","events":[%s]}}',
    SITES[sent % 2 + 1], NONCE, thread_id, sent,
    table.concat(events, ","))
  return wrk.format(nil, nil, nil, body)
end

-- Only a 201 acknowledges events: its "inserted" count.
function response(status, headers, body)
  if status == 201 then
    created = created + 1
    acked = acked + tonumber(body:match('"inserted":%s*(%d+)'))
  else
    failed = failed + 1
  end
  last = now()
end

function done(summary, latency, requests)
  local acked, created, failed = 0, 0, 0
  local first, last = math.huge, 0
  for _, thread in ipairs(threads) do
    acked = acked + thread:get("acked")
    created = created + thread:get("created")
    failed = failed + thread:get("failed")
    first = math.min(first, thread:get("first") or math.huge)
    last = math.max(last, thread:get("last") or 0)
  end
  local errors = summary.errors
  io.write(string.format(
    "BENCH acked=%d created=%d failed=%d window=%.6f " ..
    "p50_us=%d p99_us=%d max_us=%d socket_errors=%d timeouts=%d\n",
    acked, created, failed, last - first,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(99)),
    math.floor(latency.max),
    errors.connect + errors.read + errors.write, errors.timeout))
end
"""


def write_lua_script(directory, batch_size):
    """Write the wrk script for this run; return its path."""
    text = LUA_SCRIPT.format(
        batch_size=batch_size,
        nonce=secrets.token_hex(4),
        origin=ORIGIN,
    )
    path = Path(directory) / f"batches-{secrets.token_hex(4)}.lua"
    path.write_text(text, encoding="utf-8")
    return path


def run_wrk(url, script, connections, duration):
    """Drive POST url for duration seconds; return the script's figures.

    The figures are a dict: acked, created (201 answers), failed (other
    answers), window (seconds from the first request to the last
    answer), p50_us, p99_us, max_us, socket_errors and timeouts.
    """
    command = [
        "wrk", "--latency", "--timeout", "10s",
        "-t", str(min(WRK_THREADS, connections)),
        "-c", str(connections),
        "-d", f"{duration + DRAIN_SECONDS}s",
        "-s", str(script), url, "--", str(duration),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"^BENCH (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise RuntimeError(
            f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    figures = {}
    for pair in match.group(1).split():
        name, value = pair.split("=")
        figures[name] = float(value) if "." in value else int(value)
    if not figures["created"]:
        raise RuntimeError(f"no request succeeded:\n{done.stdout}")
    figures["events_per_second"] = figures["acked"] / figures["window"]
    return figures


# --- Processes: the service and the HTTP ceiling ----------------------------

class Process:
    """A server started as a subprocess, logging into a file."""

    def __init__(self, command, env, log_path):
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self):
        """Wait until the server accepts connections; fail if it exits."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.proc.args} exited with {self.proc.returncode}; "
                    f"see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.proc.args} did not start in time")

    def cpu_seconds(self):
        """Return the CPU time the process has used, all threads."""
        return process_cpu_seconds(self.proc.pid)

    def peak_memory_mb(self):
        """Return the process's peak resident memory (VmHWM) in MB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kilobytes = int(re.search(r"^VmHWM:\s+(\d+)", status, re.M)[1])
        return kilobytes / 1024

    def stop(self):
        """Send SIGTERM and wait; kill it if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def process_cpu_seconds(pid):
    """Return user plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(service, dbname, threads, log_dir):
    """Start the service against dbname; return it once it listens."""
    params = database_params(dbname)
    env = dict(os.environ)
    env.update({
        "DATABASE_HOST": params["host"],
        "DATABASE_PORT": str(params["port"]),
        "DATABASE_USER": params["user"],
        "DATABASE_PASSWORD": params["password"],
        "DATABASE_NAME": dbname,
        "CORS_ALLOW_ORIGINS": ORIGIN,
        "PORT": str(free_port()),
        "THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    })
    log_path = Path(log_dir) / "service.log"
    command = [sys.executable, str(service)]
    return Process(command, env, log_path).wait_ready()


def start_http_ceiling(threads, log_dir):
    """Start this file's waitress-only server; return it once it listens."""
    env = dict(os.environ, PORT=str(free_port()))
    command = [sys.executable, __file__, "--serve-http-ceiling",
               "--threads", str(threads)]
    log_path = Path(log_dir) / "http-ceiling.log"
    return Process(command, env, log_path).wait_ready()


def serve_http_ceiling(threads):
    """Answer POST /events like the service, after json.loads, no database.

    Runs in the subprocess that start_http_ceiling starts; only it needs
    waitress.
    """
    import logging
    import waitress

    # Requests wait for a thread most of the time; not worth a log line.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        doc = json.loads(environ["wsgi.input"].read(length))
        body = json.dumps({
            "inserted": len(doc["events"]),
            "duplicates": 0,
            "adjusted": 0,
            "rejected": [],
        }).encode("utf-8")
        start_response("201 Created", [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
        ])
        return [body]

    waitress.serve(app, host="127.0.0.1", port=int(os.environ["PORT"]),
                   threads=threads, _quiet=True)


# --- The database ceiling ---------------------------------------------------

COLUMNS = ("event_key, site, session_id, event_type, target, occurred_at, "
           "received_at, meta, reason, client_id")

# The service's form: one statement per batch, the rows as one JSON array
# expanded on the server.
JSON_INSERT_SQL = f"""
INSERT INTO engagement_events ({COLUMNS})
SELECT (e->>0)::uuid, %(site)s, %(session_id)s, e->>1, e->>2,
       (e->>3)::timestamptz, %(received_at)s, e->5, %(reason)s, e->>4
FROM jsonb_array_elements(%(rows)s::jsonb) AS e
ON CONFLICT (event_key, occurred_at) DO NOTHING
"""

# The service's own statement, prepared once per connection as it does.
PREPARE_JSON_INSERT_SQL = analytics.PREPARE_INSERT_EVENTS_SQL
EXECUTE_JSON_INSERT_SQL = analytics.INSERT_EVENTS_SQL

VALUES_INSERT_SQL = f"""
INSERT INTO engagement_events ({COLUMNS}) VALUES %s
ON CONFLICT (event_key, occurred_at) DO NOTHING
"""

VALUES_TEMPLATE = ("(%s::uuid, %s, %s, %s, %s, %s::timestamptz, %s, "
                   "%s::jsonb, %s, %s)")

COPY_SQL = f"COPY engagement_events ({COLUMNS}) FROM STDIN"


class BatchMaker:
    """Batches shaped like the wrk script's, for one inserting thread.

    Every batch has a session and keys of its own; the texts that do not
    change are built once, so the thread spends its time in the database.
    Keys are shaped like the service's: the time in milliseconds, then
    random digits where the service has a digest.
    """

    def __init__(self, thread_id, batch_size):
        self.prefix = f"{secrets.token_hex(4)}-{thread_id:04x}"
        self.count = 0
        received_at = datetime.now(timezone.utc)
        self.millis = int(received_at.timestamp() * 1000)
        self.events = []
        for i in range(1, batch_size + 1):
            event_type, target, meta = EVENT_KINDS[i % 4]
            if "%d" in meta:
                meta = meta % (4 * i if i % 4 == 1 else 5 * i)
            at = received_at - timedelta(seconds=(batch_size - i) * 0.04)
            self.events.append((event_type, target, at.isoformat(), meta))

    def next(self):
        """Return (site, session_id, received_at, [(key, event)...])."""
        self.count += 1
        session_id = f"{self.prefix}-4000-8000-{self.count:012x}"
        digits = os.urandom(10 * len(self.events)).hex()
        keys = [f"{self.millis:012x}{digits[20 * i:20 * i + 20]}"
                for i in range(len(self.events))]
        site = SITES[self.count % 2]
        received_at = datetime.now(timezone.utc)
        return site, session_id, received_at, list(zip(keys, self.events))


def json_params(batch):
    """Return the parameters of the JSON forms for a batch."""
    site, session_id, received_at, events = batch
    rows = ",".join(
        f'["{key}","{event_type}","{target}","{at}",null,{meta}]'
        for key, (event_type, target, at, meta) in events
    )
    return {
        "site": site, "session_id": session_id, "reason": "capacity",
        "received_at": received_at, "rows": f"[{rows}]",
    }


def insert_json(cursor, batch):
    """Insert a batch in one statement that expands a JSON array."""
    cursor.execute(JSON_INSERT_SQL, json_params(batch))
    return cursor.rowcount


def insert_prepared(cursor, batch):
    """Insert a batch with the prepared form of insert_json."""
    cursor.execute(EXECUTE_JSON_INSERT_SQL, json_params(batch))
    return cursor.rowcount


def insert_values(cursor, batch):
    """Insert a batch with execute_values: one row of parameters each."""
    site, session_id, received_at, events = batch
    rows = [
        (key, site, session_id, event_type, target, at, received_at, meta,
         "capacity", None)
        for key, (event_type, target, at, meta) in events
    ]
    psycopg2.extras.execute_values(
        cursor, VALUES_INSERT_SQL, rows, template=VALUES_TEMPLATE,
        page_size=len(rows),
    )
    return cursor.rowcount


def insert_copy(cursor, batch):
    """Insert a batch with COPY (which cannot skip duplicates)."""
    site, session_id, received_at, events = batch
    stamp = received_at.isoformat()
    lines = "".join(
        f"{key}\t{site}\t{session_id}\t{event_type}\t{target}\t{at}\t"
        f"{stamp}\t{meta}\tcapacity\t\\N\n"
        for key, (event_type, target, at, meta) in events
    )
    cursor.copy_expert(COPY_SQL, io.StringIO(lines))
    return len(events)


#: name, label, insert(cursor, batch), SQL to run on each new connection.
INSERT_METHODS = (
    ("json", "one statement expanding JSON", insert_json, None),
    ("prepared", "the same, prepared", insert_prepared,
     PREPARE_JSON_INSERT_SQL),
    ("values", "execute_values", insert_values, None),
    ("copy", "COPY, no duplicate check", insert_copy, None),
)


def measure_database(dbname, method, threads, batch_size, duration):
    """Insert batches from `threads` connections.

    Returns (events/s, CPU microseconds per event of the server processes
    serving those connections).
    """
    _, _, insert, prepare = method
    connections, backends = [], []
    for _ in range(threads):
        conn = psycopg2.connect(**database_params(dbname))
        conn.autocommit = True
        with conn.cursor() as cursor:
            if prepare:
                cursor.execute(prepare)
            cursor.execute("SELECT pg_backend_pid()")
            backends.append(cursor.fetchone()[0])
        connections.append(conn)

    totals = [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def work(index):
        maker = BatchMaker(index, batch_size)
        with connections[index].cursor() as cursor:
            start.wait()
            while time.monotonic() < deadline[0]:
                totals[index] += insert(cursor, maker.next())

    workers = [threading.Thread(target=work, args=(i,))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    cpu = sum(process_cpu_seconds(pid) for pid in backends)
    began = time.monotonic()
    deadline[0] = began + duration
    start.wait()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - began
    cpu = sum(process_cpu_seconds(pid) for pid in backends) - cpu

    for conn in connections:
        conn.close()
    events = max(sum(totals), 1)
    return events / elapsed, cpu / events * 1e6


# --- Scratch database and bulk load -----------------------------------------

def create_database():
    """Create a scratch database beside the configured one; return it."""
    name = f"analytics_bench_{secrets.token_hex(6)}"
    admin = psycopg2.connect(**database_params())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return name


def drop_database(name):
    """Drop the scratch database, even with connections still open."""
    admin = psycopg2.connect(**database_params())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def stored_count(db):
    """Return how many events the table holds."""
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM engagement_events")
        return cursor.fetchone()[0]


def truncate(db):
    """Empty the table."""
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE engagement_events")


# One chunk of stored events: four sites, sessions of 25 events a few
# seconds apart, session start times spread over the span by a hash.
LOAD_SQL = f"""
INSERT INTO engagement_events
    (event_key, site, session_id, event_type, target, occurred_at,
     received_at, meta, reason)
SELECT md5(%(nonce)s || g)::uuid,
       (ARRAY['press-docs', 'press-blog', 'press-shop', 'press-help'])
           [1 + g / 25 %% 4],
       md5(%(nonce)s || 'session' || g / 25)::uuid::text,
       (ARRAY['view', 'scroll-depth', 'dwell', 'interaction'])[1 + g %% 4],
       (ARRAY['hero', 'article', 'article', 'cta-signup'])[1 + g %% 4],
       t, t + interval '1 second',
       (ARRAY['{{"ratio": 0.75}}', '{{"depth": 50}}',
              '{{"seconds": 30, "visible": true}}',
              '{{"kind": "click", "label": "Start"}}'])[1 + g %% 4]::jsonb,
       'interval'
FROM generate_series(%(first)s::bigint, %(last)s) AS g
CROSS JOIN LATERAL (
    SELECT now() - make_interval(
        secs => (g / 25 * 2654435761 %% {LOAD_SPAN_DAYS * 86400})
                + g %% 25 * 3) AS t
) AS times
"""


def load_rows(db, rows):
    """Store `rows` events quickly: indexes dropped, loaded, rebuilt.

    Returns the seconds it took.
    """
    began = time.monotonic()
    nonce = secrets.token_hex(4)
    with db.cursor() as cursor:
        cursor.execute("""
            SELECT indexname, indexdef FROM pg_indexes
            WHERE tablename = 'engagement_events'
        """)
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')

        for first in range(1, rows + 1, LOAD_CHUNK_ROWS):
            last = min(first + LOAD_CHUNK_ROWS - 1, rows)
            cursor.execute(LOAD_SQL,
                           {"nonce": nonce, "first": first, "last": last})
            print(f"  loaded {last:,} of {rows:,} "
                  f"({time.monotonic() - began:.0f} s)", flush=True)

        cursor.execute("SET maintenance_work_mem = '512MB'")
        for name, definition in indexes:
            cursor.execute(definition)
            print(f"  rebuilt {name} ({time.monotonic() - began:.0f} s)",
                  flush=True)
        cursor.execute("VACUUM (ANALYZE) engagement_events")
        try:
            cursor.execute("CHECKPOINT")
        except psycopg2.Error:
            pass  # only superusers and pg_checkpoint may; noise, not harm
    return time.monotonic() - began


# --- Measuring the service --------------------------------------------------

def measure_recent(url, requests=RECENT_REQUESTS):
    """Time sequential GET /events/recent; return (median, p99) in ms."""
    address = url.removeprefix("http://")
    conn = http.client.HTTPConnection(address, timeout=10)
    timings = []
    for _ in range(requests):
        began = time.perf_counter()
        conn.request("GET", "/events/recent?limit=25")
        answer = conn.getresponse()
        body = answer.read()
        timings.append((time.perf_counter() - began) * 1000)
        if answer.status != 200 or b'"events"' not in body:
            raise RuntimeError(f"/events/recent answered {answer.status}")
    conn.close()
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.99)]


def backend_cpu_seconds(db, dbname):
    """Return the CPU time of the service's database connections.

    Counts connections that are open now, so call it while the pool is
    full, and only as a difference.
    """
    with db.cursor() as cursor:
        cursor.execute("""
            SELECT pid FROM pg_stat_activity
            WHERE datname = %s AND application_name = 'analytics'
        """, (dbname,))
        pids = [pid for pid, in cursor.fetchall()]
    return sum(process_cpu_seconds(pid) for pid in pids), frozenset(pids)


def measure_service(service, db, args, script):
    """Run wrk against the service; return its figures with the counts.

    Beside wrk's figures: stored (events the table gained), the CPU time
    per event of the service and of its database connections, and the
    latency of GET /events/recent.
    """
    # warm up: fill the pool and the caches
    run_wrk(f"{service.url}/events", script, args.connections,
            WARM_UP_SECONDS)

    before = stored_count(db)
    service_cpu = service.cpu_seconds()
    backend_cpu, backends = backend_cpu_seconds(db, db.info.dbname)
    figures = run_wrk(f"{service.url}/events", script, args.connections,
                      args.duration)
    figures["stored"] = stored_count(db) - before
    service_cpu = service.cpu_seconds() - service_cpu
    backend_after, backends_after = backend_cpu_seconds(db, db.info.dbname)
    if backends_after == backends:
        backend_cpu = backend_after - backend_cpu
    else:
        backend_cpu = None  # the pool opened connections during the run
    events = max(figures["acked"], 1)
    figures["service_us"] = service_cpu / events * 1e6
    figures["backend_us"] = (None if backend_cpu is None
                             else backend_cpu / events * 1e6)
    figures["recent_median_ms"], figures["recent_p99_ms"] = (
        measure_recent(service.url)
    )
    return figures


def measure_ceilings(args, dbname, db, script, work_dir):
    """Measure and print both ceilings; return {name: (label, events/s)}."""
    print(f"\nceiling (a): the database alone, {args.connections} threads "
          f"through psycopg2, no HTTP", flush=True)
    rates, cpu = {}, {}
    for method in INSERT_METHODS:
        name, label = method[:2]
        rates[name], cpu[name] = measure_database(
            dbname, method, args.connections, args.batch_size, args.duration
        )
        truncate(db)
        print(f"  {label:<34} {rates[name]:>12,.0f} events/s"
              f"   {cpu[name]:5.1f} us CPU/event in PostgreSQL", flush=True)
    fastest = max(rates, key=rates.get)
    print(f"  ceiling: {fastest:<25} {rates[fastest]:>12,.0f} events/s")

    print(f"\nceiling (b): HTTP alone, waitress with {args.threads} threads, "
          f"json.loads, no database", flush=True)
    server = start_http_ceiling(args.threads, work_dir)
    try:
        server_cpu = server.cpu_seconds()
        http = run_wrk(f"{server.url}/events", script, args.connections,
                       args.duration)
        server_cpu = server.cpu_seconds() - server_cpu
    finally:
        server.stop()
    http_us = server_cpu / max(http["acked"], 1) * 1e6
    print(f"  {'events/s':<34} {http['events_per_second']:>12,.0f}")
    print(f"  {'latency p50 / p99':<34} {http['p50_us'] / 1000:>9.1f} ms"
          f" / {http['p99_us'] / 1000:.1f} ms")
    print(f"  {'CPU per event, waitress process':<34} {http_us:>9.1f} us")

    # The service does both halves on the same cores: even if it did
    # nothing else (no checks, no keys, no driver, no wrk beside it), it
    # could not go faster than all cores spent on their CPU alone.
    cores = os.cpu_count()
    bound = cores / (http_us + cpu["prepared"]) * 1e6
    print(f"\nbound: {cores} cores / (waitress {http_us:.1f} us + "
          f"PostgreSQL {cpu['prepared']:.1f} us per event, the service's "
          f"statement)\n  {'events/s at most':<34} {bound:>12,.0f}")

    return {
        "database": (f"database ceiling ({fastest})", rates[fastest]),
        "http": ("HTTP ceiling", http["events_per_second"]),
        "bound": ("bound from the ceilings' CPU", bound),
    }


# --- Report -----------------------------------------------------------------

def print_service(title, figures):
    """Print one run of the service."""
    equal = "equal" if figures["acked"] == figures["stored"] else "DIFFERENT"
    print(f"\n{title}")
    print(f"  events/s            {figures['events_per_second']:>12,.0f}")
    print(f"  latency p50         {figures['p50_us'] / 1000:>12.1f} ms")
    print(f"  latency p99         {figures['p99_us'] / 1000:>12.1f} ms"
          f"   (max {figures['max_us'] / 1000:.1f} ms)")
    print(f"  answers 201         {figures['created']:>12,}"
          f"   (other {figures['failed']}, socket errors "
          f"{figures['socket_errors']}, timeouts {figures['timeouts']})")
    print(f"  events acknowledged {figures['acked']:>12,}")
    print(f"  events stored       {figures['stored']:>12,}   {equal}")
    backend = ("n/a" if figures["backend_us"] is None
               else f"{figures['backend_us']:.1f} us")
    print(f"  CPU per event       {figures['service_us']:>12.1f} us"
          f" service, {backend} database connections")
    print(f"  /events/recent      {figures['recent_median_ms']:>12.2f} ms"
          f" median, {figures['recent_p99_ms']:.2f} ms p99"
          f" ({RECENT_REQUESTS} sequential)")


def print_targets(empty, loaded, peak_mb):
    """Print each target of the issue with the figure and a verdict."""
    checks = [
        (f"events/s >= {TARGET_EVENTS_PER_SECOND:,}",
         f"{empty['events_per_second']:,.0f}",
         empty["events_per_second"] >= TARGET_EVENTS_PER_SECOND),
        (f"latency p99 <= {TARGET_P99_MS:g} ms",
         f"{empty['p99_us'] / 1000:.1f} ms",
         empty["p99_us"] / 1000 <= TARGET_P99_MS),
        (f"peak memory <= {TARGET_PEAK_MEMORY_MB:g} MB",
         f"{peak_mb:.1f} MB", peak_mb <= TARGET_PEAK_MEMORY_MB),
    ]
    for name, figures in (("empty", empty), ("loaded", loaded)):
        if figures is not None:
            checks.append((f"acknowledged == stored ({name})",
                           f"{figures['acked']:,} / {figures['stored']:,}",
                           figures["acked"] == figures["stored"]))
    if loaded is not None:
        share = loaded["events_per_second"] / empty["events_per_second"]
        checks += [
            (f"loaded events/s >= {TARGET_LOADED_SHARE:.0%} of empty",
             f"{share:.0%}", share >= TARGET_LOADED_SHARE),
            (f"loaded /events/recent median < "
             f"{TARGET_RECENT_MEDIAN_MS:g} ms",
             f"{loaded['recent_median_ms']:.2f} ms",
             loaded["recent_median_ms"] < TARGET_RECENT_MEDIAN_MS),
        ]

    print("\ntargets")
    for name, value, met in checks:
        print(f"  {name:<40} {value:>20}   {'met' if met else 'MISSED'}")


# --- Main -------------------------------------------------------------------

def parse_args(argv):
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Benchmark POST /events against its two ceilings."
    )
    parser.add_argument("--batch-size", type=int,
                        default=DEFAULT_BATCH_SIZE,
                        help="events per request (default %(default)s)")
    parser.add_argument("--connections", type=int,
                        default=DEFAULT_CONNECTIONS,
                        help="keep-alive connections, and threads of the "
                             "database ceiling (default %(default)s)")
    parser.add_argument("--duration", type=int,
                        default=DEFAULT_DURATION_SECONDS,
                        help="seconds per measurement (default %(default)s)")
    parser.add_argument("--threads", type=int,
                        default=DEFAULT_SERVICE_THREADS,
                        help="the service's THREADS, and the HTTP ceiling's "
                             "(default %(default)s)")
    parser.add_argument("--rows", type=int, default=0,
                        help="also measure after loading this many events")
    parser.add_argument("--keep-db", action="store_true",
                        help="keep the scratch database at the end")
    parser.add_argument("--service", type=Path,
                        default=HERE / "analytics.py",
                        help="the service to start (default %(default)s)")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="measure the service only")
    parser.add_argument("--serve-http-ceiling", action="store_true",
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    if args.serve_http_ceiling:
        serve_http_ceiling(args.threads)
        return 0
    if shutil.which("wrk") is None:
        print("bench: wrk is not on PATH (apt-get install wrk)")
        return 2

    dbname = create_database()
    work_dir = tempfile.mkdtemp(prefix="bench-")
    service = None
    try:
        service = start_service(args.service, dbname, args.threads, work_dir)
        db = psycopg2.connect(**database_params(dbname))
        db.autocommit = True
        script = write_lua_script(work_dir, args.batch_size)
        print(f"bench: {args.service}, database {dbname}\n"
              f"  {args.batch_size} events a batch, {args.connections} "
              f"connections, {args.duration} s a run, service threads "
              f"{args.threads}, wrk threads {WRK_THREADS}", flush=True)

        ceilings = {}
        if not args.no_ceilings:
            ceilings = measure_ceilings(args, dbname, db, script, work_dir)

        empty = measure_service(service, db, args, script)
        print_service("service, empty table", empty)
        for name, (label, rate) in ceilings.items():
            print(f"  share of {label:<34} "
                  f"{empty['events_per_second'] / rate:>6.0%}")

        loaded = None
        if args.rows:
            print(f"\nloading {args.rows:,} events", flush=True)
            seconds = load_rows(db, args.rows)
            print(f"  loaded in {seconds:.0f} s; table holds "
                  f"{stored_count(db):,} events", flush=True)
            loaded = measure_service(service, db, args, script)
            print_service(f"service, {args.rows:,} events loaded", loaded)
            share = loaded["events_per_second"] / empty["events_per_second"]
            print(f"  share of empty-table events/s       {share:>6.0%}")

        peak_mb = service.peak_memory_mb()
        print(f"\nservice peak memory (VmHWM) {peak_mb:.1f} MB")
        print_targets(empty, loaded, peak_mb)
        db.close()
    finally:
        if service is not None:
            service.stop()
        if args.keep_db:
            print(f"\nkept database {dbname}; service log in {work_dir}")
        else:
            drop_database(dbname)
            shutil.rmtree(work_dir, ignore_errors=True)

    runs = [f for f in (empty, loaded) if f is not None]
    broken = any(f["acked"] != f["stored"] or f["failed"]
                 or f["socket_errors"] for f in runs)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
