"""The workflows block: a task that enqueues the next step at its end; both steps run, in
order, and the second gets the first's output."""

from flask import Flask

from flask_offload import Offload, testing

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
offload.init_app(app)


def download(url: str) -> str:
    return f"/tmp/{url.rsplit('/', 1)[-1]}"


def count_rows(path: str) -> int:
    return len(path)


context = app.app_context()
context.push()

# README BLOCK

first = fetch.delay("https://example.com/data.csv")
ran = testing.run_jobs()
assert [job.task for job in ran] == [fetch.name, parse.name], "fetch, then the parse it enqueued"
assert ran[1].args == ["/tmp/data.csv"] and ran[1].state == "succeeded", ran[1]
assert ran[1].result == len("/tmp/data.csv") and first.refresh().state == "succeeded"
context.pop()
