"""The "Workflows and limits" block: a chain, a group with a callback, a job after the
group and a bulk enqueue, run by a real pool on a SQLite file; each ends as the README says."""

import tempfile

from flask import Flask

from flask_offload import Offload

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL=f"sqlite:///{tempfile.mkdtemp()}/jobs.db", OFFLOAD_WORKERS=2)
offload.init_app(app)
paths = ["/data/a.csv", "/data/bb.csv", "/data/ccc.csv"]
pages = [f"/page/{n}" for n in range(1000)]
removed: list[list[str]] = []


def download(url: str) -> str:
    return "/data/" + url.rsplit("/", 1)[-1]


def count_rows(path: str) -> int:
    return len(path)


@offload.task
def remove_files(files: list[str]) -> None:
    removed.append(files)


@offload.task
def record_visit(page: str) -> None:
    """A visit, recorded."""


context = app.app_context()
context.push()
offload.runtime().start()

# README BLOCK

assert pipeline.wait(30).state == "succeeded", pipeline.jobs
assert pipeline.result == len("/data/a.csv")
assert [job.task for job in pipeline.jobs] == [fetch.name, parse.name]
assert report.wait(30).results() == [len(path) for path in paths]
assert report.result == f"daily: {sum(len(path) for path in paths)} rows"
assert report.progress == (4, 4) and report.state == "succeeded"
assert offload.get_group(report.id).results() == report.results()
assert cleanup.wait(30).state == "succeeded" and removed == [paths]
offload.runtime().stop()
context.pop()
