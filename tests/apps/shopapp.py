"""A small shop whose tests (tests/test_testing_helpers.py) use ``flask_offload.testing``: an
order is stored by a view, which enqueues its receipt; the receipt task records it on the
order, and a flaky courier task fails once before it books the delivery."""

from __future__ import annotations

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_offload import Offload

db = SQLAlchemy()
offload = Offload()
courier_calls: list[int] = []


class Order(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    receipt_sent: Mapped[bool] = mapped_column(default=False)
    booked: Mapped[bool] = mapped_column(default=False)


@offload.task(queue="mail")
def send_receipt(order_id: int) -> str:
    order = db.session.get(Order, order_id)
    assert order is not None
    order.receipt_sent = True
    db.session.commit()
    book_courier.delay(order_id)  # a job that enqueues another
    return order.email


@offload.task(retries=2, retry_backoff=0)
def book_courier(order_id: int) -> None:
    courier_calls.append(order_id)
    if courier_calls.count(order_id) == 1:
        raise ConnectionError("the courier's API is down")
    order = db.session.get(Order, order_id)
    assert order is not None
    order.booked = True
    db.session.commit()


def create_app(config: dict[str, object]) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    db.init_app(app)
    offload.init_app(app)

    @app.post("/orders")
    def place_order() -> tuple[dict[str, int], int]:
        order = Order(email=request.form["email"])
        db.session.add(order)
        db.session.commit()
        send_receipt.delay(order.id)
        return {"id": order.id}, 201

    with app.app_context():
        db.create_all()
    return app
