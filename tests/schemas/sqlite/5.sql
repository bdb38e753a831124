-- Flask-Offload's sqlite schema: the released migration that upgrades version 4 to 5
-- (src/flask_offload/backends/sqlite.py at f403d91). Frozen: tests build old databases from it.
DROP INDEX offload_jobs_done;
DROP INDEX offload_jobs_finished;
CREATE INDEX offload_jobs_finished ON offload_jobs (finished_at, task, state)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
