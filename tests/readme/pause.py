"""The pause block: the queue is paused, then claimed again."""

from flask import Flask

from flask_offload import Offload

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="sqlite:///jobs.db", OFFLOAD_WORKERS=0)
offload.init_app(app)


@offload.task(queue="emails")
def send(to: str) -> None: ...


context = app.app_context()
context.push()
job = send.delay("a@b.c")
backend = offload.runtime().backend
pause_queue = offload.pause_queue


def paused_then_checked(name: str) -> None:
    pause_queue(name)
    assert backend.paused_queues() == {name}
    assert offload.runtime().run_due() == 0, "a paused queue is not claimed"


offload.pause_queue = paused_then_checked  # type: ignore[method-assign]

# README BLOCK

assert backend.paused_queues() == set()
assert offload.runtime().run_due() == 1 and job.refresh().state == "succeeded"
context.pop()
