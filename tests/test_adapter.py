"""The adapter's version detection, against both stand-in flavours."""

import pytest

from standin.comfy import Context, StandinComfy
from standin.comfy import _context as context


@pytest.mark.parametrize("version, length", [("0.3.64", 5), ("0.33.0", 6)])
def test_queue_item_length_is_detected(tmp_path, version, length):
    adapter = StandinComfy(tmp_path, version=version).adapter()
    assert adapter.queue_item_length == length


def test_enqueue_numbers_items_like_prompt(tmp_path):
    comfy = StandinComfy(tmp_path)
    adapter = comfy.adapter()
    comfy.number = 7
    adapter.enqueue("p1", {}, {"client_id": "comfy-courier"}, ["2"])
    adapter.enqueue("p2", {}, {"client_id": "comfy-courier"}, ["2"])
    assert [item[0] for item in comfy.prompt_queue.queue] == [7, 8] and comfy.number == 9
    assert adapter.queue_snapshot().in_order() == ["p1", "p2"]
    assert adapter.remove_pending("p1") and not adapter.remove_pending("p1")


async def test_validate_arity_two_and_exceptions(tmp_path):
    comfy = StandinComfy(tmp_path)

    async def validate_prompt(prompt_id, prompt):
        raise TypeError("node is not a dict")

    comfy.execution.validate_prompt = validate_prompt
    result = await comfy.adapter().validate("p", {"1": {}})
    assert not result.ok and result.error["type"] == "invalid_prompt"


def test_sync_validate_prompt_is_refused(tmp_path):
    from comfy_courier.executor.errors import UnsupportedComfyUI

    comfy = StandinComfy(tmp_path)
    comfy.execution.validate_prompt = lambda prompt: (True, None, [], {})
    with pytest.raises(UnsupportedComfyUI):
        comfy.adapter()


def test_on_prompt_handlers_run_and_are_guarded(tmp_path):
    comfy = StandinComfy(tmp_path)
    adapter = comfy.adapter()

    def rewrite(json_data):
        json_data["prompt"]["1"]["inputs"]["text"] = "rewritten"
        return json_data

    def broken(json_data):
        raise RuntimeError("bad handler")

    comfy.add_on_prompt_handler(rewrite)
    comfy.add_on_prompt_handler(broken)
    prompt = adapter.apply_on_prompt_handlers({"1": {"class_type": "X", "inputs": {"text": "a"}}})
    assert prompt["1"]["inputs"]["text"] == "rewritten"


def test_base_url(tmp_path):
    from comfy_courier.executor.comfy_adapter import ComfyAdapter

    comfy = StandinComfy(tmp_path)
    a = ComfyAdapter(comfy, comfy.execution, comfy.folder_paths, lambda: None, lambda v: None,
                     listen="0.0.0.0", port=8190)
    assert a.base_url() == "http://127.0.0.1:8190" and a.listens_beyond_loopback()


def test_the_start_hook_sees_the_first_job_after_start_up(tmp_path):
    # ComfyUI's idle worker sits in one queue.get(timeout=1000) from start-up: installing
    # the hook must wake it, or the first job is taken without the hook
    import threading
    import time

    comfy = StandinComfy(tmp_path)
    queue = comfy.prompt_queue
    taken, started = [], []
    waiting = threading.Event()

    def worker():  # ComfyUI's prompt_worker loop, reduced to its queue calls
        while len(taken) < 2:
            waiting.set()
            got = queue.get(timeout=1000.0)
            taken.append(None if got is None else got[0][1])

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    waiting.wait(5)
    for _ in range(500):  # until it waits inside the unwrapped get()
        with queue.mutex:
            if queue.not_empty._waiters:
                break
        time.sleep(0.01)
    adapter = comfy.adapter()
    adapter.on_start(started.append)
    for _ in range(500):  # woken: its get() returned None, as on a timeout
        if taken:
            break
        time.sleep(0.01)
    adapter.enqueue("first", {}, {"client_id": "comfy-courier"}, ["2"])
    thread.join(10)
    assert taken == [None, "first"] and started == ["first"]


def test_only_the_item_the_courier_put_counts_as_its_job(tmp_path):
    # ComfyUI's /prompt takes any prompt_id: an item under a courier job's id, even ahead
    # of it, is an ordinary prompt for every hook, for the snapshot, DELETE and interrupt
    comfy = StandinComfy(tmp_path)
    queue = comfy.prompt_queue
    adapter = comfy.adapter()
    started, completed, progress, executing = [], [], [], []
    adapter.on_start(started.append)
    adapter.on_completion(completed.append)
    adapter.on_progress(lambda prompt_id, fraction: progress.append(prompt_id))
    adapter.enqueue("job", {"n": "courier"}, {"client_id": "comfy-courier"}, ["2"])
    [ours] = queue.queue
    impostor = (-1, "job", {"n": "impostor"}, {"client_id": "comfy-courier"}, ["2"])
    queue.put(impostor)
    snapshot = adapter.queue_snapshot()
    assert snapshot.pending == {"job": 0} and snapshot.numbers == (-1, 0)
    assert snapshot.position("job") == 1  # the impostor is ahead of it

    def run_next():  # ComfyUI's prompt_worker, reduced to what the hooks see
        item, item_id = queue.get(timeout=1)
        context.value = Context(item[1], "2", None)
        try:
            executing.append((item[2]["n"], adapter.executing().courier_item))
            comfy.utils.PROGRESS_BAR_HOOK(1, 2)
            assert adapter.queue_snapshot().running == (
                frozenset({"job"}) if item is ours else frozenset())
            assert adapter.interrupt("job") is (item is ours)
            comfy.interrupted = False
        finally:
            context.value = None
        queue.task_done(item_id, {"outputs": {}}, None)

    run_next()  # the impostor
    assert started == [] and completed == [] and progress == []
    assert adapter.queue_snapshot().pending == {"job": 0}
    run_next()  # the courier's item
    assert executing == [("impostor", False), ("courier", True)]
    assert started == ["job"] and [c.prompt_id for c in completed] == ["job"]
    assert progress == ["job"]
    assert adapter.queue_snapshot().running == frozenset()


def test_delete_takes_the_courier_item_never_one_under_its_id(tmp_path):
    comfy = StandinComfy(tmp_path)
    queue = comfy.prompt_queue
    adapter = comfy.adapter()
    queue.put((-1, "job", {"n": "impostor"}, {}, ["2"]))
    adapter.enqueue("job", {"n": "courier"}, {"client_id": "comfy-courier"}, ["2"])
    assert adapter.remove_pending("job") and not adapter.remove_pending("job")
    assert [item[2]["n"] for item in queue.queue] == ["impostor"]
    assert "job" not in adapter.queue_snapshot()


def test_an_item_deleted_through_comfyui_is_forgotten(tmp_path):
    # POST /queue {"delete": [id]} removes the first item with that id; the adapter's
    # record of it must not outlive it
    comfy = StandinComfy(tmp_path)
    adapter = comfy.adapter()
    adapter.enqueue("job", {}, {"client_id": "comfy-courier"}, ["2"])
    assert comfy.prompt_queue.delete_queue_item(lambda item: item[1] == "job")
    comfy.prompt_queue.put((5, "job", {}, {}, ["2"]))  # and someone queues the id again
    assert "job" not in adapter.queue_snapshot() and adapter.items._waiting == {}
    assert not adapter.remove_pending("job") and len(comfy.prompt_queue.queue) == 1
