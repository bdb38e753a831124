"""The transactional-enqueue block on PostgreSQL, with what Flask-SQLAlchemy would give it:
``db.session`` (a scoped session) and a mapped ``order``. The job is stored in the order's
transaction, with the order's id."""
# needs: postgres

import os
from types import SimpleNamespace

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from flask_offload import Offload

URL = os.environ["READMETEST_POSTGRES_URL"]
offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL=URL, OFFLOAD_WORKERS=0)
offload.init_app(app)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "readme_orders"
    id: Mapped[int] = mapped_column(primary_key=True)


engine = create_engine(URL)  # psycopg2, SQLAlchemy's default driver
Base.metadata.create_all(engine)
db = SimpleNamespace(session=scoped_session(sessionmaker(engine)))


@offload.task
def send_receipt(order_id: int) -> None: ...


order = Order()

# README BLOCK

[job] = offload.runtime().backend.list_jobs(task=send_receipt.name)
assert order.id is not None and job.args == [order.id], (order.id, job.args)
db.session.remove()
engine.dispose()
