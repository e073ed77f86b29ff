"""Web-analytics ingestion service: engagement events into PostgreSQL.

Browsers on a content site batch engagement events (views, scroll depth,
dwell heartbeats, clicks) and post them here.  Each event is checked, given
an idempotency key and stored once, exactly as sent, in the append-only
table engagement_events: a TimescaleDB hypertable where the extension
exists, a plain PostgreSQL table where it does not.  The service is this
module and schema.sql, served by waitress and talking to the database
through psycopg2; it has no framework and no ORM.

Start it with ``python analytics.py``.  It reads the environment:

    DATABASE_HOST (localhost), DATABASE_PORT (5432), DATABASE_USER,
    DATABASE_PASSWORD, DATABASE_NAME (analytics)   the database
    CORS_ALLOW_ORIGINS   comma-separated origins whose pages may call it
    PORT (8000), THREADS (8)   where it listens, requests served at once
    DATABASE_WAIT_SECONDS (30)   how long start-up waits for the database

At start-up it waits for the database, applies schema.sql under an advisory
lock and logs where it listens and whether TimescaleDB is active.

Endpoints:

    POST /events          store a batch: 201 with counts, 4xx if unusable
    GET  /events/recent   newest events; ?limit=, site=, session_id=, type=
    GET  /health          200 when the database answers, 503 when not
    GET  /config          which database this instance uses, no secrets

Limitations: there is no authentication and no rate limit, so anyone who
can reach the port can post events; put it behind a proxy that decides
who may.  An event sent without ``at``, or whose ``at`` was outside the
clock window and replaced by the receipt time, is stored again when the
browser resends it, because its time is part of its identity.  Events
whose texts differ only where unstorable characters became U+FFFD are one
event.  When a JSON object repeats a key, the last value wins, as in
jsonb.  Numbers with a fraction or exponent are read as doubles, as a
browser writes them, so one with more digits than a double holds is
stored rounded, and 1 and 1.0 in meta are different events.  A body
nested deeper than Python's parser allows (about 900 levels) is refused
whole with 400, even when the depth is inside one event's meta.
received_at comes from this process's clock.  Waitress holds at most
CONNECTION_LIMIT client connections and closes idle ones after
IDLE_CONNECTION_SECONDS; against many slow clients on purpose
(slowloris), put a buffering proxy in front.  /health shares the server's
threads, so while all of them wait on a database that has stopped
answering it waits its turn (up to WORK_DEADLINE_SECONDS).
"""

import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

import psycopg2
import psycopg2.extensions
import waitress
import waitress.channel
import waitress.task
import waitress.wasyncore


# --- Limits and policy -------------------------------------------------------

#: Largest request body, counted after gzip is undone (the contract's 1 MiB).
MAX_BODY_BYTES = 1024 * 1024

#: Waitress refuses bodies past this before the application sees them
#: (JsonErrorTask words the answer).  The slack is for gzip, whose output
#: is slightly larger than incompressible input.
SERVER_BODY_CAP = MAX_BODY_BYTES + 64 * 1024

#: Most events in one batch; the provider flushes at 25.
MAX_EVENTS_PER_BATCH = 500

#: An event's meta as compact UTF-8 JSON, and its nesting (meta itself is 1).
MAX_META_BYTES = 16 * 1024
MAX_META_DEPTH = 32

#: site, session_id, type, reason and a client id.  site is indexed, and a
#: b-tree entry must stay under about 2,700 bytes.
MAX_NAME_CHARS = 256

#: target names an element or a URL, so it may be longer.
MAX_TARGET_CHARS = 2048

#: Longer than any ISO 8601 time a browser writes.
MAX_TIME_CHARS = 64

#: An event time outside this window around receipt comes from a broken
#: clock and is replaced by the receipt time.
MAX_CLOCK_AHEAD = timedelta(days=1)
MAX_CLOCK_BEHIND = timedelta(days=365)

#: GET /events/recent page sizes.
DEFAULT_RECENT_LIMIT = 25
MAX_RECENT_LIMIT = 1000

#: libpq's smallest connect timeout.  A host that drops packets costs this
#: much for each address it resolves to.
CONNECT_TIMEOUT_SECONDS = 2

#: Unacknowledged data on a pooled connection fails it after this long, so
#: a vanished host cannot hold a request for minutes of TCP retries.
TCP_USER_TIMEOUT_MS = 2500

#: Longest statement the database runs for us.
STATEMENT_TIMEOUT_MS = 5000

#: Longest wait for a lock (someone holding the table): one second, so that
#: a locked table gives quick 503s instead of threads stuck for the
#: statement timeout while /health queues behind them.
LOCK_TIMEOUT_MS = 1000

#: Work on a pooled connection that has not finished after this long has
#: its socket cut.  A host that stops answering while something still
#: acknowledges the bytes (a proxy in front of it, a frozen server) is seen
#: by neither the TCP user timeout nor the statement timeout.  A second
#: more than the statement timeout, so that the server reports its own.
WORK_DEADLINE_SECONDS = STATEMENT_TIMEOUT_MS / 1000 + 1

#: /health's deadline: it answers within about three seconds.
HEALTH_DEADLINE_SECONDS = 2.0

#: How often the watchdog looks for database calls past their deadline.
WATCHDOG_TICK_SECONDS = 0.1

#: A pooled connection that fails faster than this was stale (the server
#: restarted under it) and the work is retried once on a fresh connection;
#: a slower failure means the host is unreachable, where a retry only
#: doubles the wait.
STALE_FAILURE_SECONDS = 1.0

#: How long a request waits for a free connection before answering 503.
POOL_WAIT_SECONDS = 2.0

#: What a 503 tells clients to wait before trying again.
RETRY_AFTER_SECONDS = 2

