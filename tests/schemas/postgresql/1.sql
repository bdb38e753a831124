-- Flask-Offload's postgresql schema: the released migration that creates version 1
-- (src/flask_offload/backends/postgres.py at f403d91). Frozen: tests build old databases from it.
CREATE TABLE offload_jobs (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id text NOT NULL UNIQUE,
    task text NOT NULL,
    queue text NOT NULL,
    priority integer NOT NULL,
    state text NOT NULL,
    args_json text NOT NULL,
    kwargs_json text NOT NULL,
    key text,
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    lost integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    run_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    worker text,
    lease_until double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    progress_json text,
    result_json text,
    error text,
    traceback text,
    owner_json text,
    ephemeral boolean NOT NULL DEFAULT false
);
-- A background view's request snapshot (cookies included) lives only until the job ends.
CREATE FUNCTION offload_forget_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.args_json := '[]';
    NEW.kwargs_json := '{}';
    RETURN NEW;
END
$$;
CREATE TRIGGER offload_jobs_forget_snapshot
    BEFORE UPDATE OF state ON offload_jobs FOR EACH ROW
    WHEN (NEW.ephemeral AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION offload_forget_snapshot();
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
CREATE TABLE offload_schedules (name text PRIMARY KEY, last_tick double precision NOT NULL);
-- One row per live worker process, renewed by its heartbeat.
CREATE TABLE offload_workers (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    queues_json text,
    tasks_json text NOT NULL,
    started_at double precision NOT NULL,
    last_seen double precision NOT NULL
);
