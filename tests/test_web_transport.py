"""Background views over real HTTP servers, where the transport matters: Werkzeug's (as
``flask run`` serves) for chunked bodies, raw query bytes and a table of ordinary views
answering the same in the foreground and in the background; gunicorn for chunked bodies."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import (
    Flask,
    Response,
    abort,
    g,
    redirect,
    render_template,
    request,
    send_file,
    stream_with_context,
)
from werkzeug.serving import make_server

from conftest import answers, free_port, process, subprocess_env, wait_until
from flask_offload import Offload

pytestmark = pytest.mark.slow
LIMIT = 100_000  # OFFLOAD_MAX_REQUEST_BYTES of the app under test


class CountingInput:
    """Counts the body bytes the app reads from the server, as a WSGI middleware sees them."""

    def __init__(self, stream: Any, seen: list[int]) -> None:
        self._stream, self._seen = stream, seen

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size)
        self._seen[0] += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data: bytes = self._stream.readline(size)
        self._seen[0] += len(data)
        return data


@dataclass
class Server:
    """The app served by Werkzeug on a free port, and what its transport saw."""

    base: str
    tmp: Path
    offload: Offload
    read: list[int] = field(default_factory=lambda: [0])
    statuses: list[str] = field(default_factory=list)


def views(tmp: Path) -> dict[str, Callable[..., Any]]:
    """Ordinary views, built afresh for each registration (foreground or background)."""

    def json_view() -> Any:
        return {"args": request.args.to_dict(flat=False), "query": request.query_string.hex()}

    def template() -> Any:
        return render_template("page.html", name=request.args.get("name", "nobody"))

    def form() -> Any:
        return {"form": request.form.to_dict(flat=False), "override": g.get("override")}

    def upload() -> Any:
        file = request.files["doc"]
        return {"name": file.filename, "sha": hashlib.sha256(file.read()).hexdigest()}

    def body() -> Any:
        data = request.get_data()
        return {"bytes_seen": len(data), "sha": hashlib.sha256(data).hexdigest()}

    def framing() -> Any:
        return {
            "content_length": request.content_length,
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
            "bytes_seen": len(request.get_data()),
        }

    def download() -> Any:
        return send_file(tmp / "data.bin", mimetype="application/octet-stream")

    def stream() -> Any:
        def parts() -> Iterator[str]:
            for n in range(int(request.args.get("parts", 3))):
                yield f"part {n}\n"

        return Response(stream_with_context(parts()), mimetype="text/plain")

    def moved() -> Any:
        return redirect("/elsewhere")

    def empty() -> Any:
        return "", 204

    def missing() -> Any:
        abort(404)

    return {
        "json": json_view,
        "template": template,
        "form": form,
        "upload": upload,
        "body": body,
        "framing": framing,
        "download": download,
        "stream": stream,
        "moved": moved,
        "empty": empty,
        "missing": missing,
    }


METHODS = ["GET", "HEAD", "POST"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("transport")
    (tmp / "templates").mkdir()
    (tmp / "templates" / "page.html").write_text("<h1>Hello {{ name }}</h1>\n")
    (tmp / "data.bin").write_bytes(bytes(range(256)) * 40)
    app = Flask(__name__, instance_path=str(tmp / "instance"), template_folder=tmp / "templates")
    app.config.update(
        OFFLOAD_URL=f"sqlite:///{tmp / 'jobs.db'}",
        OFFLOAD_WORKERS=2,
        OFFLOAD_MAX_REQUEST_BYTES=LIMIT,
    )
    offload = Offload(app)

    @app.before_request
    def method_override() -> None:
        """Reads the form before any view does, as method-override and CSRF hooks do."""
        if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
            g.override = request.form.get("_method")

    for name, view in views(tmp).items():
        app.add_url_rule(f"/fg/{name}", f"fg_{name}", view, methods=METHODS)
    for name, view in views(tmp).items():
        background = offload.background(name=f"transport.{name}")(view)
        app.add_url_rule(f"/bg/{name}", f"bg_{name}", background, methods=METHODS)

    served = Server("", tmp, offload)
    wsgi_app = app.wsgi_app

    def counting(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"] = CountingInput(environ["wsgi.input"], served.read)

        def start(status: str, headers: Any, *exc_info: Any) -> Any:
            served.statuses.append(status)
            return start_response(status, headers, *exc_info)

        return wsgi_app(environ, start)

    app.wsgi_app = counting  # type: ignore[method-assign]
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    served.base = f"http://127.0.0.1:{http.server_port}"
    try:
        yield served
    finally:
        http.shutdown()
        thread.join(10)
        offload.runtime(app).stop(5)


def poll(base: str, location: str, method: str = "GET") -> requests.Response:
    """The job's answer once it is no longer pending."""
    url = base + location

    def done() -> list[requests.Response]:
        answer = requests.request(method, url, timeout=10, allow_redirects=False)
        return [] if answer.status_code == 202 else [answer]

    answer: requests.Response = wait_until(done, timeout=20)[0]
    return answer


