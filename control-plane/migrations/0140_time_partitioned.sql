-- Time-partitioned sensor_data and predictions (issue #17), migrated without downtime by
-- "expand, backfill, contract":
--
-- 1. This migration only changes catalog entries (milliseconds, lock_timeout bounded): the old
--    tables become sensor_data_legacy / predictions_legacy, and new tables with the same
--    columns take the old names, so every reader and writer (including a replica still running
--    the previous release, whose SQL names no key) keeps working. The new key is
--    (device_id, epoch, seq, ts): the partition column must be in every unique key, and ts is
--    the record's own timestamp, so a replayed record carries the same key and stays a no-op.
--    The tables are TimescaleDB hypertables (1-day chunks) when the extension can be loaded
--    here (installed, in shared_preload_libraries, and creatable by this role), else natively
--    range-partitioned by ts in 1-day partitions named <table>_pYYYYMMDD plus a DEFAULT
--    partition for rows outside them (kip creates partitions ahead; see telemetry::storage).
-- 2. The control plane moves the legacy rows over in batches (telemetry::storage), and while
--    a legacy table is not empty, ingest counts a replay of a legacy row as a duplicate.
-- 3. A later release drops the then empty *_legacy tables.
--
-- Rollups (1 minute, 1 hour: min, max, sum, count, last) are kip tables updated in the same
-- statement that inserts raw rows, from the rows actually inserted, so a replay changes
-- nothing there either (the Apache build of TimescaleDB has no continuous aggregates).

SET LOCAL lock_timeout = '10s';

ALTER TABLE sensor_data RENAME TO sensor_data_legacy;
ALTER INDEX sensor_data_pkey RENAME TO sensor_data_legacy_pkey;
ALTER INDEX sensor_data_org_device_metric_ts RENAME TO sensor_data_legacy_org_device_metric_ts;
ALTER TABLE predictions RENAME TO predictions_legacy;
ALTER INDEX predictions_pkey RENAME TO predictions_legacy_pkey;
ALTER INDEX predictions_org_device_machine_ts RENAME TO predictions_legacy_org_device_machine_ts;
ALTER INDEX predictions_org_ts RENAME TO predictions_legacy_org_ts;

-- Whether TimescaleDB can be used by this database: installed and preloaded.
CREATE FUNCTION kip_ts_timescaledb_loadable() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       AND current_setting('shared_preload_libraries') ~ '(^|,)\s*timescaledb\s*(,|$)'
$$;

DO $$
DECLARE
    hyper boolean := false;
BEGIN
    IF kip_ts_timescaledb_loadable() THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            hyper := true;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'TimescaleDB cannot be created in this database (%): native partitioning instead', SQLERRM;
        END;
    END IF;
    IF hyper THEN
        CREATE TABLE sensor_data (LIKE sensor_data_legacy INCLUDING DEFAULTS);
        CREATE TABLE predictions (LIKE predictions_legacy INCLUDING DEFAULTS);
    ELSE
        CREATE TABLE sensor_data (LIKE sensor_data_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (ts);
        CREATE TABLE predictions (LIKE predictions_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (ts);
    END IF;
    ALTER TABLE sensor_data ADD PRIMARY KEY (device_id, epoch, seq, ts);
    ALTER TABLE sensor_data ADD FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE;
    CREATE INDEX sensor_data_org_device_metric_ts ON sensor_data (org_id, device_id, machine, metric, ts);
    ALTER TABLE predictions ADD PRIMARY KEY (device_id, epoch, seq, ts);
    ALTER TABLE predictions ADD FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE;
    CREATE INDEX predictions_org_device_machine_ts ON predictions (org_id, device_id, machine, ts);
    CREATE INDEX predictions_org_ts ON predictions (org_id, ts, device_id, epoch, seq);
    IF hyper THEN
        PERFORM create_hypertable('sensor_data', 'ts', chunk_time_interval => interval '1 day',
                                  create_default_indexes => false);
        PERFORM create_hypertable('predictions', 'ts', chunk_time_interval => interval '1 day',
                                  create_default_indexes => false);
    ELSE
        CREATE TABLE sensor_data_default PARTITION OF sensor_data DEFAULT;
        CREATE TABLE predictions_default PARTITION OF predictions DEFAULT;
    END IF;
END $$;

-- Creates the 1-day partition of `parent` (natively range-partitioned on `col`) that holds the
-- UTC day `day`, moving that day's rows out of the DEFAULT partition `<parent>_default`;
-- returns false when it exists already or `parent` is not natively partitioned (a hypertable
-- makes its chunks itself). The parent is locked against writes (SHARE ROW EXCLUSIVE) for the
-- few statements that move the day's rows: an insert that had already opened the parent
-- would otherwise route a row of that day to the DEFAULT partition by the old partition
-- bounds and fail its new constraint. Inserts wait meanwhile (normally the DEFAULT partition
-- holds few rows of the day); lock order parent, then DEFAULT, like an insert's.
CREATE FUNCTION kip_ts_ensure_day(parent text, col text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := parent || '_p' || to_char(day, 'YYYYMMDD');
    deflt text := parent || '_default';
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass(parent)) IS DISTINCT FROM 'p' THEN
        RETURN false;
    END IF;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('LOCK TABLE %I IN SHARE ROW EXCLUSIVE MODE', parent);
    EXECUTE format('LOCK TABLE %I IN SHARE ROW EXCLUSIVE MODE', deflt);
    -- Another session may have made it while this one waited for the locks.
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', part, parent);
    -- Lets ATTACH skip its validation scan.
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I >= %L AND %I < %L)',
                   part, part || '_bounds', col, lo, col, hi);
    EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', deflt, col, col, part) USING lo, hi;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, part, lo, hi);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', part, part || '_bounds');
    RETURN true;
