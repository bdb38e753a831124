"""The limits block: its tasks' keys are stored at enqueue, every job runs, and the rate-limited
task never starts more than 10 in any second (from the stored start times)."""

import os

from flask import Flask

# README BLOCK

app = Flask(__name__)
app.config.update(OFFLOAD_URL=f"sqlite:///{os.path.abspath('jobs.db')}", OFFLOAD_WORKERS=4)
offload.init_app(app)
with app.app_context():
    syncs = [sync_account.delay(account) for account in (1, 1, 1, 2)]
    calls = [call_partner_api.delay(n) for n in range(15)]
jobs = [job.wait(60) for job in syncs + calls]
assert {job.state for job in jobs} == {"succeeded"}, [job.error for job in jobs]
assert [job.limit_key for job in jobs[:4]] == ["account:1"] * 3 + ["account:2"]
assert {job.rate_key for job in jobs[4:]} == {""}
starts = sorted(job.started_at for job in jobs[4:])
assert max(sum(1 for s in starts if first <= s < first + 1) for first in starts) <= 10, starts
offload.runtime(app).stop(5)
