"""A small site that records page visits in the background.

Each page view answers at once; writing the visit (slow here on purpose) happens in a worker
thread of the same process, from a durable SQLite queue in the instance folder. Every tenth
visit of a page also queues a notification.

    flask --app examples/visits.py run --debug
    curl -s localhost:5000/pages/about; curl -s localhost:5000/visits   # see them recorded
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from flask import Flask, current_app, render_template_string

from flask_offload import Offload, current_job

offload = Offload()
log = logging.getLogger("visits")

PAGE = """<!doctype html>
<title>{{ slug }}</title>
<h1>{{ slug|title }}</h1>
<p>This page answered at once; its visit is recorded in the background
(job <code>{{ job_id }}</code>).</p>
<p>Pages: {% for page in pages %}<a href="/pages/{{ page }}">{{ page }}</a> {% endfor %}
 · <a href="/visits">visit counts</a></p>
"""
PAGES = ("home", "about", "blog")


def visits_db() -> sqlite3.Connection:
    os.makedirs(current_app.instance_path, exist_ok=True)
    db = sqlite3.connect(os.path.join(current_app.instance_path, "visits.db"), timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS visits (page TEXT PRIMARY KEY, count INTEGER)")
    return db


@offload.task
def record_visit(page: str) -> int:
    """The slow write the view no longer waits for."""
    time.sleep(0.2)
    with visits_db() as db:
        db.execute(
            "INSERT INTO visits VALUES (?, 1) ON CONFLICT (page) DO UPDATE SET count = count + 1",
            (page,),
        )
        (count,) = db.execute("SELECT count FROM visits WHERE page = ?", (page,)).fetchone()
    log.info("recorded visit %d of %s (job %s)", count, page, current_job.id)
    if count % 10 == 0:
        notify.delay(f"{page} has {count} visits")
    return int(count)


@offload.task(queue="default", priority=5)
def notify(message: str) -> None:
    """Stands in for an e-mail or a chat message."""
    log.warning("NOTIFICATION: %s", message)


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = Flask(__name__)
    app.config["OFFLOAD_URL"] = "sqlite:///visits-jobs.db"  # in the instance folder, its own
    app.config.from_prefixed_env()  # e.g. FLASK_OFFLOAD_WORKERS=4
    offload.init_app(app)

    @app.get("/")
    @app.get("/pages/<slug>")
    def page(slug: str = "home") -> str:
        job = record_visit.delay(slug)
        return render_template_string(PAGE, slug=slug, job_id=job.id, pages=PAGES)

    @app.get("/visits")
    def visits() -> dict[str, int]:
        with visits_db() as db:
            return dict(db.execute("SELECT page, count FROM visits ORDER BY page"))

    return app