END $$;

-- Drops every 1-day partition (native) or chunk (hypertable) of `parent` that ends at or before
-- `cutoff`, and returns how many: retention by whole partitions, never row deletes. Rows in a
-- native DEFAULT partition are not touched (see kip_ts_ensure_day, which moves them out).
CREATE FUNCTION kip_ts_drop_before(parent text, cutoff timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    kind "char";
    part record;
    n integer := 0;
BEGIN
    SELECT relkind INTO kind FROM pg_class WHERE oid = to_regclass(parent);
    IF kind = 'p' THEN
        FOR part IN
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = to_regclass(parent)
               AND c.relname ~ ('^' || parent || '_p[0-9]{8}$')
             ORDER BY c.relname
        LOOP
            IF (to_date(right(part.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC' <= cutoff THEN
                EXECUTE format('DROP TABLE IF EXISTS %I', part.relname);  -- another replica may be first
                n := n + 1;
            END IF;
        END LOOP;
    ELSIF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE 'SELECT count(*)::integer FROM drop_chunks($1::regclass, older_than => $2)'
            INTO n USING parent, cutoff;
    END IF;
    RETURN n;
END $$;

-- How `parent` is stored: 'hypertable', 'native' (declarative partitions) or 'plain'.
CREATE FUNCTION kip_ts_layout(parent text) RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    kind "char";
    hyper boolean := false;
BEGIN
    SELECT relkind INTO kind FROM pg_class WHERE oid = to_regclass(parent);
    IF kind = 'p' THEN
        RETURN 'native';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = $1)'
            INTO hyper USING parent;
    END IF;
    RETURN CASE WHEN hyper THEN 'hypertable' ELSE 'plain' END;
END $$;

-- Rollups of sensor_data per device, machine and metric: 1-minute and 1-hour buckets (aligned
-- to 2000-01-01 UTC like the query API's date_bin). avg = sum / count; last is the value of the
-- reading with the greatest ts (last_ts).
CREATE TABLE sensor_rollup_1m (
    org_id    uuid NOT NULL,
    device_id uuid NOT NULL,
    machine   text NOT NULL,
    metric    text NOT NULL,
    bucket    timestamptz NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL,
    count     bigint NOT NULL CHECK (count > 0),
    last      double precision NOT NULL,
    last_ts   timestamptz NOT NULL,
    PRIMARY KEY (org_id, device_id, machine, metric, bucket),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX sensor_rollup_1m_device_bucket ON sensor_rollup_1m (org_id, device_id, bucket);

CREATE TABLE sensor_rollup_1h (LIKE sensor_rollup_1m INCLUDING ALL);
ALTER TABLE sensor_rollup_1h
    ADD FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE;

-- Raw-data retention per organisation (days); no row: kept without limit (and so is every
-- shared partition, see telemetry::storage).
CREATE TABLE telemetry_retention (
    org_id             uuid PRIMARY KEY REFERENCES organisations (id) ON DELETE CASCADE,
    raw_retention_days integer NOT NULL CHECK (raw_retention_days BETWEEN 1 AND 36500),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
