from conftest import CALLBACK_KEY, model_free


async def test_model_free_job_calls_back_once_with_url(make_harness):
    h = await make_harness()
    status, body = await h.post(model_free(), "job-1")
    assert status == 202, body
    assert body["state"] == "queued" and body["attempt"] == 1
    final = await h.wait_final("job-1")
    assert final["state"] == "success", final
    await h.receiver.wait_for(1)
    await h.settle()
    [cb] = h.receiver.requests
    assert cb.headers["X-API-Key"] == CALLBACK_KEY
    assert cb.json["status"] == "success"
    assert cb.json["image_url"].startswith("http://courier.test:8188/view?")
