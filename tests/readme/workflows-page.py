"""docs/workflows.md's blocks after the first, each on an app with that block's tasks (and a
group, for the block that reads one), run by a real pool on a SQLite file; each is checked
for what it stored."""

import tempfile

from flask import Flask

from flask_offload import Offload

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL=f"sqlite:///{tempfile.mkdtemp()}/jobs.db", OFFLOAD_WORKERS=2)
offload.init_app(app)


@offload.task
def resize(image_id: int, width: int = 800) -> str:
    return f"images/{image_id}-{width}.jpg"


@offload.task
def thumbnail(path: str) -> str:
    return path.replace(".jpg", "-thumb.jpg")


@offload.task
def publish(paths: list[str], album: str) -> int:
    return len(paths)


context = app.app_context()
context.push()
offload.runtime().start()
sizes = offload.group([resize.s(n) for n in range(10)], then=publish.s("summer"))

# README BLOCK

if "jobs" in globals():
    assert len(jobs) == 1000 and jobs[0].args == [0]
if "album" in globals():
    assert album.wait(30).state == "succeeded" and album.result == 1
    assert offload.get_job(first.id).state == "succeeded"
if "pipeline" in globals():
    assert pipeline.wait(30).result == "images/3-800-thumb.jpg"
if "same" in globals():
    assert same.result == 10 and same.results() == [f"images/{n}-800.jpg" for n in range(10)]
    assert same.state == "succeeded" and same.progress == (11, 11)
offload.runtime().stop()
context.pop()
