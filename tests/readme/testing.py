"""The test-configuration block: an app built from it runs its jobs in the test and writes
nothing in the instance folder."""

import os

from flask import Flask

from flask_offload import Offload, testing

# README BLOCK

offload = Offload()


@offload.task
def double(n: int) -> int:
    return n * 2


app = Flask(__name__)
app.config.from_object(TestingConfig)
offload.init_app(app)
with app.app_context():
    job = double.delay(21)
    [ran] = testing.run_jobs()
    assert ran.id == job.id and job.refresh().result == 42
assert not os.path.exists(app.instance_path), "the development job store is left alone"