#: How long browsers may cache a preflight answer.
CORS_MAX_AGE_SECONDS = 600

#: Open client connections waitress keeps (it stops accepting past this),
#: polled rather than select()ed so that more than 1024 descriptors work.
#: Browsers keep connections alive, so waitress's default of 100 is small.
CONNECTION_LIMIT = 1000

#: A connection that sends nothing for this long is closed.  Waitress's
#: default, 120 s, lets idle or trickling clients hold slots for minutes.
IDLE_CONNECTION_SECONDS = 30

#: How long SIGTERM waits for requests in flight before closing anyway.
SHUTDOWN_GRACE_SECONDS = 10

#: Key of the advisory lock that serialises schema.sql between instances.
SCHEMA_LOCK_KEY = 4_812_215_937

SCHEMA_PATH = Path(__file__).with_name("schema.sql")

logger = logging.getLogger("analytics")


@dataclass(frozen=True)
class Settings:
    """Configuration read from the environment once, at start-up."""

    database_host: str
    database_port: int
    database_user: str
    database_password: str
    database_name: str
    cors_allow_origins: tuple
    port: int
    threads: int
    database_wait_seconds: float

    @classmethod
    def from_environ(cls, environ):
        """Read settings from environ.

        Raises ValueError naming the variable when a number is not one or
        is out of range.
        """
        def number(name, default, convert, lowest, highest):
            text = environ.get(name, default)
            try:
                value = convert(text)
            except ValueError:
                value = math.nan
            if not lowest <= value <= highest:
                raise ValueError(
                    f"{name} must be a number from {lowest} to {highest}, "
                    f"not {text!r}."
                )
            return value

        origins = environ.get("CORS_ALLOW_ORIGINS", "")
        return cls(
            database_host=environ.get("DATABASE_HOST", "localhost"),
            database_port=number("DATABASE_PORT", "5432", int, 1, 65535),
            database_user=environ.get("DATABASE_USER", "analytics"),
            database_password=environ.get("DATABASE_PASSWORD", ""),
            database_name=environ.get("DATABASE_NAME", "analytics"),
            cors_allow_origins=tuple(
                o.strip().rstrip("/") for o in origins.split(",") if o.strip()
            ),
            port=number("PORT", "8000", int, 1, 65535),
            threads=number("THREADS", "8", int, 1, 1024),
            database_wait_seconds=number(
                "DATABASE_WAIT_SECONDS", "30", float, 0, 86400
            ),
        )

    def connect_kwargs(self):
        """Return psycopg2.connect arguments for this database."""
        kwargs = {
            "host": self.database_host,
            "port": self.database_port,
            "user": self.database_user,
            "dbname": self.database_name,
            "application_name": "analytics",
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "options": (
                f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={LOCK_TIMEOUT_MS} -c timezone=UTC"
            ),
        }
        if self.database_password:
            kwargs["password"] = self.database_password
        return kwargs


# --- Errors ------------------------------------------------------------------

class ApiError(Exception):
    """A request the service refuses, answered as {"error": message}."""

    # status and message are positional-only, so that extra may carry a
    # "status" field of its own (the 503 of GET /health does).
    def __init__(self, status, message, /, headers=(), **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        self.extra = extra


class DatabaseUnavailableError(Exception):
    """The database could not be reached, or did not answer in time."""


class DatabaseRefusedError(DatabaseUnavailableError):
    """The database refused a statement that should work (a revoked grant,
    a missing table): still a 503, but not worth retrying at once."""


# SQLSTATE classes that mean "the database is not there right now" rather
# than "this statement is wrong": connection exceptions, insufficient
# resources, operator intervention (shutdown, cancel) and system errors.
_OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57", "58")


def is_outage(exc):
    """Tell whether a psycopg2 error means the database is unavailable."""
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return True
    code = exc.pgcode or ""
    return code.startswith(_OUTAGE_SQLSTATE_CLASSES) or code == "25006"


def describe_type(value):
    """Name the JSON type of a parsed value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- Request bodies ----------------------------------------------------------

_JSON_CONTENT_TYPES = ("", "application/json", "text/plain")

# Text PostgreSQL cannot store: NUL, and surrogates, which after json has
# joined the valid pairs are all unpaired.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _parse_float(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError("a number overflows a double")
    return value


def _parse_int(text):
    # The largest double, about 1.8e308, has 309 digits, so 309 digits may
    # already overflow; int() would also balk at 4,300.
    if len(text) > 308 and math.isinf(float(text)):
        raise ValueError("a number overflows a double")
    return int(text)


_decoder = json.JSONDecoder(
    parse_float=_parse_float,
    parse_int=_parse_int,
    parse_constant=_refuse_constant,
)


def read_body(environ):
    """Return the request body as text: checked, decompressed and decoded."""
    content_type = environ.get("CONTENT_TYPE", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in _JSON_CONTENT_TYPES:
        raise ApiError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json or text/plain.",
        )

    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise ApiError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "Content-Encoding must be gzip or absent.",
        )

    try:
        declared = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       "Content-Length is not a number.")
    gzipped = encoding in ("gzip", "x-gzip")
    if declared > MAX_BODY_BYTES and not gzipped:
        raise _body_too_large()
    raw = environ["wsgi.input"].read(declared) if declared > 0 else b""

    if gzipped:
        raw = gunzip(raw)
    text = raw.decode("utf-8", "replace")
    return text[1:] if text.startswith("\ufeff") else text


def _body_too_large():
    return ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"The body is over the limit of {MAX_BODY_BYTES} bytes.",
        limit_bytes=MAX_BODY_BYTES,
    )


def gunzip(data):
    """Undo gzip, never inflating past MAX_BODY_BYTES."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error:
        raise ApiError(HTTPStatus.BAD_REQUEST, "The body is not valid gzip.")

    if len(out) > MAX_BODY_BYTES:
        raise _body_too_large()
    if not inflater.eof or inflater.unused_data:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "The gzip body is truncated or has data after its end.",
        )
    return out


