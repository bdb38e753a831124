"""The "Following your app's transaction" block, in a Flask-SQLAlchemy app whose job store is
its own SQLite file (the third way needs that): each way stores a job that finds its row."""

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_offload import Offload

db = SQLAlchemy()
offload = Offload()
app = Flask(__name__)
app.config.update(
    SQLALCHEMY_DATABASE_URI="sqlite:///app.db",
    OFFLOAD_URL="sqlite:///app.db",
    OFFLOAD_WORKERS=0,
)
db.init_app(app)
offload.init_app(app)


class Export(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str | None]


@offload.task
def export_posts(export_id: int) -> None: ...


context = app.app_context()
context.push()
db.create_all()

# README BLOCK

jobs = offload.runtime().backend.list_jobs(task=export_posts.name)
assert [job.args for job in jobs] == [[export.id]] * 3, [job.args for job in jobs]
assert job_id in {job.id for job in jobs}
assert db.session.get(Export, export.id).job_id == job_id
context.pop()
