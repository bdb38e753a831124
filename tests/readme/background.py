"""The background-views block, on an app and extension like the "Use" section's: it answers
202 at once, and its job's URL answers the view's own response once it has run."""

import time

from flask import Flask

from flask_offload import Offload, current_job

offload = Offload()
app = Flask(__name__)
offload.init_app(app)

# README BLOCK

with app.test_client() as client:
    accepted = client.post("/reports")
    assert accepted.status_code == 202, accepted.status_code
    deadline = time.monotonic() + 30
    answer = client.get(accepted.headers["Location"])
    while answer.status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
        answer = client.get(accepted.headers["Location"])
assert (answer.status_code, answer.json) == (201, {"summary": "..."}), answer.data
