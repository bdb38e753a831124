-- Flask-Offload's postgresql schema: the released migration that upgrades version 3 to 4
-- (src/flask_offload/backends/postgres.py at f403d91). Frozen: tests build old databases from it.
ALTER TABLE offload_jobs ADD COLUMN history_json text;
CREATE TABLE offload_queues (name text PRIMARY KEY, paused_at double precision NOT NULL);
-- Counts of finished jobs per task and state read this small index, not a million wide
-- rows (bench/dashboard.py). Task first and finished rows only, so no hot query (claim,
-- heartbeat, recover, purge) is tempted by it and claims never write it; each finish
-- writes one entry (the cost of a fast overview: see docs/benchmarks.md).
CREATE INDEX offload_jobs_done ON offload_jobs (task, state)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