def parse_json(text):
    """Parse JSON strictly and make every string storable."""
    try:
        doc = _decoder.decode(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"The body is not valid JSON: {e.msg} at line {e.lineno} "
            f"column {e.colno}.",
        )
    except ValueError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"The body is not valid JSON: {e}.")
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       "The body is nested too deeply.")

    # NUL and lone surrogates only arrive as \u escapes (invalid UTF-8 was
    # replaced while decoding), so most bodies skip the walk.
    if "\\u" in text:
        doc = scrub(doc)
    return doc


def storable(text):
    """Return text with what PostgreSQL cannot store replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def scrub(doc):
    """Make every string in doc storable, keys included."""
    if isinstance(doc, str):
        return storable(doc)
    if not isinstance(doc, (dict, list)):
        return doc

    # A loop rather than recursion: the parser allows deeper nesting than
    # Python's recursion limit leaves room for here.
    pending = [doc]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            fixed = {storable(k): v for k, v in node.items()}
            node.clear()
            node.update(fixed)
            items = node.items()
        else:
            items = enumerate(node)
        for key, value in list(items):
            if isinstance(value, str):
                node[key] = storable(value)
            elif isinstance(value, (dict, list)):
                pending.append(value)
    return doc


# --- Batches and events ------------------------------------------------------

# JSON text of one string, as json writes it: the C functions json itself
# calls, with UTF-8 kept and in ASCII.
_json_string = json.encoder.encode_basestring
_json_ascii_string = json.encoder.encode_basestring_ascii


def _json_encoder(**options):
    """Return a function that writes JSON as JSONEncoder(**options) does.

    JSONEncoder.encode builds a new C encoder on every call, which costs
    more than encoding a small value; this builds it once.  Parsed JSON
    has no cycles, so the cycle check is left out.
    """
    encoder = json.JSONEncoder(**options)
    if json.encoder.c_make_encoder is None:
        return encoder.encode
    chunks = json.encoder.c_make_encoder(
        None, encoder.default,
        _json_ascii_string if encoder.ensure_ascii else _json_string,
        encoder.indent, encoder.key_separator, encoder.item_separator,
        encoder.sort_keys, encoder.skipkeys, encoder.allow_nan,
    )
    return lambda value: "".join(chunks(value, 0))


# Compact and canonical: the same meta always gives the same text, so it can
# be part of an event's identity.
_canonical = _json_encoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":")
)


@dataclass
class Batch:
    """A usable batch: its own fields and its events, ready to insert."""

    site: str
    session_id: str
    reason: object
    received_at: datetime
    rows: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    adjusted: int = 0

    # What every event needs, worked out once: the batch's fields as JSON
    # for the events' keys, and the clock window around receipt.
    site_json: str = field(init=False)
    session_json: str = field(init=False)
    earliest: datetime = field(init=False)
    latest: datetime = field(init=False)

    def __post_init__(self):
        self.site_json = _json_string(self.site)
        self.session_json = _json_string(self.session_id)
        self.earliest = self.received_at - MAX_CLOCK_BEHIND
        self.latest = self.received_at + MAX_CLOCK_AHEAD


def check_text(field, value, limit):
    """Return what is wrong with a required text field, or None."""
    if value is None:
        return f"{field} is missing."
    if not isinstance(value, str):
        return f"{field} must be a string, not {describe_type(value)}."
    if not value.strip():
        return f"{field} is blank."
    if len(value) > limit:
        return f"{field} is longer than {limit} characters."
    return None


# Date.toISOString()'s shape, with any offset or none, and a space allowed
# for the T as RFC 3339 does.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?"
    r"([Zz]|[+-]\d{2}:\d{2})?",
    re.ASCII,
)


def parse_batch(doc, received_at):
    """Check a parsed body and prepare its events.

    Raises ApiError when the batch itself is unusable; events that are bad
    on their own are listed in Batch.rejected as {"index", "error"}.
    """
    if not isinstance(doc, dict):
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"The body must be a JSON object, not {describe_type(doc)}.",
        )

    site = doc.get("site")
    session_id = doc.get("session_id")
    reason = doc.get("reason")
    events = doc.get("events")
    problem = (
        check_text("site", site, MAX_NAME_CHARS)
        or check_text("session_id", session_id, MAX_NAME_CHARS)
    )
    if problem is None and reason is not None:
        if not isinstance(reason, str):
            problem = f"reason must be a string, not {describe_type(reason)}."
        elif len(reason) > MAX_NAME_CHARS:
            problem = f"reason is longer than {MAX_NAME_CHARS} characters."
    if problem:
        raise ApiError(HTTPStatus.BAD_REQUEST, problem)

    if not isinstance(events, list):
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            f"events must be an array, not {describe_type(events)}.",
        )
    if not events:
        raise ApiError(HTTPStatus.BAD_REQUEST, "events is empty.")
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise ApiError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"The batch has {len(events)} events; the limit is "
            f"{MAX_EVENTS_PER_BATCH}.",
            limit_events=MAX_EVENTS_PER_BATCH,
        )

    batch = Batch(site, session_id, reason, received_at)
    for index, event in enumerate(events):
        error = add_event(batch, event)
        if error:
            batch.rejected.append({"index": index, "error": error})
    return batch


def add_event(batch, event):
    """Append one event's row to batch.rows, or return what is wrong."""
    if not isinstance(event, dict):
        return f"The event must be a JSON object, not {describe_type(event)}."

    event_type = event.get("type")
    if event_type is None:
        event_type = event.get("event_type")
    target = event.get("target")
    client_id = event.get("id")
    problem = (
        check_text("type", event_type, MAX_NAME_CHARS)
        or check_text("target", target, MAX_TARGET_CHARS)
        or (client_id is not None
            and check_text("id", client_id, MAX_NAME_CHARS))
    )
    if problem:
        return problem

    # when: the client's clock if it parses and is believable
    at = event.get("at")
    if at is None:
        at = event.get("occurred_at")
    if at is None:
        occurred_at = batch.received_at
    else:
        occurred_at = parse_time(at)
        if occurred_at is None:
            return (
                "at must be an ISO 8601 time such as "
                "2024-05-17T18:43:22.318Z."
            )
        if not is_believable(occurred_at, batch):
            occurred_at = batch.received_at
            batch.adjusted += 1

    meta = event.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return f"meta must be an object, not {describe_type(meta)}."
    try:
        meta_json = _canonical(meta)
    except RecursionError:
        return f"meta is nested deeper than {MAX_META_DEPTH} levels."
    problem = check_meta(meta, meta_json)
    if problem:
        return problem

    key = event_key(batch, client_id, event_type, target, at, meta_json,
                    occurred_at)
    # In UTC: PostgreSQL refuses offsets past 15:59 (+20:00) that RFC 3339
    # and Python take.
    occurred_at = occurred_at.astimezone(timezone.utc)
    # The row as a JSON array: key, type, target, time, client id, and
    # meta, which is JSON already.
    client = "null" if client_id is None else _json_string(client_id)
    batch.rows.append(
        f'["{key}",{_json_string(event_type)},{_json_string(target)},'
        f'"{occurred_at.isoformat()}",{client},{meta_json}]'
    )
    return None


