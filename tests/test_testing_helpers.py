"""``flask_offload.testing`` as a user's tests use it, on tests/apps/shopapp.py: each mode
(inline, manual, the real pool), the enqueue assertions, and jobs run by ``run_jobs()`` in the
test's app context, so the test sees their writes on objects it already loaded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from conftest import HERE, wait_until
from flask_offload import Offload, testing
from flask_offload.testing import Harness

sys.path.insert(0, str(HERE / "apps"))
import shopapp
from shopapp import Order, book_courier, db, send_receipt


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """The shop in its test configuration: its own database file, jobs in memory."""
    shopapp.courier_calls.clear()
    app = shopapp.create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'shop.db'}",
            "OFFLOAD_URL": "memory://",
        }
    )
    yield app
    with app.app_context():
        db.engine.dispose()


def place_order(app: Flask) -> int:
    answer = app.test_client().post("/orders", data={"email": "ann@example.com"})
    assert answer.status_code == 201
    return int(answer.json["id"])  # type: ignore[index]


def test_inline_runs_each_job_at_delay(app: Flask, offload_inline: Harness) -> None:
    order_id = place_order(app)
    with app.app_context():
        order = db.session.get(Order, order_id)
        assert order is not None and order.receipt_sent and order.booked
        assert offload_inline.enqueued_jobs() == [], "inline stores only finished jobs"
    assert shopapp.courier_calls == [order_id, order_id], "failed once, retried at once"
    with app.app_context():
        order = Order(email="bob@example.com")
        db.session.add(order)
        db.session.commit()
        assert not order.receipt_sent  # loaded into the test's session
        send_receipt.delay(order.id)
        assert order.receipt_sent, "run in the test's context: seen without expire_all()"


def test_manual_stores_until_run_jobs_runs_them_in_the_tests_context(
    app: Flask, offload_manual: Harness
) -> None:
    order_id = place_order(app)
    with app.app_context():
        [job] = offload_manual.assert_enqueued(send_receipt, args=[order_id])
        assert job.queue == "mail" and job.state == "queued"
        offload_manual.refute_enqueued(send_receipt, args=[order_id + 1])
        offload_manual.refute_enqueued(book_courier)
        order = db.session.get(Order, order_id)
        assert order is not None and not order.receipt_sent
        ran = offload_manual.run_jobs()
        # the receipt, then the job it enqueued, failed once and retried (due at once)
        assert [(j.task, j.state, j.attempts) for j in ran] == [
            (send_receipt.name, "succeeded", 1),
            (book_courier.name, "succeeded", 2),
        ]
        assert ran[0].result == "ann@example.com"
        assert order.receipt_sent and order.booked, "seen without expire_all()"
        assert offload_manual.enqueued_jobs() == [] and offload_manual.run_jobs() == []


def test_the_real_pool_runs_jobs_in_its_threads(app: Flask, offload_pool: Harness) -> None:
    order_id = place_order(app)

    def booked() -> bool:
        with app.app_context():
            order = db.session.get(Order, order_id)
            return order is not None and order.booked

    wait_until(booked, timeout=30)
    assert offload_pool.mode == "pool" and shopapp.courier_calls == [order_id, order_id]


def test_assertions_say_what_is_enqueued(app: Flask, offload_manual: Harness) -> None:
    order_id = place_order(app)
    with app.app_context():
        with pytest.raises(AssertionError, match=r"no job of .*send_receipt.* args=\[999\]") as e:
            testing.assert_enqueued(send_receipt, args=[999])
        assert f"args=[{order_id}]" in str(e.value), "it lists what is enqueued"
        with pytest.raises(AssertionError, match="1 job"):
            testing.refute_enqueued(send_receipt)
        assert testing.enqueued_jobs("shopapp.send_receipt", kwargs={}) != []
        assert testing.enqueued_jobs(queue="default") == []


def test_modes_switch_within_a_test(app: Flask, offload_manual: Harness) -> None:
    with offload_manual.using("inline"):
        place_order(app)
    assert shopapp.courier_calls, "inline ran the receipt and the courier"
    order_id = place_order(app)
    with app.app_context():
        offload_manual.assert_enqueued(send_receipt, args=[order_id])


def test_eager_set_after_init_app_is_still_honoured_with_a_deprecation_warning(
    app: Flask,
) -> None:
    """Settings are read at init_app; this one, documented as read at every enqueue, is
    followed when changed until it is not (the modes above are the way)."""
    app.config["OFFLOAD_EAGER"] = True
    with pytest.warns(DeprecationWarning, match="OFFLOAD_EAGER changed after init_app"):
        order_id = place_order(app)
    with app.app_context():
        order = db.session.get(Order, order_id)
        assert order is not None and order.receipt_sent


def test_offload_drain_still_runs_due_jobs_with_a_deprecation_warning(app: Flask) -> None:
    place_order(app)
    with app.app_context(), pytest.warns(DeprecationWarning, match="run_jobs"):
        assert shopapp.offload.drain() == 3, "the receipt and two courier attempts"


def test_manual_mode_refuses_an_app_running_a_pool(tmp_path: Path) -> None:
    offload = Offload()
    app = Flask(__name__)
    app.config.update(OFFLOAD_URL="memory://", TESTING=True)
    offload.init_app(app)
    harness = Harness(app)
    with testing.using("pool", app), pytest.raises(RuntimeError, match="runs a pool"):
        harness.switch("manual")


def test_the_pool_runs_on_through_inline_and_stops_for_manual(
    app: Flask, offload_pool: Harness
) -> None:
    with offload_pool.using("inline"):
        place_order(app)
    assert offload_pool.mode == "pool" and offload_pool.runtime.started
    offload_pool.switch("manual")
    assert not offload_pool.runtime.started or offload_pool.runtime.stopped
    order_id = place_order(app)
    offload_pool.assert_enqueued(send_receipt, args=[order_id])
    with offload_pool.using("inline"), offload_pool.using("manual"):
        pass
    with pytest.raises(RuntimeError, match="does not start again"):
        offload_pool.switch("pool")
