"""The "Coming from Celery or RQ" block: a job by name, progress with meta, a task that keeps
nothing once it succeeds, and the status URL in a Celery-shaped JSON."""

from flask import Flask

from flask_offload import Offload, current_job

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
offload.init_app(app)
context = app.app_context()
context.push()

# README BLOCK

[by_name] = offload.runtime().backend.list_jobs(task="app.tasks.export_posts")
assert by_name.args == [7]
job = resize.delay("a.png")
ping_job = ping.delay()
assert offload.runtime().run_due() == 2
assert offload.get_job(ping_job.id) is None, "result_ttl=0 keeps nothing"
assert job.refresh().progress["meta"] == {"file": "a.png"}
answer = app.test_client().get(f"/offload/jobs/{job.id}").json
assert answer == {"state": "SUCCEEDED", "info": {"file": "a.png"}}, answer
context.pop()