def both(base: str, method: str, name: str, **kwargs: Any) -> tuple[Any, Any]:
    """The foreground's answer and the background job's answer to the same request."""
    make: Callable[[], dict[str, Any]] = kwargs.pop("fresh", lambda: {})
    foreground = requests.request(
        method, f"{base}/fg/{name}", timeout=10, allow_redirects=False, **kwargs, **make()
    )
    accepted = requests.request(
        method, f"{base}/bg/{name}", timeout=10, allow_redirects=False, **kwargs, **make()
    )
    assert accepted.status_code == 202, accepted.text
    return foreground, poll(
        base, accepted.headers["Location"], "HEAD" if method == "HEAD" else "GET"
    )


def chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    """A body that requests sends with Transfer-Encoding: chunked (no Content-Length)."""
    for start in range(0, total, size):
        yield bytes((start + n) % 251 for n in range(min(size, total - start)))


def test_a_chunked_body_reaches_the_replayed_view(server: Server) -> None:
    foreground, background = both(server.base, "POST", "body", fresh=lambda: {"data": chunks(1000)})
    assert foreground.json()["bytes_seen"] == 1000
    assert background.json() == foreground.json()
    accepted = requests.post(f"{server.base}/bg/framing", data=chunks(300), timeout=10)
    assert poll(server.base, accepted.headers["Location"]).json() == {
        "content_length": 300,
        "transfer_encoding": None,
        "bytes_seen": 300,
    }


