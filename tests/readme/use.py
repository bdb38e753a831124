"""The "Use" block: its app queues a visit from a page, and both of its tasks run."""

# README BLOCK

app = create_app()
with app.test_client() as client:
    answer = client.get("/pages/about").text
assert answer.startswith("queued "), answer
visit = offload.get_job(answer.removeprefix("queued ")).wait(30)
assert (visit.state, visit.result) == ("succeeded", 1), (visit.state, visit.error)

report = send_report.delay(7).wait(30)
assert report.state == "succeeded", report.error
assert report.progress is not None
assert (report.progress["current"], report.progress["total"]) == (3, 3)
assert report.progress["message"] == "rendering charts"
