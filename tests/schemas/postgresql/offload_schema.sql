-- Flask-Offload's PostgreSQL version table as released (src/flask_offload/backends/postgres.py
-- at f403d91): one row per version applied. Frozen: tests build old databases from it.
CREATE TABLE IF NOT EXISTS offload_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
