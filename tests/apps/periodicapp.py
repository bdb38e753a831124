"""An app for the periodic-tick race: several copies of it share one SQLite file and each runs
a pool, so every copy's scheduler wakes at every tick; exactly one of them may enqueue it.

Configuration comes from the environment: ``PERIODICAPP_INSTANCE`` (the instance folder) and
``OFFLOADTEST_*`` for the app config (``OFFLOADTEST_OFFLOAD_URL=sqlite:////tmp/x/jobs.db``).

Run as ``python -m periodicapp``: prints ``ready`` once its pool runs, then idles until SIGTERM,
which exits through ``sys.exit`` so the pool drains at interpreter exit.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

from flask import Flask

from flask_offload import Offload

offload = Offload()


# Run as ``-m periodicapp`` this module is ``__main__``, so the task needs an explicit name.
@offload.periodic(every=1, name="periodicapp.tick")
def tick() -> int:
    return os.getpid()


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ["PERIODICAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)
    return app


def _exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit)
    application = create_app()
    while not offload.runtime(application).started:  # it starts once create_app has returned
        time.sleep(0.01)
    print("ready", os.getpid(), flush=True)
    while True:
        time.sleep(1)