def parse_time(value):
    """Return an aware datetime for RFC 3339 text, or None if it is not.

    The shape is checked first: fromisoformat alone would also take week
    dates, bare dates and any character between date and time.
    """
    if not isinstance(value, str) or len(value) > MAX_TIME_CHARS:
        return None
    if not _RFC3339.fullmatch(value):
        return None
    try:
        # fromisoformat takes T and t but only an upper-case Z
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed


def is_believable(occurred_at, batch):
    """Tell whether a client time lies inside the batch's clock window."""
    try:
        return batch.earliest <= occurred_at <= batch.latest
    except OverflowError:
        # Year 1 or 9999 with an offset cannot even be compared.
        return False


# A number in exponent form, outside strings.  json writes floats below
# 1e-4 or from 1e16 that way, and jsonb writes them back out in full:
# 5e-324 as 326 characters.
_DIGIT_THEN_EXPONENT = re.compile(r"\d[eE]")
_STRING_OR_EXPONENT_NUMBER = re.compile(
    r'"(?:[^"\\]|\\.)*"|-?(\d+(?:\.\d+)?)[eE]([+-]?\d+)'
)


def check_meta(meta, meta_json):
    """Return what is wrong with an event's meta, or None.

    The size limit holds for meta as the database stores and serves it,
    so that a small body cannot become a huge /events/recent answer.
    """
    size = len(meta_json)
    if size > MAX_META_BYTES or not meta_json.isascii():
        size = len(meta_json.encode("utf-8"))
    if _DIGIT_THEN_EXPONENT.search(meta_json):
        for match in _STRING_OR_EXPONENT_NUMBER.finditer(meta_json):
            mantissa, exponent = match.groups()
            if exponent is not None:
                # at most "-0." and the digits, the exponent's places apart
                written_out = 3 + len(mantissa) + abs(int(exponent))
                size += written_out - len(match[0])
    if size > MAX_META_BYTES:
        return f"meta is {size} bytes as JSON; the limit is {MAX_META_BYTES}."

    # Counting brackets (strings included) is cheap and rules out most
    # metas; only the rest are walked.
    brackets = meta_json.count("{") + meta_json.count("[")
    if brackets > MAX_META_DEPTH and _deeper_than(meta, MAX_META_DEPTH):
        return f"meta is nested deeper than {MAX_META_DEPTH} levels."
    return None


def _deeper_than(value, levels):
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return False
    if levels == 0:
        return True
    return any(_deeper_than(child, levels - 1) for child in children)


def event_key(batch, client_id, event_type, target, at, meta_json,
              occurred_at):
    """Return the idempotency key of an event as 32 hex digits.

    A client id names the event by itself within its site.  Without one,
    the event is what it says: session, type, target, time as sent and
    meta in canonical form.  The digest of that follows occurred_at in
    milliseconds, as in a version 7 UUID, so that new keys sit together at
    the end of the unique index rather than all over it: on a table larger
    than the database's cache, a random key cost a page read and, after
    every checkpoint, a full-page write per event (issue 3).  The index is
    on key and occurred_at, so the time in the key changes nothing about
    which events are duplicates.
    """
    if client_id is not None:
        identity = f'["id",{batch.site_json},{_json_string(client_id)}]'
    else:
        # JSON of [kind, site, session, type, target, at, meta]: meta is
        # JSON already, and every string is storable, so UTF-8 takes it.
        at_json = "null" if at is None else _json_string(at)
        identity = (
            f'["event",{batch.site_json},{batch.session_json},'
            f"{_json_string(event_type)},{_json_string(target)},{at_json},"
            f"{meta_json}]"
        )
    digest = hashlib.blake2b(
        identity.encode("utf-8"), digest_size=10
    ).hexdigest()
    millis = (occurred_at - _EPOCH) // _MILLISECOND
    return f"{millis:012x}{digest}"


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)


# --- Database ----------------------------------------------------------------

