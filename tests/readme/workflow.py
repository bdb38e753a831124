"""The workflows block: a task that enqueues the next step at its end; both steps run, in
order, and the second gets the first's output."""

from flask import Flask

from flask_offload import Offload

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
assert offload.drain() == 2, "fetch, then the parse it enqueued"
[second] = offload.runtime().backend.list_jobs(task=parse.name)
assert second.args == ["/tmp/data.csv"] and second.state == "succeeded", second
assert first.refresh().state == "succeeded"
context.pop()