def raw_request(base: str, head: bytes, body: Iterable[bytes] = ()) -> bytes:
    """Send raw bytes (a request line requests would re-encode), and read the whole answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        try:
            for part in body:
                sock.sendall(part)
            sock.shutdown(socket.SHUT_WR)  # Werkzeug drains an unread body until it ends
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer says why
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
    return answer


def location_of(answer: bytes) -> str:
    """The Location header of a raw HTTP answer."""
    head = answer.split(b"\r\n\r\n", 1)[0]
    return next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"location:")
    )


def test_an_endless_chunked_body_is_refused_after_the_limit_not_read_whole(
    server: Server,
) -> None:
    before, started = server.read[0], len(server.statuses)

    def endless() -> Iterator[bytes]:
        piece = b"x" * 65536
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        for _ in range(512):  # 32 MiB, far past the limit
            yield chunk
        yield b"0\r\n\r\n"

    head = (
        b"POST /bg/body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    raw_request(server.base, head, endless())
    assert server.statuses[started:] == ["413 REQUEST ENTITY TOO LARGE"]
    assert server.read[0] - before <= LIMIT + 1, "read no further than the limit"


def test_raw_query_bytes_replay_as_the_foreground_saw_them(server: Server) -> None:
    """A raw, non-ASCII query (latin-1 text in WSGI) is not encoded a second time."""
    raw = {}
    for side in ("fg", "bg"):
        head = b"GET /%s/json?q=\xff\xfe%%FF HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (
            side.encode()
        )
        answer = raw_request(server.base, head)
        assert answer.startswith(b"HTTP/1.1 "), answer[:100]
        raw[side] = answer
    location = location_of(raw["bg"])
    foreground = raw["fg"].split(b"\r\n\r\n", 1)[1]
    assert json.loads(foreground)["args"] == {"q": ["\u00ff\u00fe%FF"]}, foreground
    assert poll(server.base, location).content == foreground


CASES: dict[str, tuple[str, str, Callable[[], dict[str, Any]]]] = {
    "json": ("GET", "json", lambda: {"params": {"a": ["1", "2"], "b": "é"}}),
    "html template": ("GET", "template", lambda: {"params": {"name": "Ada"}}),
    "form read by a hook": (
        "POST",
        "form",
        lambda: {"data": {"item": "book", "qty": "2", "_method": "PUT"}},
    ),
    "file upload": (
        "POST",
        "upload",
        lambda: {"files": {"doc": ("notes.txt", b"line\n" * 500)}, "data": {"k": "v"}},
    ),
    "chunked post": ("POST", "body", lambda: {"data": chunks(5000)}),
    "send_file": ("GET", "download", lambda: {}),
    "streamed": ("GET", "stream", lambda: {"params": {"parts": "4"}}),
    "redirect": ("GET", "moved", lambda: {}),
    "204": ("GET", "empty", lambda: {}),
    "abort(404)": ("GET", "missing", lambda: {}),
    "HEAD": ("HEAD", "json", lambda: {"params": {"a": "1"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ordinary_views_answer_the_same_in_the_background(server: Server, case: str) -> None:
    method, name, make = CASES[case]
    foreground, background = both(server.base, method, name, fresh=make)

    def comparable(answer: requests.Response) -> dict[str, str]:
        skip = {"date", "set-cookie", "cache-control"}
        return {k.lower(): v for k, v in answer.headers.items() if k.lower() not in skip}

    assert background.status_code == foreground.status_code
    assert comparable(background) == comparable(foreground)
    assert background.content == foreground.content
    assert background.headers.get("Cache-Control") == "no-store"


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """tests/apps/replayapp.py under gunicorn (one sync worker): its base URL and worker pid."""
    tmp = tmp_path_factory.mktemp("gunicorn")
    env = subprocess_env(
        REPLAYAPP_INSTANCE=str(tmp / "instance"),
        OFFLOADTEST_OFFLOAD_URL=f"sqlite:///{tmp / 'jobs.db'}",
        OFFLOADTEST_OFFLOAD_MAX_REQUEST_BYTES=str(1 << 20),
        OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2",
    )
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}"]
    log = tmp / "gunicorn.log"
    with process([*args, "replayapp:create_app()"], env, log) as server:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{base}/pid"))
        yield base, requests.get(f"{base}/pid", timeout=10).json()["pid"]
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert "Traceback" not in log.read_text()


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1])


def test_gunicorn_a_chunked_body_reaches_the_replayed_view(gunicorn: tuple[str, int]) -> None:
    base, _pid = gunicorn
    foreground, background = both(base, "POST", "body", fresh=lambda: {"data": chunks(5000)})
    assert foreground.json()["bytes_seen"] == 5000
    assert background.json() == foreground.json()


def test_gunicorn_an_endless_chunked_body_is_refused_without_reading_it_whole(
    gunicorn: tuple[str, int],
) -> None:
    """64 MiB sent chunked to a 1 MiB limit: 413, and the worker's peak memory barely moves
    (reading it whole, as before, grew the worker by the size of the body)."""
    base, pid = gunicorn
    before = peak_rss_kib(pid)
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    head = (
        b"POST /bg/body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    answer = raw_request(base, head, [chunk] * 1024 + [b"0\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert peak_rss_kib(pid) - before < 16 * 1024, "the body was not read whole"