class ConnectionPool:
    """At most `size` autocommit connections, opened on demand.

    A connection that fails with an outage error is closed, never reused.
    """

    def __init__(self, connect_kwargs, size):
        self.size = size
        self._connect_kwargs = connect_kwargs
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._open = 0
        self._watchdog = Watchdog()

    def run(self, work, deadline=WORK_DEADLINE_SECONDS):
        """Call work(cursor) on a pooled connection and return its result.

        Work still running after deadline seconds has its connection cut.
        Raises DatabaseUnavailableError when the database cannot do it.
        """
        if not self._slots.acquire(timeout=POOL_WAIT_SECONDS):
            raise DatabaseUnavailableError("no free database connection")
        try:
            conn, reused = self._checkout()
            started = time.monotonic()
            try:
                return self._call(conn, work, deadline)
            except DatabaseRefusedError:
                raise
            except DatabaseUnavailableError:
                elapsed = time.monotonic() - started
                if not reused or elapsed >= STALE_FAILURE_SECONDS:
                    raise
            # The server restarted under an idle connection, so the others
            # are dead too: drop them all and try once more on a new one.
            # Inserts are idempotent, so a repeat cannot store twice.
            self.close_idle()
            conn, _ = self._checkout()
            return self._call(conn, work, deadline)
        finally:
            self._slots.release()

    def stats(self):
        """Return (open connections, idle connections)."""
        with self._lock:
            return self._open, len(self._idle)

    def close_idle(self):
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()

    def _checkout(self):
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
            self._open += 1
        try:
            conn = psycopg2.connect(**self._connect_kwargs)
            conn.autocommit = True
        except psycopg2.Error as e:
            with self._lock:
                self._open -= 1
            raise DatabaseUnavailableError(first_line(e)) from e
        return conn, False

    def _call(self, conn, work, deadline):
        call = self._watchdog.watch(conn, deadline)
        try:
            with conn.cursor() as cursor:
                result = work(cursor)
        except psycopg2.Error as e:
            cut = self._watchdog.release(call)
            healthy = not cut and not is_outage(e)
            self._checkin(conn, healthy)
            if healthy:
                # The connection is fine but the database said no: worth an
                # operator's look, and a 503 for the client to retry later.
                logger.error("database refused a statement: %s",
                             first_line(e))
                raise DatabaseRefusedError(first_line(e)) from e
            if cut:
                raise DatabaseUnavailableError(
                    f"no answer within {deadline:g} s"
                ) from e
            raise DatabaseUnavailableError(first_line(e)) from e
        except BaseException:
            self._watchdog.release(call)
            self._checkin(conn, healthy=False)
            raise
        # Cut just as the work finished: the socket is gone all the same.
        self._checkin(conn, healthy=not self._watchdog.release(call))
        return result

    def _checkin(self, conn, healthy):
        idle = psycopg2.extensions.TRANSACTION_STATUS_IDLE
        reusable = not conn.closed and conn.info.transaction_status == idle
        if healthy and reusable:
            with self._lock:
                self._idle.append(conn)
            return
        with self._lock:
            self._open -= 1
        conn.close()


class Watchdog:
    """Cut the sockets of database calls that outlive their deadlines.

    libpq waits for an answer as long as its socket stays open.  One
    daemon thread looks over the calls in progress every tick and shuts
    down the socket of any that is late (without closing the descriptor,
    which libpq owns), so the waiting call fails at once and the pool
    discards the connection.
    """

    def __init__(self, tick=WATCHDOG_TICK_SECONDS):
        self._tick = tick
        self._lock = threading.Lock()
        self._calls = {}
        threading.Thread(target=self._run, name="db-watchdog",
                         daemon=True).start()

    def watch(self, conn, seconds):
        """Start the clock on a call; return the token to release it."""
        call = _WatchedCall(time.monotonic() + seconds, conn.fileno())
        with self._lock:
            self._calls[id(call)] = call
        return call

    def release(self, call):
        """Stop the clock; return whether the connection was cut."""
        with self._lock:
            self._calls.pop(id(call), None)
        return call.cut

    # TODO(a statement can run long after its answer is refused): cutting
    # the socket leaves the server process working until it next writes;
    # pg_cancel_backend would stop it at once.
    def _run(self):
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._calls.values() if c.deadline <= now]
                for call in late:
                    del self._calls[id(call)]
                    call.cut = True
                    _shut_down(call.fd)


@dataclass
class _WatchedCall:
    deadline: float
    fd: int
    cut: bool = False


def _shut_down(fd):
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def first_line(exc):
    """Return the first line of a driver error, for logs only."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Prepared once on each connection that inserts, so that the server parses
# and plans it once, not once per batch.  Parameters: site, session_id,
# reason, received_at, and the rows as one JSON array of [key, type,
# target, occurred_at, client id, meta].
PREPARE_INSERT_EVENTS_SQL = """
PREPARE insert_events (text, text, text, timestamptz, jsonb) AS
INSERT INTO engagement_events
    (event_key, site, session_id, event_type, target, occurred_at,
     received_at, meta, reason, client_id)
SELECT (e->>0)::uuid, $1, $2, e->>1, e->>2, (e->>3)::timestamptz, $4, e->5,
       $3, e->>4
FROM jsonb_array_elements($5) AS e
ON CONFLICT (event_key, occurred_at) DO NOTHING
"""

INSERT_EVENTS_SQL = """
EXECUTE insert_events (%(site)s, %(session_id)s, %(reason)s,
                       %(received_at)s, %(rows)s)
"""

# The database writes the JSON answer itself; the filters drop out of the
# plan when their parameter is null.
RECENT_EVENTS_SQL = """
SELECT coalesce(jsonb_agg(jsonb_build_object(
           'id', id, 'site', site, 'session_id', session_id,
           'event_type', event_type, 'target', target,
           'occurred_at', occurred_at, 'received_at', received_at,
           'meta', meta, 'reason', reason, 'client_id', client_id)
       ORDER BY received_at DESC, id DESC), '[]')::text
