"""Where a pool runs and when it starts, on the servers the origin articles name: uWSGI (prefork,
`--py-call-osafterfork`, `--lazy-apps`, without `--enable-threads`), waitress, `app.run(debug=True)`
from a script with a file edited mid-run, `flask run --debug` stopped through its watcher's pid,
children the app forks, two apps in one process, and jobs left over from before a restart.

Each runs real processes on one SQLite file and checks the same things: every job run once, by
the current code, one pool per serving process and none elsewhere, a signal drains (a running
job finishes or is put back, never left `running`), and each pool removes its heartbeat row."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from flask import Flask

from conftest import HERE, answers, free_port, jobapp_env, process, runs, wait_until
from flask_offload import Offload
from flask_offload.backends import SQLiteBackend
from test_servers import STARTED, STOPPED, assert_ran_once_each, enqueue_concurrently, gone

pytestmark = pytest.mark.slow

SPAWNED = re.compile(r"spawned uWSGI worker \d+ \(pid: (\d+)")
BIN = Path(sys.executable).parent


def states(tmp_path: Path) -> Counter[str]:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        return Counter(dict(db.execute("SELECT state, count(*) FROM offload_jobs GROUP BY state")))


def attempts_of_queued(tmp_path: Path) -> list[int]:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        return [n for (n,) in db.execute("SELECT attempts FROM offload_jobs WHERE state='queued'")]


def live_workers(tmp_path: Path) -> list[str]:
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        return [info.id for info in backend.workers(0.0)]
    finally:
        backend.close()


def pools(text: str) -> Counter[int]:
    """How many pools started in each process, from the log."""
    return Counter(int(pid) for pid, _, _ in STARTED.findall(text))


def stopped(text: str) -> Counter[int]:
    return Counter(int(pid) for pid, _ in STOPPED.findall(text))


def started_jobs(tmp_path: Path, *numbers: int) -> bool:
    started = {n for event, n, _ in runs(tmp_path) if event == "start"}
    return started >= set(numbers)


def leave_jobs(tmp_path: Path, task: str, count: int) -> None:
    """Queue ``count`` jobs of ``task`` from this process (no pool here), as if a previous run
    of the server had left them."""
    app = Flask("leftover", instance_path=str(tmp_path / "instance"))
    app.config.update(OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}", OFFLOAD_WORKERS=0)
    offload = Offload(app)
    runtime = offload.runtime(app)
    for n in range(count):
        runtime.enqueue(task, args=(n,))
    runtime.backend.close()


def interrupt_two_running(base: str, tmp_path: Path, first: int, interrupt: object) -> None:
    """Start job ``first`` (0.3 s, finishes within the 3 s OFFLOAD_SHUTDOWN_TIMEOUT) and job
    ``first + 1`` (60 s, put back), call ``interrupt()`` once both run, and check the drain."""
    session = requests.Session()
    for n, sleep in ((first, 0.3), (first + 1, 60)):
        response = session.post(f"{base}/enqueue/{n}", params={"sleep": sleep}, timeout=10)
        assert response.status_code == 200, response.text
    wait_until(lambda: started_jobs(tmp_path, first, first + 1), timeout=30)
    assert callable(interrupt)
    interrupt()


def assert_drained(tmp_path: Path, first: int) -> None:
    """After ``interrupt_two_running``: the short job finished, the long one is queued again
    without counting the attempt, nothing is left running and no heartbeat row is left."""
    events = runs(tmp_path)
    assert ("done", first) in {(e, n) for e, n, _ in events}, "the short job finished"
    assert ("done", first + 1) not in {(e, n) for e, n, _ in events}
    assert states(tmp_path) == Counter(succeeded=first + 1, queued=1), "the long one put back"
    assert attempts_of_queued(tmp_path) == [0], "a put-back job does not count as an attempt"
    assert live_workers(tmp_path) == [], "every pool removed its heartbeat row"


UWSGI_VARIANTS = {
    "prefork": ([], signal.SIGINT),
    "py-call-osafterfork": (["--py-call-osafterfork"], signal.SIGINT),
    "lazy-apps": (["--lazy-apps", "--die-on-term"], signal.SIGTERM),
}


def uwsgi_args(port: int, *extra: str) -> list[str]:
    if not (BIN / "uwsgi").exists():
        pytest.skip("uWSGI is not installed (pip install 'Flask-Offload[test]')")
    return [
        str(BIN / "uwsgi"),
        "--master",
        "--processes",
        "2",
        "--http-socket",
        f"127.0.0.1:{port}",
        "--home",
        sys.prefix,
        "--pythonpath",
        str(HERE / "apps"),
        "--module",
        "jobwsgi:application",
        "--disable-logging",
        "--add-header",
        "Connection: close",  # http-socket closes each connection: no keep-alive for clients
        *extra,
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", sorted(UWSGI_VARIANTS))
def test_uwsgi_runs_one_pool_per_worker_and_none_in_the_master(
    tmp_path: Path, variant: str
) -> None:
    """uWSGI with a master and two workers: 300 jobs over HTTP run once each, in the workers;
    the master, which loads the app before forking unless `--lazy-apps`, runs no pool (a pool
    there would fork with its locks held); each worker starts its own after the fork; SIGINT
    (or SIGTERM with `--die-on-term`) drains every worker."""
    extra, signum = UWSGI_VARIANTS[variant]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="3")
    with process(uwsgi_args(port, "--enable-threads", *extra), env, out) as master:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        enqueue_concurrently(base, 300, threads=8)
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 300, timeout=60)
        job_pids = assert_ran_once_each(tmp_path, 300)

        def stop() -> None:
            # uWSGI skips Python's exit hooks in a worker still inside a request when it is
            # stopped (uwsgi_python_atexit: "if busy do not run atexit hooks"): let the worker
            # that answered the last enqueue finish that request first.
            time.sleep(1)
            master.send_signal(signum)

        interrupt_two_running(base, tmp_path, 300, stop)
        master.wait(60)
    text = out.read_text()
    workers = {int(pid) for pid in SPAWNED.findall(text)}
    assert len(workers) == 2 and master.pid not in workers
    assert job_pids <= workers
    assert pools(text) == Counter(workers), "one pool per worker, none in the master"
    assert stopped(text) == Counter(workers), "each worker drained its pool at exit"
    assert_drained(tmp_path, 300)
    assert "Traceback" not in text


@pytest.mark.timeout(60)
def test_uwsgi_without_enable_threads_runs_no_pool_and_names_the_setting(tmp_path: Path) -> None:
    """Without `--enable-threads` uWSGI runs no Python threads between requests: no pool
    starts anywhere, the log names the setting, and enqueueing still works."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    with process(uwsgi_args(port), jobapp_env(tmp_path), out) as master:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        enqueue_concurrently(base, 20, threads=4)
        time.sleep(1)
        assert states(tmp_path) == Counter(queued=20)
        master.send_signal(signal.SIGINT)
        master.wait(60)
    text = out.read_text()
    assert not STARTED.findall(text)
    errors = re.findall(r"^\d+ flask_offload ERROR (.*)$", text, re.M)
    assert errors and all("enable-threads" in error for error in errors), errors
    assert runs(tmp_path) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_waitress_drains_on_sigterm_and_sigint(tmp_path: Path, signum: int) -> None:
    """waitress-serve, which installs no signal handler: SIGTERM, like SIGINT, stops claiming,
    lets the running job finish within OFFLOAD_SHUTDOWN_TIMEOUT, puts back the one still
    running, removes the heartbeat row, then ends the process as the signal would have."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="3")
    args = [str(BIN / "waitress-serve"), f"--listen=127.0.0.1:{port}", "--call"]
    args.append("jobapp:create_app")
    with process(args, env, out) as server:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        enqueue_concurrently(base, 100, threads=8)
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 100, timeout=60)
        assert assert_ran_once_each(tmp_path, 100) == {server.pid}
        sent = time.monotonic()
        interrupt_two_running(base, tmp_path, 100, lambda: server.send_signal(signum))
        code = server.wait(60)
        assert time.monotonic() - sent < 40, "drained within the timeout, not a lease"
    assert code == (-signal.SIGTERM if signum == signal.SIGTERM else 0)
    text = out.read_text()
    assert pools(text) == Counter([server.pid]) and stopped(text) == Counter([server.pid])
    assert_drained(tmp_path, 100)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "target", ["jobapp:create_app", "scriptapp:app"], ids=["factory", "module-level"]
)
def test_leftover_jobs_wait_for_the_factory_and_start_without_a_request(
    tmp_path: Path, target: str
) -> None:
    """Jobs left from a previous run need what the app sets up after `init_app` (1.5 s later
    here): none runs before the factory has returned (or the module that calls `init_app` has
    been imported), and all run without any request to the server."""
    leave_jobs(tmp_path, "setup", 3)
    port = free_port()
    out = tmp_path / "server.log"
    env = jobapp_env(tmp_path, JOBAPP_SETUP_DELAY="1.5")
    call = ["--call"] if target.endswith("create_app") else []
    args = [str(BIN / "waitress-serve"), f"--listen=127.0.0.1:{port}", *call, target]
    with process(args, env, out) as server:
        wait_until(lambda: states(tmp_path) != Counter(queued=3), timeout=30)
        wait_until(lambda: not {"queued", "running"} & set(states(tmp_path)), timeout=30)
        assert states(tmp_path) == Counter(succeeded=3), out.read_text()
        assert answers(f"http://127.0.0.1:{port}/pid"), "the server serves (asked only now)"
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert assert_ran_once_each(tmp_path, 3) == {server.pid}
    assert "KeyError" not in out.read_text()


@pytest.mark.timeout(120)
def test_app_run_debug_from_a_script_runs_one_pool_in_the_serving_child(tmp_path: Path) -> None:
    """`python app.py` with `app.run(debug=True)` and `init_app` at module level: the reloader's
    watcher runs no pool, the serving child runs one. Editing the file mid-run restarts the child
    at once, putting back its running job instead of waiting OFFLOAD_SHUTDOWN_TIMEOUT (60 s
    here); that job and every later one run with the new code, in the new child."""
    script = tmp_path / "scriptapp.py"
    shutil.copy(HERE / "apps" / "scriptapp.py", script)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    env = jobapp_env(tmp_path, SCRIPTAPP_PORT=str(port), OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="60")
    session = requests.Session()

    def enqueue(numbers: range, sleep: float = 0) -> None:
        for n in numbers:
            response = session.post(f"{base}/enqueue/{n}", params={"sleep": sleep}, timeout=10)
            assert response.status_code == 200, response.text

    def done(n: int) -> bool:
        return ("done", n) in {(e, m) for e, m, _ in runs(tmp_path)}

    with process([sys.executable, str(script)], env, out, cwd=tmp_path) as watcher:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        first = session.get(f"{base}/pid", timeout=10).json()["pid"]
        assert first != watcher.pid
        enqueue(range(20))
        wait_until(lambda: all(done(n) for n in range(20)), timeout=30)
        assert {pid for e, _, pid in runs(tmp_path) if e != "version"} == {first}

        enqueue(range(20, 21), sleep=60)
        wait_until(lambda: started_jobs(tmp_path, 20), timeout=30)
        edited = time.monotonic()
        script.write_text(script.read_text().replace("VERSION = 1", "VERSION = 2"))
        later = time.time() + 2
        os.utime(script, (later, later))
        wait_until(lambda: gone(first), timeout=30)
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        assert time.monotonic() - edited < 20, "the restart did not wait for the running job"
        second = session.get(f"{base}/pid", timeout=10).json()["pid"]
        wait_until(lambda: done(20), timeout=30)
        enqueue(range(21, 40))
        wait_until(lambda: all(done(n) for n in range(40)), timeout=30)

        os.killpg(watcher.pid, signal.SIGINT)
        assert watcher.wait(30) == 0
        wait_until(lambda: gone(second), timeout=30)

    events = runs(tmp_path)
    versions = {n: v for e, n, v in events if e == "version" and (n != 20 or v != 1)}
    assert versions == {n: 1 if n < 20 else 2 for n in range(40)}, "the current code ran each"
    starts = Counter(n for e, n, _ in events if e == "start")
    assert starts == Counter({**dict.fromkeys(range(40), 1), 20: 2}), "20 ran again, once"
    assert Counter(n for e, n, _ in events if e == "done") == Counter(range(40))
    assert {pid for e, n, pid in events if e == "done"} == {first, second}
    text = out.read_text()
    assert pools(text) == Counter([first, second]), "no pool in the watcher"
    assert stopped(text) == Counter([first, second])
    assert states(tmp_path) == Counter(succeeded=40)
    assert live_workers(tmp_path) == []
    assert "Traceback" not in text


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "signum, target",
    [(signal.SIGINT, "watcher"), (signal.SIGTERM, "group"), (signal.SIGTERM, "watcher")],
    ids=["sigint-watcher", "sigterm-group", "sigterm-watcher"],
)
def test_flask_run_debug_drains_on_sigterm_as_on_ctrl_c(
    tmp_path: Path, signum: int, target: str
) -> None:
    """SIGTERM (what `docker stop`, systemd and process managers send) to `flask run --debug`,
    to its whole process group or to the reloader's watcher alone, and SIGINT to the watcher
    alone (an IDE's stop button, not a terminal's Ctrl-C to the group), drain the serving child
    exactly as Ctrl-C does, promptly, saying what they wait for: the short job finishes, the
    long one is put back, nothing is left running, and no heartbeat row is left."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="3")
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "run", "--debug"]
    with process([*args, "--port", str(port)], env, out) as watcher:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        serving = requests.get(f"{base}/pid", timeout=10).json()["pid"]
        kill = os.killpg if target == "group" else os.kill
        sent = time.monotonic()
        interrupt_two_running(base, tmp_path, 0, lambda: kill(watcher.pid, signum))
        assert watcher.wait(60) == 0
        wait_until(lambda: gone(serving), timeout=30)
        assert time.monotonic() - sent < 30
    text = out.read_text()
    assert pools(text) == Counter([serving]) and stopped(text) == Counter([serving]), text
    assert f"{serving} flask_offload INFO waiting up to 3 s for " in text
    assert_drained(tmp_path, 0)


