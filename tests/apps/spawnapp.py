"""A script-style app (``init_app`` at module level) that starts a ``multiprocessing`` child
with the spawn method: the child imports this script again, as ``__mp_main__``, and so runs
``init_app`` again; it must start no pool there.

Run as ``python -m spawnapp N SLEEP``: enqueues N jobs of jobapp's ``record`` task, starts the
child (which logs ``child 0 PID`` and lives three seconds), prints ``ready`` and idles.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time

from flask import Flask
from jobapp import log, offload, record

logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
app = Flask(__name__, instance_path=os.environ["JOBAPP_INSTANCE"])
app.config.from_prefixed_env("OFFLOADTEST")
offload.init_app(app)


def live_a_while() -> None:
    log(f"child 0 {os.getpid()}")
    time.sleep(3)


if __name__ == "__main__":
    count, sleep = int(sys.argv[1]), float(sys.argv[2])
    with app.app_context():
        for n in range(count):
            record.delay(n, sleep)
    multiprocessing.get_context("spawn").Process(target=live_a_while).start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
