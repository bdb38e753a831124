-- Flask-Offload's sqlite schema: the released migration that upgrades version 1 to 2
-- (src/flask_offload/backends/sqlite.py at f403d91). Frozen: tests build old databases from it.
ALTER TABLE offload_jobs ADD COLUMN claim TEXT;
