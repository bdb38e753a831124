"""The migration guide's status hook: a job's status URL answers Celery's state names with
the task's progress meta."""

from flask import Flask

from flask_offload import Offload, current_job, testing

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
offload.init_app(app)


@offload.task
def resize(path: str) -> None:
    current_job.set_progress(3, total=10, message="resizing", meta={"file": path})


context = app.app_context()
context.push()

# README BLOCK

job = resize.delay("a.png")
client = app.test_client()
assert client.get(f"/offload/jobs/{job.id}").json == {"state": "PENDING"}
assert [ran.id for ran in testing.run_jobs()] == [job.id]
answer = client.get(f"/offload/jobs/{job.id}").json
assert answer == {"state": "SUCCESS", "file": "a.png"}, answer
context.pop()