FROM (
    SELECT *
    FROM engagement_events
    WHERE (%(site)s::text IS NULL OR site = %(site)s)
      AND (%(session_id)s::text IS NULL OR session_id = %(session_id)s)
      AND (%(type)s::text IS NULL OR event_type = %(type)s)
    ORDER BY received_at DESC, id DESC
    LIMIT %(limit)s
) AS recent
"""

TIMESCALEDB_VERSION_SQL = """
SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'
"""

IS_HYPERTABLE_SQL = """
SELECT EXISTS (
    SELECT 1 FROM timescaledb_information.hypertables
    WHERE hypertable_name = 'engagement_events'
)
"""


# The pooled connections that have prepared insert_events.  A connection
# leaves the set when it is closed and collected.  Prepared on the first
# insert, not on connect: planning it takes a lock on the table, which
# /health (on a table someone holds locked) must not wait for.
_prepared_connections = weakref.WeakSet()


def insert_batch(pool, batch):
    """Store a batch's rows in one statement; return how many were new."""
    params = {
        "site": batch.site,
        "session_id": batch.session_id,
        "reason": batch.reason,
        "received_at": batch.received_at,
        "rows": f"[{','.join(batch.rows)}]",
    }

    def work(cursor):
        if cursor.connection not in _prepared_connections:
            cursor.execute(PREPARE_INSERT_EVENTS_SQL)
            _prepared_connections.add(cursor.connection)
        cursor.execute(INSERT_EVENTS_SQL, params)
        return cursor.rowcount

    return pool.run(work)


def wait_for_database(settings):
    """Connect within the configured time, logging each failed attempt.

    Returns the connection; raises DatabaseUnavailableError when time is up.
    """
    deadline = time.monotonic() + settings.database_wait_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return psycopg2.connect(**settings.connect_kwargs())
        except psycopg2.Error as e:
            reason = first_line(e)
        if time.monotonic() >= deadline:
            raise DatabaseUnavailableError(reason)
        logger.info("database not ready (attempt %d): %s", attempt, reason)
        time.sleep(1)


def apply_schema(conn):
    """Apply schema.sql in one locked transaction; return (mode, version).

    mode is "hypertable" or "table"; version is TimescaleDB's, or None.
    """
    schema = SCHEMA_PATH.read_text(encoding="utf-8")
    with conn, conn.cursor() as cursor:
        # Only warnings reach the log; "already exists, skipping" does not.
        cursor.execute("SET LOCAL client_min_messages = warning")
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cursor.execute(schema)
        cursor.execute(TIMESCALEDB_VERSION_SQL)
        row = cursor.fetchone()
        version = row[0] if row else None
        hypertable = False
        if version:
            cursor.execute(IS_HYPERTABLE_SQL)
            hypertable = cursor.fetchone()[0]
    for notice in conn.notices:
        logger.warning("schema.sql: %s", notice.strip())
    return ("hypertable" if hypertable else "table"), version


# --- CORS --------------------------------------------------------------------

class Cors:
    """Which page origins may call the service, and the headers they get."""

    def __init__(self, origins):
        self.origins = frozenset(origins) - {"*"}
        self.any_origin = "*" in origins

    def headers(self, origin):
        """Return the CORS headers for a request from origin."""
        if origin in self.origins:
            return [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Vary", "Origin"),
            ]
        if self.any_origin and origin:
            # Never with credentials: that would let any site read as the user.
            return [("Access-Control-Allow-Origin", "*"), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def preflight_headers(self, origin, methods):
        """Return the extra headers of a preflight answer."""
        if origin not in self.origins and not self.any_origin:
            return []
        return [
            ("Access-Control-Allow-Methods", ", ".join(methods)),
            ("Access-Control-Allow-Headers", "Content-Type, Content-Encoding"),
            ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS)),
        ]


# --- The application ---------------------------------------------------------

