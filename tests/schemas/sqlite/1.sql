-- Flask-Offload's sqlite schema: the released migration that creates version 1
-- (src/flask_offload/backends/sqlite.py at f403d91). Frozen: tests build old databases from it.
CREATE TABLE offload_jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    args_json TEXT NOT NULL,
    kwargs_json TEXT NOT NULL,
    key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lost INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    run_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    lease_until REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress_json TEXT,
    result_json TEXT,
    error TEXT,
    traceback TEXT,
    owner_json TEXT,
    ephemeral INTEGER NOT NULL DEFAULT 0
);
-- A background view's request snapshot (cookies included) lives only until the job ends.
CREATE TRIGGER offload_jobs_forget_snapshot
AFTER UPDATE OF state ON offload_jobs
WHEN NEW.ephemeral AND NEW.state IN ('succeeded', 'failed', 'cancelled')
BEGIN
    UPDATE offload_jobs SET args_json = '[]', kwargs_json = '{}' WHERE seq = NEW.seq;
END;
-- Claims read only queued rows, in claim order: finished rows never slow them down.
CREATE INDEX offload_jobs_claim ON offload_jobs (priority DESC, run_at, seq)
    WHERE state = 'queued';
-- Running rows are few: heartbeats and recovery scan this small index.
CREATE INDEX offload_jobs_lease ON offload_jobs (lease_until) WHERE state = 'running';
CREATE INDEX offload_jobs_finished ON offload_jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE UNIQUE INDEX offload_jobs_key ON offload_jobs (key)
    WHERE key IS NOT NULL AND state IN ('queued', 'running');
-- The last tick each periodic schedule enqueued: one run per tick across processes.
CREATE TABLE offload_schedules (name TEXT PRIMARY KEY, last_tick REAL NOT NULL);
-- One row per live worker process, renewed by its heartbeat.
CREATE TABLE offload_workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    queues_json TEXT,
    tasks_json TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
