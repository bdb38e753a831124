"""A slow report built in the background, with a progress bar.

The button posts to a background view, which answers ``202 Accepted`` at once with the job's
URL; the page polls that URL, fills the bar from the job's progress, and shows the report when
the URL answers with the view's own response.

    flask --app examples/reports.py run
"""

from __future__ import annotations

import time

from flask import Flask, request

from flask_offload import Offload, current_job

offload = Offload()

PAGE = """<!doctype html>
<title>Reports</title>
<style>
  body { font-family: sans-serif; margin: 3em; }
  progress { width: 20em; height: 1.5em; }
</style>
<h1>Sales report</h1>
<p><button id="start">Build the report</button></p>
<p><progress id="bar" max="100" value="0"></progress> <span id="percent">0%</span>
   <span id="message"></span></p>
<pre id="result"></pre>
<script>
const bar = document.getElementById("bar");
const percent = document.getElementById("percent");
const message = document.getElementById("message");
const result = document.getElementById("result");

function show(progress) {
  if (!progress || !progress.total) return;
  const value = Math.round(100 * progress.current / progress.total);
  bar.value = value;
  percent.textContent = value + "%";
  message.textContent = progress.message;
}

async function poll(url) {
  const answer = await fetch(url);
  if (answer.status === 202) {
    show((await answer.json()).progress);
    setTimeout(() => poll(url), 200);
    return;
  }
  const report = await answer.json();
  show({current: 1, total: 1, message: "done"});
  result.textContent = answer.ok ? report.summary : "failed: " + report.error;
}

document.getElementById("start").addEventListener("click", async () => {
  result.textContent = "";
  const steps = new URLSearchParams(location.search).get("steps") || "10";
  const started = await fetch("/reports?steps=" + steps, {method: "POST"});
  poll(started.headers.get("Location"));
});
</script>
"""


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["OFFLOAD_URL"] = "sqlite:///reports-jobs.db"  # in the instance folder, its own
    app.config.from_prefixed_env()
    offload.init_app(app)

    @app.get("/")
    def index() -> str:
        return PAGE

    @app.post("/reports")
    @offload.background
    def build_report() -> dict[str, object]:
        steps = int(request.args.get("steps", 10))
        for step in range(1, steps + 1):
            time.sleep(0.2)  # stands in for a slow query
            current_job.set_progress(step, total=steps, message=f"section {step} of {steps}")
        return {"summary": f"Report ready: {steps} sections, 1,234 sales"}

    return app
