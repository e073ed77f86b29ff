-- Storage for the analytics ingestion service.
--
-- analytics.py runs this whole file in one transaction at every start, after
-- taking a transaction-level advisory lock, so it must stay idempotent and two
-- instances starting together apply it one after the other.  Where the
-- TimescaleDB extension can be created, engagement_events becomes a
-- hypertable on occurred_at; elsewhere it stays a plain table with the same
-- columns, indexes and rules.

-- TimescaleDB, when this server has it.  Having the package is not enough: the
-- library must also be in shared_preload_libraries, or CREATE EXTENSION fails.
-- Either way the failure is only reported, and the schema goes on without it.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions
               WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'timescaledb is installed but cannot be created: %',
                SQLERRM;
        END;
    END IF;
END
$$;

-- One row per stored event.  event_key is the idempotency key the service
-- computes (a digest of the client's id, or of the event's content); the
-- contract's fields are the rest.  Nothing here is ever updated.
CREATE TABLE IF NOT EXISTS engagement_events (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    event_key   uuid        NOT NULL,
    site        text        NOT NULL,
    session_id  text        NOT NULL,
    event_type  text        NOT NULL,
    target      text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    meta        jsonb       NOT NULL DEFAULT '{}',
    reason      text,
    client_id   text
);

-- The hypertable, partitioned on the event's own time.  migrate_data lets an
-- installation that started without TimescaleDB move its rows in later.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('engagement_events', 'occurred_at',
                                  if_not_exists => TRUE,
                                  migrate_data => TRUE);
    END IF;
END
$$;

-- Idempotency: one row per key and time.  TimescaleDB wants the partitioning
-- column in every unique index, hence occurred_at beside the key.
CREATE UNIQUE INDEX IF NOT EXISTS engagement_events_key_idx
    ON engagement_events (event_key, occurred_at);

-- GET /events/recent: newest received first.
CREATE INDEX IF NOT EXISTS engagement_events_received_idx
    ON engagement_events (received_at DESC, id DESC);

-- Analytics queries: one site over a time range.
CREATE INDEX IF NOT EXISTS engagement_events_site_time_idx
    ON engagement_events (site, occurred_at DESC);

-- Append-only: the database itself refuses to change or remove a stored
-- event.  TRUNCATE is a different statement and stays possible for tests.
CREATE OR REPLACE FUNCTION engagement_events_refuse_change()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'engagement_events is append-only: % is not allowed',
        TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE OR REPLACE TRIGGER engagement_events_append_only
    BEFORE UPDATE OR DELETE ON engagement_events
    FOR EACH ROW EXECUTE FUNCTION engagement_events_refuse_change();
