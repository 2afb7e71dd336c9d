"""Hostile input: whatever reaches the routes, never a 500, never a stray job, never a callback.

The property tests run real Hypothesis (generation and shrinking) on async tests, which
pytest-asyncio drives on the test's event loop; every example of one test function shares
one harness whose ComfyUI worker is *stopped*, so anything accepted stays on the queue
where it can be counted, and nothing ends: any callback at all would come from a rejection.
Generators are not forced to be invalid; the invariant is consistency instead: the queue,
the journal and the answers agree, and only a 200/202 ever adds a job.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from comfy_courier.executor.intake import ID_PATTERN, MAX_DEPTH, MAX_NODES

from conftest import API_KEY, Harness, model_free

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,  # CI runs stay independent; a failure prints its example and seed
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEY = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
ANSWERS = {200, 202, 400, 409}  # what /execute-workflow may say to a keyed, small body
KNOWN_CLASSES = ["EmptyImage", "SaveImage", "SaveAndCallback", "PreviewImage", "FailingNode"]
NASTY_IDS = ["", ".", "..", "../x", "a/b", "a\\b", "a:b", "a.b", "/abs", "%2e%2e", "a\n",
             "a\x00b", "x" * 129, "ünïcode", "１２３", "٣٤", "İ", "a b", "\ud800", "a\u200b"]


# -- strategies ------------------------------------------------------------------------
# Weighted towards bodies that get far into the pipeline (a valid id, well-shaped nodes,
# workflows the validator accepts), so hostile values reach the deep code paths too.


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` three times in four (one_of would weigh a repeated strategy only once)."""
    return st.integers(0, 3).flatmap(lambda n: bad if n == 3 else good)


surrogates = st.sampled_from(["\ud800", "\udfff", "\udcff"])
texts = mostly(st.text(max_size=12),
              st.text(alphabet=st.one_of(st.characters(), surrogates), max_size=12))
floats = mostly(st.floats(allow_nan=False, allow_infinity=False), st.floats())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), floats, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(texts, inner, max_size=4)),
    max_leaves=16,
)
valid_ids = st.one_of(st.uuids().map(str), st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True))
ids = mostly(valid_ids, st.one_of(st.sampled_from(NASTY_IDS), texts, json_values))
node_ids = st.one_of(st.sampled_from(["1", "2", "3"]), texts)
links = st.tuples(node_ids, st.integers(-1, 3)).map(list)
input_names = st.one_of(st.sampled_from(["images", "filename_prefix", "format", "quality",
                                         "content_request_id", "width", "batch_size"]), texts)
input_values = st.one_of(json_values, links)
inputs = st.dictionaries(input_names, input_values, max_size=4)
nodes = mostly(
    st.fixed_dictionaries(
        {"class_type": mostly(st.sampled_from(KNOWN_CLASSES), st.one_of(texts, json_values))},
        optional={"inputs": mostly(inputs, json_values), "_meta": json_values},
    ),
    json_values,
)


def graft(extra_inputs: dict[str, Any], target: str, extra_nodes: dict[str, Any]) -> dict[str, Any]:
    """The model-free workflow with hostile inputs on one node, and maybe more nodes."""
    workflow = model_free()
    workflow[target]["inputs"].update(extra_inputs)
    workflow.update(extra_nodes)
    return workflow


runnable_ish = st.builds(graft, inputs, st.sampled_from(["1", "2"]),
                         st.dictionaries(node_ids, nodes, max_size=2))
ui_format = st.fixed_dictionaries(
    {"nodes": st.lists(json_values, max_size=3), "links": st.lists(json_values, max_size=3)},
    optional={"last_node_id": st.integers(), "version": st.floats()},
)
workflows = mostly(st.one_of(st.dictionaries(node_ids, nodes, min_size=1, max_size=5),
                             runnable_ish),
                   st.one_of(json_values, ui_format))
near_valid = mostly(
    st.fixed_dictionaries({"workflow_json": workflows, "content_request_id": ids}),
    st.fixed_dictionaries({"workflow_json": workflows, "content_request_id": ids},
                          optional={"extra": json_values, "api_key": texts}),
)
bodies = mostly(near_valid, json_values)


