"""The job-control block, on an extension like the "Use" section's (no pool, so its jobs stay
queued to be looked at)."""

from flask import Flask

from flask_offload import Offload

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_WORKERS=0)
offload.init_app(app)

# README BLOCK

jobs = offload.runtime().backend.list_jobs(task=sync_account.name)
assert len(jobs) == 4, jobs
assert {job.queue for job in jobs} == {"default", "urgent"}
assert max(job.run_at for job in jobs) == datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()
assert [job.key for job in jobs].count("sync-7") == 1
assert refresh_cache.name in offload._tasks
