"""docs/workflows.md's first block: its tasks and signatures; a signature is a call not
stored yet, with its options, and strict JSON is checked when it is made."""

from flask import Flask

from flask_offload import Offload, Signature
from flask_offload.errors import NotSerializable

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
offload.init_app(app)

# README BLOCK

assert isinstance(small, Signature) and small.takes_input and not fixed.takes_input
assert later.options["delay"] == 60 and later.options["queue"] == "images"
try:
    resize.s(float("nan"))
except NotSerializable:
    pass
else:
    raise AssertionError("NaN is not strict JSON")
with app.app_context():
    assert offload.enqueue_many([small, later, fixed])[1].queue == "images"