def dump(value: Any) -> bytes:
    """JSON as a careless client writes it: NaN/Infinity allowed, surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


def splice(data: bytes, at: int, noise: bytes) -> bytes:
    i = at % (len(data) + 1)
    return data[:i] + noise + data[i:]


encoded_bodies = st.builds(
    lambda body, encoding: json.dumps(body, allow_nan=True, ensure_ascii=False)
    .encode(encoding, "surrogatepass"),
    near_valid, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-16-le",
                                 "utf-32"]),
)
raw_bodies = st.one_of(
    st.binary(max_size=600),
    encoded_bodies,
    st.builds(splice, near_valid.map(dump), st.integers(0, 10**6), st.binary(min_size=1,
                                                                               max_size=4)),
    st.builds(lambda b, n: b[:n], near_valid.map(dump), st.integers(0, 400)),  # truncated
)


# -- the invariant -----------------------------------------------------------------------


@dataclass
class Tally:
    """What the test has seen accepted; the harness must agree with it after every request."""

    queued: int = 0
    accepted: set[str] = field(default_factory=set)


@pytest.fixture
async def idle(make_harness) -> Harness:
    """One harness per test function; ComfyUI's worker is stopped, so no job ever ends."""
    return await make_harness(start_worker=False, env={"COURIER_MAX_QUEUE": "100000"})


def _refuse(constant: str) -> Any:
    raise ValueError(constant)


def storable_json(raw: bytes) -> bool:
    """RFC 8259 JSON (UTF-8/16/32), finite numbers, valid Unicode: what can be stored and
    served again, in /queue and /history too, as standard JSON. Nothing else is accepted."""
    try:
        value = json.loads(raw, parse_constant=_refuse)
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, RecursionError):
        return False
    return True


async def answered_consistently(h: Harness, tally: Tally, raw: bytes, resp: Any) -> None:
    assert resp.status in ANSWERS, (resp.status, await resp.text())
    body = await resp.json()  # always JSON, never an HTML error page
    cid = posted_id(raw)
    error = body.get("error", {})
    event(f"HTTP {resp.status} {error.get('type', '')} {error.get('field', '')}".strip())
    if resp.status in (200, 202):  # a valid job after all: it must really exist
        assert storable_json(raw), "accepted a body that is not standard JSON"
        assert body["content_request_id"] == cid and body["state"] == "queued"
        tally.queued += resp.status == 202
        tally.accepted.add(cid)
        assert (await h.status(cid))["prompt_id"] == body["prompt_id"]
    else:
        assert set(body) == {"error", "node_errors"} and body["error"]["type"], body
        assert isinstance(body["error"]["message"], str)
        if isinstance(cid, str) and ID_PATTERN.fullmatch(cid) and cid not in tally.accepted:
            assert await h.courier.store.latest(cid) is None
    assert h.comfy.prompt_queue.get_tasks_remaining() == tally.queued
    assert await h.courier.store.count_unfinished() == tally.queued
    await h.settle()
    assert h.receiver is not None and h.receiver.requests == []


def posted_id(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body.get("content_request_id") if isinstance(body, dict) else None


# -- property tests ----------------------------------------------------------------------


@pytest.fixture
def tally() -> Tally:
    return Tally()


@PROPERTY
@given(body=bodies)
async def test_any_json_value_is_answered_and_queues_nothing_it_rejects(idle, tally, body):
    raw = dump(body)
    resp = await idle.client.post("/execute-workflow", data=raw, headers=KEY)
    await answered_consistently(idle, tally, raw, resp)


@PROPERTY
@given(raw=raw_bodies, path=st.sampled_from(["/execute-workflow", "/api/execute-workflow"]))
async def test_any_bytes_are_answered_and_queue_nothing_they_reject(idle, tally, raw, path):
    resp = await idle.client.post(path, data=raw, headers=KEY)
    await answered_consistently(idle, tally, raw, resp)


@PROPERTY
@given(cid=st.one_of(texts, st.sampled_from(NASTY_IDS),
                     st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)),
       method=st.sampled_from(["GET", "DELETE"]),
       prefix=st.sampled_from(["", "/api"]))
async def test_any_path_id_is_404_or_400(idle, cid, method, prefix):
    path = f"{prefix}/execute-workflow/{quote(cid, safe='', errors='surrogatepass')}"
    resp = await idle.client.request(method, path, headers={"X-API-Key": API_KEY})
    text = await resp.text()
    if ID_PATTERN.fullmatch(cid):  # reached the courier, which knows no such job
        assert resp.status == 404, text
        assert json.loads(text)["error"]["type"] == "not_found"
    else:  # refused by the id check (400), or no route matched (404/405)
        assert resp.status in (400, 404, 405), (resp.status, text)
        if resp.status == 400:
            assert json.loads(text)["error"]["field"] == "content_request_id"
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0
    assert idle.receiver is not None and idle.receiver.requests == []


