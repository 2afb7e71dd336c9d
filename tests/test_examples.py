"""The shipped examples: API-format workflows the courier accepts, and the same graphs in the
UI format ComfyUI's front end loads (drag the file onto the canvas)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from comfy_courier.executor.intake import parse_request
from comfy_courier.nodes import NODE_CLASS_MAPPINGS

from standin.comfy import StandinComfy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PAIRS = [("model-free.json", "model-free.ui.json"), ("txt2img-sd15.json", "txt2img-sd15.ui.json")]

# Widget order of ComfyUI's core nodes (their INPUT_TYPES, minus linked inputs; read from
# ComfyUI 0.33.0's nodes.py). A seed widget is followed in the UI by its "control after
# generate" value, which the API format leaves out.
CORE_WIDGETS = {
    "EmptyImage": ["width", "height", "batch_size", "color"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
                 "denoise"],
    "VAEDecode": [],
}
LINK_TYPES = {"IMAGE", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING"}


def load(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def our_widgets(class_type: str) -> tuple[list[str], dict[str, Any]]:
    """Widget names in order, and their defaults, from our node's INPUT_TYPES."""
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    names, defaults = [], {}
    for group in ("required", "optional"):
        for name, (kind, options) in spec.get(group, {}).items():
            if isinstance(kind, str) and kind in LINK_TYPES:
                continue
            names.append(name)
            defaults[name] = options.get("default")
    return names, defaults


# -- API format ------------------------------------------------------------------------


@pytest.mark.parametrize("api, _", PAIRS)
@pytest.mark.parametrize("version", ["0.3.64", "0.33.0"])
async def test_api_examples_pass_intake_and_validation(tmp_path, api, _, version):
    workflow = load(api)
    body = json.dumps({"workflow_json": workflow, "content_request_id": "example-1"}).encode()
    request = parse_request(body)  # the route's own checks: API format, sizes, shapes
    adapter = StandinComfy(tmp_path, version=version).adapter()
    result = await adapter.validate("p-example", request.workflow)
    assert result.ok and result.node_errors == {}, result
    assert result.outputs == [n for n, node in workflow.items()
                              if node["class_type"] == "SaveAndCallback"]


async def test_the_model_free_example_runs(make_harness):
    h = await make_harness()
    status, body = await h.post(load("model-free.json"), "example-run-1")
    assert status == 202, body
    final = await h.wait_final("example-run-1")
    assert final["state"] == "success" and len(final["image_urls"]) == 1


# -- UI format -------------------------------------------------------------------------
# The checks mirror ComfyUI's front end (1.49.6, its zod schema of workflow version 0.4):
# number-or-string node ids, [x, y] positions and sizes, inputs {name, type, link},
# outputs {name, type, links, slot_index}, links [id, from, from_slot, to, to_slot, type].


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_vector(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(is_number, value))


def check_ui_schema(workflow: Any) -> None:
    assert isinstance(workflow, dict)
    assert workflow["version"] == 0.4
    assert isinstance(workflow["last_node_id"], (int, str)) and is_number(workflow["last_link_id"])
    assert isinstance(workflow.get("groups", []), list)
    assert isinstance(workflow.get("config") or {}, dict)
    extra = workflow.get("extra") or {}
    assert isinstance(extra, dict)
    if "ds" in extra:
        assert is_number(extra["ds"]["scale"]) and is_vector(extra["ds"]["offset"])
    for node in workflow["nodes"]:
        assert isinstance(node["id"], int) and isinstance(node["type"], str)
        assert is_vector(node["pos"]) and is_vector(node["size"])
        assert isinstance(node["flags"], dict)
        assert is_number(node["order"]) and node["mode"] == 0  # 0: runs (not muted, bypassed)
        assert isinstance(node["properties"], dict)
        assert isinstance(node.get("widgets_values", []), list)
        for slot in node.get("inputs", []):
            assert isinstance(slot["name"], str) and isinstance(slot["type"], str)
            assert slot.get("link") is None or isinstance(slot["link"], int)
        for index, slot in enumerate(node.get("outputs", [])):
            assert isinstance(slot["name"], str) and isinstance(slot["type"], str)
            assert slot.get("slot_index", index) == index
            assert all(isinstance(link, int) for link in slot.get("links") or [])
    for link in workflow["links"]:
        assert isinstance(link, list) and len(link) == 6
        assert all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)


def check_ui_links(workflow: dict[str, Any]) -> None:
    """Each link appears on both of its ends, with matching types; ids are below the counters."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "node ids are unique"
    assert max(nodes) <= int(workflow["last_node_id"])
    ids = [link[0] for link in workflow["links"]]
    assert len(set(ids)) == len(ids) and max(ids) <= workflow["last_link_id"]
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        output = nodes[source]["outputs"][source_slot]
        input_ = nodes[target]["inputs"][target_slot]
        assert link_id in output["links"] and input_["link"] == link_id
        assert output["type"] == input_["type"] == kind
    linked = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        assert {slot["link"] for slot in node.get("inputs", [])} <= linked
        for slot in node.get("outputs", []):
            assert set(slot.get("links") or []) <= linked
    orders = sorted(node["order"] for node in workflow["nodes"])
    assert orders == list(range(len(orders)))
    for _, source, _, target, _, _ in workflow["links"]:
        assert nodes[source]["order"] < nodes[target]["order"], "order is a run order"


def ui_to_api(workflow: dict[str, Any]) -> dict[str, Any]:
    """What the front end's Export (API) makes of a UI graph (for these node types)."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        names = CORE_WIDGETS[kind] if kind in CORE_WIDGETS else our_widgets(kind)[0]
        values = node.get("widgets_values", [])
        assert len(values) == len(names), (kind, values)
        inputs = {n: v for n, v in zip(names, values, strict=True)
                  if n != "control_after_generate"}
        for slot in node.get("inputs", []):
            link = links[slot["link"]]
            inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                "_meta": {"title": node.get("title", kind)}}
    return api


def with_our_defaults(api: dict[str, Any]) -> dict[str, Any]:
    """An API workflow with our nodes' optional inputs as the UI shows them (defaults)."""
    filled = json.loads(json.dumps(api))
    for node in filled.values():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            _, defaults = our_widgets(node["class_type"])
            node["inputs"] = {**defaults, **node["inputs"]}
    return filled


@pytest.mark.parametrize("api, ui", PAIRS)
def test_ui_examples_are_well_formed_and_describe_the_api_graph(api, ui):
    workflow = load(ui)
    check_ui_schema(workflow)
    check_ui_links(workflow)
    assert ui_to_api(workflow) == with_our_defaults(load(api))


def test_the_courier_refuses_the_ui_format_with_its_hint(tmp_path):
    from comfy_courier.executor.errors import BadRequest

    body = {"workflow_json": load("model-free.ui.json"), "content_request_id": "ui-1"}
    with pytest.raises(BadRequest, match="API"):
        parse_request(json.dumps(body).encode())


def test_every_example_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"examples/([\w.-]+\.json)", readme))
    assert named, "the README names its examples"
    assert named <= {p.name for p in EXAMPLES.glob("*.json")}
    assert {p.name for p in EXAMPLES.glob("*.json")} == {name for pair in PAIRS for name in pair}
