"""jobapp served the way Flask-SocketIO's ``socketio.run(app, debug=True)`` serves an app: the
script calls Werkzeug's ``run_with_reloader`` itself (never ``app.run``), after setup that takes
a while (``RAWRELOADER_SETUP`` seconds: imports, a listening socket).

Environment as for jobapp, plus ``SCRIPTAPP_PORT``.
"""

from __future__ import annotations

import os
import time

from jobapp import create_app
from werkzeug._reloader import run_with_reloader
from werkzeug.serving import make_server

app = create_app()
time.sleep(float(os.environ.get("RAWRELOADER_SETUP", "0")))


def serve() -> None:
    port = int(os.environ["SCRIPTAPP_PORT"])
    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    run_with_reloader(serve)
