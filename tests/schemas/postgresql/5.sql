-- Flask-Offload's postgresql schema: the released migration that upgrades version 4 to 5
-- (src/flask_offload/backends/postgres.py at f403d91). Frozen: tests build old databases from it.
ALTER TABLE offload_jobs ADD COLUMN trace_json text;
