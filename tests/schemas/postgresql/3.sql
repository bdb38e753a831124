-- Flask-Offload's postgresql schema: the released migration that upgrades version 2 to 3
-- (src/flask_offload/backends/postgres.py at f403d91). Frozen: tests build old databases from it.
ALTER TABLE offload_jobs ADD COLUMN expires_at double precision;
CREATE INDEX offload_jobs_expires ON offload_jobs (expires_at) WHERE expires_at IS NOT NULL;