class AnalyticsApp:
    """The WSGI application: routing, handlers and the error boundary."""

    def __init__(self, settings, pool):
        self.settings = settings
        self.pool = pool
        self.cors = Cors(settings.cors_allow_origins)
        self.routes = {
            "/events": {"POST": self.handle_events_post},
            "/events/recent": {"GET": self.handle_recent_get},
            "/health": {"GET": self.handle_health_get},
            "/config": {"GET": self.handle_config_get},
        }

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        origin = environ.get("HTTP_ORIGIN")
        outcome = {}

        try:
            status, payload, headers = self.dispatch(environ, outcome)
        except ApiError as e:
            status, headers = e.status, e.headers
            payload = {"error": e.message, **e.extra}
        except DatabaseUnavailableError as e:
            logger.warning("database unavailable: %s", e)
            status = HTTPStatus.SERVICE_UNAVAILABLE
            payload = {"error": "The database is unavailable; try again."}
            headers = [("Retry-After", str(RETRY_AFTER_SECONDS))]
        except Exception:
            logger.exception("unhandled error in %s %s", method, clean(path))
            status, headers = HTTPStatus.INTERNAL_SERVER_ERROR, []
            payload = {"error": "Internal error; it has been logged."}

        if status == HTTPStatus.NO_CONTENT:
            body = b""
        elif isinstance(payload, bytes):
            body = payload
            headers.append(("Content-Type", "application/json"))
        else:
            body = json.dumps(payload).encode("utf-8")
            headers.append(("Content-Type", "application/json"))
        if status != HTTPStatus.NO_CONTENT:
            headers.append(("Content-Length", str(len(body))))
        headers.extend(self.cors.headers(origin))
        start_response(f"{status.value} {status.phrase}", headers)

        # refusals say why, so the log alone explains them
        elapsed_ms = (time.perf_counter() - started) * 1000
        why = f" error={payload['error']!r}" if status >= 400 else ""
        logger.info(
            "%s %s %d %.1fms stored=%d rejected=%d%s", method, clean(path),
            status, elapsed_ms, outcome.get("stored", 0),
            outcome.get("rejected", 0), why,
        )
        return [b""] if method == "HEAD" else [body]

    def dispatch(self, environ, outcome):
        """Route a request; return (status, payload, headers)."""
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        handlers = self.routes.get(path)
        if handlers is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "No such path.")

        allowed = list(handlers)
        if "GET" in handlers:
            allowed.append("HEAD")
        allowed.append("OPTIONS")

        # preflight: answered here, with no database work
        if method == "OPTIONS":
            headers = [("Allow", ", ".join(allowed))]
            if environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD"):
                headers += self.cors.preflight_headers(
                    environ.get("HTTP_ORIGIN"), allowed
                )
            return HTTPStatus.NO_CONTENT, None, headers

        handler = handlers.get("GET" if method == "HEAD" else method)
        if handler is None:
            raise ApiError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{clean(method)} is not allowed on {path}; use "
                f"{' or '.join(handlers)}.",
                headers=[("Allow", ", ".join(allowed))],
            )
        status, payload = handler(environ, outcome)
        return status, payload, []

    def handle_events_post(self, environ, outcome):
        """Store a batch of events.

        Body: {"site", "session_id", "reason"?, "events": [{"type" or
        "event_type", "target", "at" or "occurred_at"?, "meta"?, "id"?}]}.
        Answers 201 with {"inserted", "duplicates", "adjusted", "rejected"};
        400, 413 or 415 when the batch is unusable; 422 when no event is;
        503 when the database is unavailable.
        """
        received_at = datetime.now(timezone.utc)
        doc = parse_json(read_body(environ))
        batch = parse_batch(doc, received_at)
        outcome["rejected"] = len(batch.rejected)
        if not batch.rows:
            raise ApiError(
                HTTPStatus.UNPROCESSABLE_ENTITY,
                "No event in the batch is usable.",
                rejected=batch.rejected,
            )

        inserted = insert_batch(self.pool, batch)
        outcome["stored"] = inserted
        return HTTPStatus.CREATED, {
            "inserted": inserted,
            "duplicates": len(batch.rows) - inserted,
            "adjusted": batch.adjusted,
            "rejected": batch.rejected,
        }

    def handle_recent_get(self, environ, outcome):
        """List the newest stored events, newest received first.

        Query: limit (1 to 1000, default 25; larger is cut to 1000), and
        the filters site, session_id and type.  Answers 200 with
        {"events": [...]}, 400 for a bad limit, 503 without a database.
        """
        # Blank values kept, so that ?limit= is refused; a blank filter is
        # no filter.
        query = parse_qs(environ.get("QUERY_STRING", ""),
                         keep_blank_values=True)
        params = {
            name: storable(query[name][0])
            if query.get(name, [""])[0] else None
            for name in ("site", "session_id", "type")
        }
        params["limit"] = parse_limit(query.get("limit", [None])[0])

        def work(cursor):
            cursor.execute(RECENT_EVENTS_SQL, params)
            return cursor.fetchone()[0]

        events = self.pool.run(work)
        return HTTPStatus.OK, b'{"events": %s}' % events.encode("utf-8")

    def handle_health_get(self, environ, outcome):
        """Tell whether the database answers a query.

        Answers 200 {"status": "ok", "database": "ok", "timescaledb": ...}
        or 503 {"status": "unavailable", ...} within about three seconds.
        """
        def work(cursor):
            cursor.execute(TIMESCALEDB_VERSION_SQL)
            row = cursor.fetchone()
            return row[0] if row else None

        try:
            version = self.pool.run(work, deadline=HEALTH_DEADLINE_SECONDS)
        except DatabaseUnavailableError as e:
            logger.warning("health check failed: %s", e)
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "The database does not answer.",
                headers=[("Retry-After", str(RETRY_AFTER_SECONDS))],
                status="unavailable",
            )
        opened, idle = self.pool.stats()
        return HTTPStatus.OK, {
            "status": "ok",
            "database": "ok",
            "timescaledb": version is not None,
            "timescaledb_version": version,
            "pool": {"size": self.pool.size, "open": opened,
                     "in_use": opened - idle},
        }

    def handle_config_get(self, environ, outcome):
        """Say which database this instance uses, without credentials."""
        return HTTPStatus.OK, {
            "database": {
                "host": self.settings.database_host,
                "port": self.settings.database_port,
                "name": self.settings.database_name,
            },
            "cors_allow_origins": list(self.settings.cors_allow_origins),
            "limits": {
                "max_body_bytes": MAX_BODY_BYTES,
                "max_events_per_batch": MAX_EVENTS_PER_BATCH,
                "max_meta_bytes": MAX_META_BYTES,
                "max_meta_depth": MAX_META_DEPTH,
            },
        }


def parse_limit(value):
    """Return the page size for ?limit=, cut to MAX_RECENT_LIMIT."""
    if value is None:
        return DEFAULT_RECENT_LIMIT
    # ASCII digits only: int() would also take "+5", " 5", "1_0" and other
    # scripts' digits.  A long number is simply large.
    digits = value if re.fullmatch("[0-9]+", value, re.ASCII) else "0"
    limit = int(digits.lstrip("0")[:7] or "0")
    if limit < 1:
        raise ApiError(
            HTTPStatus.BAD_REQUEST,
            "limit must be a whole number of at least 1 (at most "
            f"{MAX_RECENT_LIMIT} events are returned).",
        )
    return min(limit, MAX_RECENT_LIMIT)


def clean(text, width=200):
    """Make client-controlled text safe for one log line."""
    return repr(text[:width])[1:-1]