@settings(PROPERTY, max_examples=100)
@given(value=st.binary(min_size=1, max_size=40))
async def test_any_key_header_bytes_are_refused_without_a_500(idle, value):
    """aiohttp hands over non-UTF-8 header bytes as surrogate escapes; they used to 500."""
    reader, writer = await asyncio.open_connection("127.0.0.1", idle.client.port)
    try:
        writer.write(b"POST /execute-workflow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Content-Length: 2\r\nX-API-Key: " + value + b"\r\n\r\n{}")
        await writer.drain()
        status_line = (await asyncio.wait_for(reader.readline(), 10)).split()
    finally:
        writer.close()
    assert len(status_line) >= 2, status_line
    # 401, or 400 from aiohttp's parser for bytes no header may hold (CR, LF, NUL, ...)
    assert int(status_line[1]) in (400, 401), status_line
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


# -- specific hostile bodies -----------------------------------------------------------


def nested(depth: int, leaf: Any = 0) -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


async def post_raw(h: Harness, raw: bytes | str) -> tuple[int, dict[str, Any]]:
    resp = await h.client.post("/execute-workflow", data=raw, headers=KEY)
    return resp.status, await resp.json()


def with_node_field(field_name: str, raw_value: str) -> str:
    return ('{"content_request_id": "deep-1", "workflow_json": {"1": {"class_type": '
            f'"EmptyImage", "inputs": {{}}, "{field_name}": {raw_value}}}}}}}')


@pytest.mark.parametrize("raw, message", [
    (nested(100_000), "nested too deeply"),
    ('{"content_request_id": "deep-1", "workflow_json": ' + nested(100_000) + "}",
     "nested too deeply"),
    (with_node_field("inputs", '{"x": ' + nested(2_000) + "}"), "nested too deeply"),
    (with_node_field("_meta", nested(900)), "nested too deeply"),  # was a 500 (deepcopy)
    (with_node_field("_meta", nested(MAX_DEPTH + 1)), "nested too deeply"),
], ids=["body", "workflow", "inputs", "meta-900", "meta-just-over"])
async def test_deep_nesting_is_400(idle, raw, message):
    status, body = await post_raw(idle, raw)
    assert status == 400 and message in body["error"]["message"], body
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


async def test_nesting_at_the_limit_is_accepted_up_to_validation(idle):
    status, body = await post_raw(idle, with_node_field("_meta", nested(MAX_DEPTH - 1)))
    # the depth check passes; the stand-in's validator then refuses the output-less prompt
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs", body


async def test_too_many_nodes_is_400(idle):
    workflow = {str(i): {"class_type": "Nope", "inputs": {}} for i in range(MAX_NODES + 1)}
    status, body = await idle.post(workflow, "many-1")
    assert status == 400 and f"more than {MAX_NODES} nodes" in body["error"]["message"]
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


async def test_the_largest_allowed_node_count_reaches_validation(idle):
    workflow = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(MAX_NODES)}
    workflow["0"] = {"class_type": "NotInstalled", "inputs": {}}
    status, body = await idle.post(workflow, "many-2")
    assert status == 400 and body["error"]["type"] == "missing_node_type"
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


@pytest.mark.parametrize("raw", [
    b'{"content_request_id": "\xff\xfe", "workflow_json": {}}',
    b'{"content_request_id": "ok-1", "workflow_json": {"1": {"class_type": "\xc0\xaf"}}}',
    b"\xef\xbb\xbf\xef\xbb\xbf{}",
    b"\x00\x00\x00",
    b"\xff\xfe\x00\xd8",  # UTF-16 BOM, then a lone surrogate
], ids=["bad-utf8-id", "overlong-slash", "double-bom", "nuls", "utf16-surrogate"])
async def test_non_utf8_bytes_are_400(idle, raw):
    status, body = await post_raw(idle, raw)
    assert status == 400 and body["error"]["type"] == "invalid_request", body
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999",
                                     "1" * 5000])
async def test_non_finite_and_oversized_numbers_are_400(idle, literal):
    """NaN/Infinity would go on into /queue and /history, which browsers cannot JSON.parse;
    a 5000-digit integer trips Python's int limit (it used to be a 500)."""
    raw = ('{"content_request_id": "num-1", "workflow_json": {"1": {"class_type": "EmptyImage",'
           f' "inputs": {{"width": {literal}}}}}, "2": {{"class_type": "SaveAndCallback",'
           ' "inputs": {"images": ["1", 0]}}}}')
    status, body = await post_raw(idle, raw)
    assert status == 400 and "not valid JSON" in body["error"]["message"], body
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


@pytest.mark.parametrize("where", ["node_id", "input", "class_type"])
async def test_lone_surrogates_are_400(idle, where):
    """Valid JSON escapes, but no valid Unicode: they used to 500 when the workflow was hashed."""
    workflow = model_free()
    if where == "node_id":
        workflow["\ud800"] = workflow.pop("1")
    elif where == "input":
        workflow["2"]["inputs"]["filename_prefix"] = "x\udfff"
    else:
        workflow["3"] = {"class_type": "Nope\ud800", "inputs": {}}
    status, body = await post_raw(idle, json.dumps({"content_request_id": "sur-1",
                                                    "workflow_json": workflow}))
    assert status == 400 and "Unicode" in body["error"]["message"], body
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


