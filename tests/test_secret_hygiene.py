"""No secret reaches the queue, history, status route, logs, callbacks or stored images."""

from __future__ import annotations

import json
import logging

from conftest import API_KEY, SERVICE_KEY, WEBHOOK_SECRET, model_free


async def test_secrets_appear_nowhere_a_job_leaves_traces(make_harness, storage_server, caplog):
    caplog.set_level(logging.DEBUG)
    h = await make_harness(env={"SUPABASE_URL": storage_server.url,
                                "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
                                "COURIER_WEBHOOK_SECRET": WEBHOOK_SECRET})
    secrets = h.settings.secrets
    assert len(secrets) == 4
    ok = model_free()
    failing = dict(model_free(), **{
        "3": {"class_type": "FailingNode", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    })
    await h.post(ok, "sec-ok")
    await h.post(failing, "sec-err")
    await h.wait_final("sec-ok")
    await h.wait_final("sec-err")
    await h.receiver.wait_for(2)
    await h.settle()
    # a rejected request with a wrong key must not echo it either
    await h.post(ok, "sec-bad", key="guess-" + API_KEY)

    queue = h.comfy.prompt_queue
    traces = {
        "history": json.dumps(queue.get_history(), default=str),
        "queue": json.dumps(queue.get_current_queue(), default=str),
        "status": json.dumps([await h.status("sec-ok"), await h.status("sec-err")]),
        "health": await (await h.client.get("/courier/health")).text(),
        "logs": caplog.text,
        "callback bodies": "".join(r.body.decode() for r in h.receiver.requests),
    }
    images = b"".join(obj.data for obj in storage_server.state.objects.values())
    assert images, "the successful job stored an image"
    for secret in secrets:
        for where, text in traces.items():
            assert secret not in text, f"a secret leaked into {where}"
        assert secret.encode() not in images
    # the workflow metadata stays out of delivered images too
    assert b"EmptyImage" not in images and b"tEXt" not in images