@pytest.mark.timeout(90)
def test_no_pool_in_the_watcher_of_a_reloader_the_script_starts_itself(tmp_path: Path) -> None:
    """A script that calls Werkzeug's `run_with_reloader` itself (as Flask-SocketIO's
    `socketio.run(app, debug=True)` does), after two seconds of setup: nothing tells the
    first process it will be the watcher until it enters the reloader, so its pool may have
    started (a script's pool starts a second after its setup); it stops as the reloader
    starts, and runs no job. The serving child runs them all, and SIGTERM drains it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    env = jobapp_env(
        tmp_path,
        SCRIPTAPP_PORT=str(port),
        RAWRELOADER_SETUP="2",
        OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="3",
    )
    script = [sys.executable, str(HERE / "apps" / "rawreloader.py")]
    with process(script, env, out) as watcher:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        serving = requests.get(f"{base}/pid", timeout=10).json()["pid"]
        assert serving != watcher.pid
        for n in range(10):
            requests.post(f"{base}/enqueue/{n}", timeout=10)
        wait_until(lambda: started_jobs(tmp_path, *range(10)), timeout=30)
        interrupt_two_running(base, tmp_path, 10, lambda: os.killpg(watcher.pid, signal.SIGTERM))
        watcher.wait(60)
        wait_until(lambda: gone(serving), timeout=30)
    text = out.read_text()
    assert {pid for _, _, pid in runs(tmp_path)} == {serving}, "no job ran in the watcher"
    assert pools(text)[serving] == 1 and set(pools(text)) <= {serving, watcher.pid}, text
    if pools(text)[watcher.pid]:
        assert stopped(text)[watcher.pid] == 1 and "reloader watcher" in text, text
        assert text.index("reloader watcher") < text.index(f"{serving} flask_offload INFO")
    assert_drained(tmp_path, 10)


@pytest.mark.timeout(60)
def test_children_the_app_forks_run_no_pool(tmp_path: Path) -> None:
    """A `multiprocessing` (fork) child and an `os.fork` child, forked while jobs are queued,
    claim nothing: every job runs once in the parent, and the `os.fork` child, exiting through
    the interpreter (atexit hooks run), neither puts back the parent's running jobs nor
    removes its heartbeat row."""
    out = tmp_path / "out.log"
    args = [sys.executable, "-m", "jobapp", "fork", "40", "0.05"]
    with process(args, jobapp_env(tmp_path), out) as parent:
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 40, timeout=30)
        children = [pid for e, _, pid in runs(tmp_path) if e == "child"]
        assert len(children) == 2
        time.sleep(3.5)  # the children have lived their three seconds and exited
        assert live_workers(tmp_path) != [], "the parent's heartbeat row is still there"
        parent.send_signal(signal.SIGINT)
        parent.wait(30)
    assert {pid for e, _, pid in runs(tmp_path) if e != "child"} == {parent.pid}
    assert_ran_once_each(tmp_path, 40)
    text = out.read_text()
    assert pools(text) == Counter([parent.pid]) and stopped(text) == Counter([parent.pid])
    assert states(tmp_path) == Counter(succeeded=40)
    assert live_workers(tmp_path) == []


@pytest.mark.timeout(60)
def test_a_spawned_child_that_imports_the_script_again_runs_no_pool(tmp_path: Path) -> None:
    """A `multiprocessing` child started by spawn (or forkserver, Python 3.14's default on
    Linux) imports the parent's script again, whose top level calls `init_app`: no pool
    there, every job runs once in the parent."""
    out = tmp_path / "out.log"
    with process(
        [sys.executable, "-m", "spawnapp", "40", "0.1"], jobapp_env(tmp_path), out
    ) as parent:
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 40, timeout=30)
        wait_until(lambda: any(e == "child" for e, _, _ in runs(tmp_path)), timeout=30)
        time.sleep(1)  # the child has imported the script and idles
        parent.send_signal(signal.SIGINT)
        parent.wait(30)
    assert {pid for e, _, pid in runs(tmp_path) if e != "child"} == {parent.pid}
    assert_ran_once_each(tmp_path, 40)
    assert pools(out.read_text()) == Counter([parent.pid])


@pytest.mark.timeout(60)
def test_two_apps_on_one_storage_in_one_process_run_one_pool(tmp_path: Path) -> None:
    """A factory that ends up called twice in one process (a task module calling
    `create_app()` itself): one pool, a warning in the log that says so, every job once."""
    out = tmp_path / "out.log"
    env = jobapp_env(tmp_path, JOBAPP_SECOND_APP="1")
    with process([sys.executable, "-m", "jobapp", "enqueue", "30", "0"], env, out) as proc:
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 30, timeout=30)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert_ran_once_each(tmp_path, 30)
    text = out.read_text()
    assert pools(text) == Counter([proc.pid]), "one pool"
    warnings = re.findall(r"^\d+ flask_offload WARNING (.*)$", text, re.M)
    assert len(warnings) == 1 and "same storage" in warnings[0], warnings


@pytest.mark.timeout(60)
def test_a_main_that_builds_the_app_through_its_package_factory_gets_its_pool_at_once(
    tmp_path: Path,
) -> None:
    """A program's `main()` calls the factory of its own package and then uses the app, never
    returning (a CLI, a batch script). The factory is the code that holds the app while
    `init_app` runs: once it has returned, the pool starts, instead of waiting for a request
    or the 10 s fallback."""
    package = tmp_path / "batch"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from flask import Flask\n"
        "from flask_offload import Offload\n"
        "offload = Offload()\n"
        "@offload.task(name='batch.double')\n"
        "def double(n):\n"
        "    return 2 * n\n"
        "def create_app(url):\n"
        "    app = Flask('batch')\n"
        "    app.config.update(OFFLOAD_URL=url, OFFLOAD_WORKERS=1)\n"
        "    offload.init_app(app)\n"
        "    return app\n"
    )
    (package / "run.py").write_text(
        "import sys\n"
        "from batch import create_app, double\n"
        "def main():\n"
        "    app = create_app(sys.argv[1])\n"
        "    with app.app_context():\n"
        "        print('result', double.delay(21).wait(timeout=9).result, flush=True)\n"
    )
    (tmp_path / "main.py").write_text("from batch.run import main\nmain()\n")
    out = tmp_path / "main.log"
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with process([sys.executable, "main.py", url], jobapp_env(tmp_path), out, cwd=tmp_path) as run:
        assert run.wait(30) == 0, out.read_text()
    assert "result 42" in out.read_text()
