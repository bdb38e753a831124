"""The dashboard block: set before ``init_app``, as an app factory would; its access function
lets staff look (read-only) from anywhere, and the dashboard answers them."""

from types import SimpleNamespace

from flask import Flask

from flask_offload import Offload

offload = Offload()
app = Flask(__name__)
app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
current_user = SimpleNamespace(is_authenticated=True, is_admin=False, is_staff=True)

# README BLOCK

offload.init_app(app)
assert dashboard_access() == "read"
remote = {"REMOTE_ADDR": "203.0.113.9"}
answer = app.test_client().get("/offload/", environ_base=remote)
assert answer.status_code == 200, answer.status_code
current_user.is_staff = False
assert app.test_client().get("/offload/", environ_base=remote).status_code == 403
