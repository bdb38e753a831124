"""A Flask-SQLAlchemy app that stores a row and enqueues the job that needs it, the way the
Flask Mega-Tutorial's RQ export does, in each of the ways Flask-Offload offers.

With ``EXPORTAPP_SHARED=1`` the job store is the app's own SQLite file (``OFFLOAD_URL`` is
``SQLALCHEMY_DATABASE_URI``), so ``connection=db.session`` can put the job in the app's
transaction; otherwise jobs live in a file of their own beside it (``EXPORTAPP_JOBS``), as
they do by default. Each view waits a little between the enqueue and the commit, so a job
that starts too early would find no row. ``EXPORTAPP_DB`` is the app's SQLite file.
"""

from __future__ import annotations

import os
import time

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_offload import Offload

db = SQLAlchemy()
offload = Offload()
RACE = 0.2  # seconds between enqueue and commit: ample for the pool to start a job


class Export(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str | None]
    status: Mapped[str] = mapped_column(default="pending")


@offload.task(name="exportapp.export")
def export(export_id: int) -> str:
    row = db.session.get(Export, export_id)
    if row is None:
        raise LookupError(f"export {export_id} is not in the database (yet?)")
    row.status = "done"
    db.session.commit()
    return row.status


def create_app() -> Flask:
    app = Flask(__name__)
    url = f"sqlite:///{os.environ['EXPORTAPP_DB']}"
    shared = os.environ.get("EXPORTAPP_SHARED") == "1"
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        OFFLOAD_URL=url if shared else f"sqlite:///{os.environ['EXPORTAPP_JOBS']}",
        OFFLOAD_WORKERS=2,
        OFFLOAD_POLL_INTERVAL=0.05,
    )
    db.init_app(app)
    with app.app_context():
        db.create_all()
    offload.init_app(app)

    def finish(export_row: Export) -> dict[str, object]:
        time.sleep(RACE)
        if request.args.get("rollback"):
            db.session.rollback()
        else:
            db.session.commit()
        return {"export": export_row.id, "job": export_row.job_id}

    @app.post("/exports/naive")
    def naive() -> dict[str, object]:
        row = Export()
        db.session.add(row)
        db.session.flush()
        row.job_id = export.delay(row.id).id  # before the commit: the race
        return finish(row)

    @app.post("/exports/id-first")
    def id_first() -> dict[str, object]:
        row = Export(job_id=offload.new_id())
        db.session.add(row)
        db.session.commit()  # the row exists before the job does
        export.enqueue(args=(row.id,), id=row.job_id)
        return {"export": row.id, "job": row.job_id}

    @app.post("/exports/after-commit")
    def after_commit() -> dict[str, object]:
        row = Export()
        db.session.add(row)
        db.session.flush()
        row.job_id = export.enqueue(args=(row.id,), after_commit=db.session).id
        return finish(row)

    @app.post("/exports/in-transaction")
    def in_transaction() -> dict[str, object]:
        row = Export()
        db.session.add(row)
        db.session.flush()
        row.job_id = export.enqueue(args=(row.id,), connection=db.session).id
        return finish(row)

    return app
