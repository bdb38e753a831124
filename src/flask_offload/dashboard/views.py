"""The dashboard's routes: pages (GET, read only) and actions (POST, guarded by ``access``).

Every page answers its main part as JSON (``{"main": html}``) when asked with the header
``X-Offload-Live: 1``: that is what the page's script polls every few seconds, while the tab
is visible, to update itself.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import quote

from flask import (
    Blueprint,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as WerkzeugResponse

from ..config import Config
from ..job import valid_id
from ..runtime import Runtime
from . import access, queries
from .masks import Mask

blueprint = Blueprint(
    "offload_dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/assets",
)
blueprint.before_request(access.guard)
blueprint.after_request(access.remember)
VERBS = ("retry", "cancel", "delete")
CSRF_SLOT = f"csrf-{secrets.token_hex(16)}"  # where a shared live part takes each token


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["offload"].runtime()
    return runtime


def _mask() -> Mask:
    return Mask(Config.of(current_app).dashboard_mask)


def _page(template: str, title: str, share: bool = False, **context: Any) -> Any:
    """The page, or only its main part as JSON for the live poll. With ``share``, that part
    is rendered once a second for every tab with the same rights (each gets its own CSRF
    token put in): rendering holds the GIL, which a process's enqueues wait for."""
    context.setdefault("poll", True)
    csrf = access.csrf_token()
    context.update(
        title=title,
        can_act=access.can_act(),
        csrf=csrf,
        notice=request.args.get("notice", "")[:200],
        now=time.time(),
    )
    if request.headers.get("X-Offload-Live") != "1":
        return render_template(template, live=False, **context)
    if share and not context["notice"]:
        context["csrf"] = CSRF_SLOT
        variant = (template, context["can_act"], request.script_root)
        main = queries.shared(
            "live", _runtime(), lambda: render_template(template, live=True, **context), variant
        ).replace(CSRF_SLOT, csrf)
    else:
        main = render_template(template, live=True, **context)
    response = jsonify(main=main)
    response.vary.add("X-Offload-Live")
    return response


@blueprint.get("/")
def overview() -> Any:
    context = queries.overview(_runtime())
    return _page("offload_dashboard/overview.html", "Overview", share=True, **context)


@blueprint.get("/list")
def jobs() -> Any:
    text = (request.args.get("q") or "").strip()
    if valid_id(text):  # a job id in the search box opens that job
        return redirect(url_for(".job", job_id=text))
    before = queries.cursor(request.args)
    filters = queries.job_filter(request.args)
    context = queries.jobs_page(_runtime(), filters, before, _mask())
    return _page("offload_dashboard/jobs.html", "Jobs", **context)


@blueprint.get("/job/<job_id>")  # its first URL, one letter from the status URL: kept
@blueprint.get("/dashboard/jobs/<job_id>")  # registered first, so url_for builds this one
def job(job_id: str) -> Any:
    runtime = _runtime()
    found = runtime.get(job_id) if valid_id(job_id) else None
    if found is None:
        abort(404)
    detail = queries.job_detail(runtime, found, _mask())
    return _page("offload_dashboard/job.html", f"Job {job_id}", **detail)


@blueprint.get("/workers")
def workers() -> Any:
    return _page(
        "offload_dashboard/workers.html", "Workers", workers=queries.live_workers(_runtime())
    )


@blueprint.get("/periodic")
def periodic() -> Any:
    return _page(
        "offload_dashboard/periodic.html", "Periodic tasks", tasks=queries.periodic(_runtime())
    )


@blueprint.get("/queues")
def queues() -> Any:
    return _page("offload_dashboard/queues.html", "Queues", queues=queries.queues(_runtime()))


# -- actions: POST only, each checked by access.check_action before anything changes ------


@blueprint.post("/job/<job_id>/<verb>")
@blueprint.post("/dashboard/jobs/<job_id>/<verb>")
def job_action(job_id: str, verb: str) -> WerkzeugResponse:
    access.check_action()
    if verb not in VERBS or not valid_id(job_id):
        abort(404)
    done = _apply(_runtime(), verb, job_id)
    notice = f"{verb}: {'done' if done else 'not possible in its state'}"
    if verb == "delete" and done:
        return _back(url_for(".jobs"), notice)
    return _back(url_for(".job", job_id=job_id), notice)


@blueprint.post("/bulk")
def bulk() -> Any:
    """Retry, cancel or delete the jobs the list's filters match, newest first, at most
    ``OFFLOAD_DASHBOARD_BULK_LIMIT``: a first POST shows how many and asks to confirm."""
    access.check_action()
    verb = request.form.get("verb", "")
    if verb not in VERBS:
        abort(400)
    runtime = _runtime()
    filters = queries.job_filter(request.form)
    limit = Config.of(current_app).dashboard_bulk_limit
    jobs, more = queries.search(runtime, filters, None, limit, _mask())
    if request.form.get("confirmed") != "yes":
        return _page(
            "offload_dashboard/confirm.html",
            f"Confirm {verb}",
            verb=verb,
            count=len(jobs),
            more=more is not None,
            limit=limit,
            filters=filters,
            poll=False,
        )
    done = sum(_apply(runtime, verb, job.id) for job in jobs)
    query = {k: v for k, v in vars(filters).items() if v and k not in ("text", "group_id")}
    if filters.text:
        query["q"] = filters.text
    if filters.group_id:
        query["group"] = filters.group_id
    return _back(url_for(".jobs", **query), f"{verb}: {done} of {len(jobs)} job(s)")


@blueprint.post("/queues/<path:name>/<verb>")
def queue_action(name: str, verb: str) -> WerkzeugResponse:
    access.check_action()
    runtime = _runtime()
    if verb == "pause":
        runtime.pause_queue(name)
    elif verb == "resume":
        runtime.resume_queue(name)
    else:
        abort(404)
    return _back(url_for(".queues"), f"queue {name}: {verb}d")


@blueprint.post("/periodic/<path:name>/run")
def run_now(name: str) -> WerkzeugResponse:
    access.check_action()
    runtime = _runtime()
    task = runtime.tasks.get(name)
    if task is None or task.schedule is None:
        abort(404)
    job = runtime.enqueue(
        name, priority=task.priority, queue=task.queue, max_attempts=task.max_attempts
    )
    return _back(url_for(".job", job_id=job.id), "enqueued now")


@blueprint.app_template_filter("offload_time")
def _time(seconds: float) -> str:
    """A stored time in the server's local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


@blueprint.app_template_filter("offload_without")
def _without(args: dict[str, str], name: str) -> dict[str, str]:
    """Query arguments without ``name`` (the next page link replaces ``before``)."""
    return {key: value for key, value in args.items() if key != name}


def _apply(runtime: Runtime, verb: str, job_id: str) -> bool:
    if verb == "cancel":
        return runtime.cancel(job_id) is not None
    if verb == "delete":
        return runtime.delete(job_id)
    try:
        runtime.retry(job_id)
    except (LookupError, ValueError):
        return False
    return True


def _back(url: str, notice: str) -> WerkzeugResponse:
    """303 to a dashboard page, with what happened."""
    return redirect(f"{url}{'&' if '?' in url else '?'}notice={quote(notice, safe='')}", 303)