# --- Start-up and shutdown ---------------------------------------------------

def make_server(app, settings):
    """Return a waitress server for app, bound to its port."""
    server = waitress.create_server(
        app,
        host="0.0.0.0",
        port=settings.port,
        threads=settings.threads,
        max_request_body_size=SERVER_BODY_CAP,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=IDLE_CONNECTION_SECONDS,
        asyncore_use_poll=True,
        ident="analytics",
    )
    # Waitress's own refusals (JsonErrorTask) need the CORS policy too;
    # server.application may be waitress's wrapper around app.
    server.channel_class = JsonErrorChannel
    server.cors = app.cors
    return server


def serve(server, app):
    """Serve until SIGTERM or SIGINT, then drain.

    On a signal the service stops accepting connections, lets the requests
    in flight finish and their answers go out (for up to
    SHUTDOWN_GRACE_SECONDS), then closes the pool.
    """
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())

    host, port = server.effective_host, server.effective_port
    logger.info("listening on http://%s:%s with %d threads",
                host, port, server.adj.threads)
    socket_map = server._map
    while not stopping.is_set():
        waitress.wasyncore.loop(timeout=0.5, map=socket_map, count=1)

    logger.info("stopping: no new connections, finishing requests")
    server.del_channel()
    server.socket.close()
    dispatcher = server.task_dispatcher
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while time.monotonic() < deadline and _busy(dispatcher, socket_map):
        waitress.wasyncore.loop(timeout=0.05, map=socket_map, count=1)
    dispatcher.shutdown(timeout=1)
    waitress.wasyncore.close_all(socket_map)
    app.pool.close_idle()
    logger.info("stopped")


class JsonErrorTask(waitress.task.ErrorTask):
    """Waitress's own refusals, answered like the service's.

    Waitress answers by itself what never reaches the application: a body
    over SERVER_BODY_CAP, a malformed request line or header.  The answer
    is JSON and carries the CORS headers, so a page can read it too.
    """

    def execute(self):
        error = self.request.error
        # A Transfer-Encoding waitress does not do is the client's doing,
        # not a fault of the server's: 400, not 501.
        status = HTTPStatus(error.code)
        if status == HTTPStatus.NOT_IMPLEMENTED:
            status = HTTPStatus.BAD_REQUEST
        if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            refusal = _body_too_large()
            payload = {"error": refusal.message, **refusal.extra}
        else:
            payload = {"error": f"The request is malformed: {error.body}."}
        body = json.dumps(payload).encode("utf-8")

        cors = self.channel.server.cors
        origin = self.request.headers.get("ORIGIN")
        self.status = f"{status.value} {status.phrase}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.response_headers.extend(cors.headers(origin))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        # A request line that did not parse leaves no command or path.
        logger.info("%s %s %d refused by waitress: %s",
                    clean(getattr(self.request, "command", None) or "-"),
                    clean(getattr(self.request, "path", None) or "-"),
                    status, error.body)


class JsonErrorChannel(waitress.channel.HTTPChannel):
    """A waitress connection whose own error answers are JsonErrorTask's."""

    error_task_class = JsonErrorTask


def _busy(dispatcher, socket_map):
    # A request is in flight while a task runs or waits, or while a channel
    # has a request parsed or answer bytes left to send.
    if dispatcher.active_count or dispatcher.queue:
        return True
    return any(
        getattr(channel, "requests", None)
        or getattr(channel, "total_outbufs_len", 0)
        for channel in list(socket_map.values())
    )


class LineHandler(logging.Handler):
    """Write each log line to a stream's descriptor in one write, unlocked.

    logging.StreamHandler holds a lock around every line, and the stream
    holds its own; under load the request threads queued on them, and the
    access line cost about a fifth of the service's CPU (issue 3).  One
    write(2) of one line is atomic on a pipe (up to PIPE_BUF bytes) and
    lands whole in a file, so no lock is needed to keep lines apart.
    """

    def __init__(self, stream):
        super().__init__()
        self.fd = stream.fileno()

    def handle(self, record):
        """Filter and emit the record, without taking the handler lock."""
        result = self.filter(record)
        if isinstance(result, logging.LogRecord):
            record = result
        if result:
            self.emit(record)
        return result

    def emit(self, record):
        """Write the formatted record and a newline."""
        try:
            line = self.format(record) + "\n"
            data = line.encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)


def main():
    """Start the service: settings, database, schema, then serve."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=[LineHandler(sys.stderr)],
    )
    # waitress warns "Task queue depth is N" whenever a request waits for a
    # free thread, which under load is most requests, and writes it from the
    # thread that runs the event loop.  Waiting is normal: it is not logged.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        settings = Settings.from_environ(os.environ)
    except ValueError as e:
        logger.error("bad setting: %s", e)
        return 2

    where = (f"{settings.database_host}:{settings.database_port}"
             f"/{settings.database_name} as {settings.database_user}")
    logger.info("database %s", where)
    try:
        conn = wait_for_database(settings)
    except DatabaseUnavailableError as e:
        logger.error("database %s did not answer within %g s (%s); exiting",
                     where, settings.database_wait_seconds, e)
        return 1
    pool = ConnectionPool(settings.connect_kwargs(), settings.threads)
    app = AnalyticsApp(settings, pool)
    try:
        mode, version = apply_schema(conn)
    finally:
        conn.close()

    if mode == "hypertable":
        logger.info("storage: TimescaleDB %s hypertable engagement_events",
                    version)
    else:
        logger.info("storage: plain table engagement_events (TimescaleDB %s)",
                    "installed but not used" if version else "not available")

    try:
        server = make_server(app, settings)
    except OSError as e:
        logger.error("cannot listen on port %d: %s; exiting",
                     settings.port, e.strerror or e)
        return 1
    serve(server, app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