async def test_duplicate_keys_resolve_like_json_parse_last_wins(idle):
    """The backend's JSON.parse keeps the last duplicate; so do we: no parser differential."""
    workflow = json.dumps(model_free())
    status, body = await post_raw(idle, '{"content_request_id": "dup-ok-1", "content_request_id":'
                                        f' "../escape", "workflow_json": {workflow}}}')
    assert status == 400 and body["error"]["field"] == "content_request_id"
    status, body = await post_raw(idle, '{"content_request_id": "../escape", "content_request_id":'
                                        f' "dup-ok-2", "workflow_json": {workflow}}}')
    assert status == 202 and body["content_request_id"] == "dup-ok-2"
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 1


@pytest.mark.parametrize("cid", NASTY_IDS)
async def test_nasty_ids_are_400_and_leave_nothing(idle, cid):
    status, body = await idle.post(model_free(), cid)
    assert status == 400 and body["error"]["field"] == "content_request_id", body
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0
    assert await idle.courier.store.count_unfinished() == 0


@pytest.mark.parametrize("workflow", [
    {"nodes": [], "links": []},
    {"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": [[1, 1, 0, 2, 0]],
     "1": {"class_type": "EmptyImage", "inputs": {}}},  # UI format with an API node mixed in
], ids=["empty-ui", "mixed"])
async def test_ui_format_workflows_are_400_with_a_hint(idle, workflow):
    status, body = await idle.post(workflow, "ui-1")
    assert status == 400 and body["error"]["hint"] == "ui_format"
    assert idle.comfy.prompt_queue.get_tasks_remaining() == 0


# -- filename_prefix must not write outside the output folder -----------------------------


def files_outside(root: Path, output: Path) -> set[Path]:
    found = set()
    for folder, _, names in os.walk(root):
        if Path(folder) == output or output in Path(folder).parents:
            continue
        found.update(Path(folder) / n for n in names)
    return {p for p in found if not p.name.startswith("journal.sqlite3")}


@pytest.mark.parametrize("node", ["SaveAndCallback", "SaveImage"])
async def test_filename_prefix_cannot_escape_the_output_folder(make_harness, tmp_path, node):
    h = await make_harness()
    output = Path(h.comfy.folder_paths.get_output_directory()).resolve()
    root = tmp_path.resolve()
    before = files_outside(root, output)
    absolute = root / "abs" / "escape"
    escapes = {"up2": "../../escape", "up1": "../escape", "abs": str(absolute),
               "dotdot-inside": "sub/../../escape", "deep": "a/b/../../../../../escape"}
    inside = {"normalised": "ok/../fine", "subfolder": "sub/dir/img", "nul": "nul\x00byte"}
    cases = {**escapes, **inside}
    for name, prefix in cases.items():
        workflow = model_free(prefix)
        if node == "SaveImage":
            workflow["2"]["class_type"] = "SaveImage"
        status, body = await h.post(workflow, f"fp-{name}")
        assert status == 202, body  # the prefix is ComfyUI's to confine, at execution
    finals = {name: await h.wait_final(f"fp-{name}") for name in cases}
    await h.receiver.wait_for(len(cases))
    await h.settle()

    for name in escapes:
        assert finals[name]["state"] == "error", finals[name]
        assert finals[name]["error_type"] == "execution"
        assert "outside the output folder" in finals[name]["error_message"]
    for name in ("normalised", "subfolder"):
        assert finals[name]["state"] == "success", finals[name]
    assert finals["nul"]["state"] in ("success", "error")  # either way: one callback, no file
    callbacks = [b["content_request_id"] for b in h.receiver.bodies()]
    assert sorted(callbacks) == sorted(f"fp-{name}" for name in cases)  # one each, no more
    assert files_outside(root, output) == before
    assert not absolute.parent.exists()
    pattern = "fine_*" if node == "SaveImage" else "courier/fp-normalised/fine_*"
    assert any(output.glob(pattern))


def test_prepared_prompt_leaves_the_received_workflow_untouched():
    from comfy_courier.executor.intake import prepare_prompt

    workflow = model_free()
    received = json.loads(json.dumps(workflow))
    prompt = prepare_prompt(workflow, "cid-1")
    assert workflow == received
    assert prompt["2"]["inputs"]["content_request_id"] == "cid-1"
    assert prompt["1"] is workflow["1"]  # untouched nodes are shared, not copied
