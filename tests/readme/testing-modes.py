"""The testing-modes block: each of its tests runs with a harness in its mode, as its pytest
fixture gives it, on a fresh app built from the test configuration."""

from flask import Flask, request

from flask_offload import Offload, testing

offload = Offload()
outbox: list[str] = []


@offload.task
def send_welcome(email: str) -> None:
    outbox.append(email)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=True, OFFLOAD_URL="memory://")
    offload.init_app(app)

    @app.post("/signup")
    def signup() -> dict[str, str]:
        return {"job": send_welcome.delay(request.form["email"]).id}

    return app


# README BLOCK

assert pytest_plugins == ["flask_offload.testing"]
for test, mode in (
    (test_signup_enqueues_the_welcome, "manual"),
    (test_signup_sends_the_welcome_at_once, "inline"),
    (test_signup_with_the_real_pool, "pool"),
):
    outbox.clear()
    app = create_app()
    with testing.using(mode, app) as harness:
        test(app, harness)
