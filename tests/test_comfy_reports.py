"""What ComfyUI reports, as it leaves the host: unknown node types named per node, and
ComfyUI's own directories made relative in error messages."""

from __future__ import annotations

import asyncio
import json

import pytest

from comfy_courier.executor.comfy_reports import explain_missing_nodes, parents, relative_paths

from conftest import model_free
from standin.comfy import StandinComfy

# -- unknown node types ----------------------------------------------------------------

# ComfyUI's own answers for an unknown class_type in node "2" (execution.validate_prompt)
COMFY_0_3 = {"type": "invalid_prompt", "message": "Cannot execute because node Foo does not "
             "exist.", "details": "Node ID '#2'", "extra_info": {}}
COMFY_0_33 = {"type": "missing_node_type", "message": "Node 'Foo' not found. The custom node "
              "may not be installed.", "details": "Node ID '#2'",
              "extra_info": {"node_id": "2", "class_type": "Foo", "node_title": "Foo"}}
PROMPT = {"1": {"class_type": "EmptyImage"}, "2": {"class_type": "Foo"},
          "10": {"class_type": "Bar"}, "3": {"class_type": "SaveImage"}}


@pytest.mark.parametrize("error", [COMFY_0_3, COMFY_0_33])
def test_every_missing_type_is_named_with_its_node(error):
    explained, node_errors = explain_missing_nodes(error, PROMPT, {"EmptyImage", "SaveImage"})
    assert explained["type"] == "missing_node_type"
    assert explained["message"] == (
        "node 2: class_type 'Foo' is not installed on this ComfyUI; "
        "node 10: class_type 'Bar' is not installed on this ComfyUI")
    assert explained["details"] == error["message"]  # ComfyUI's own words kept
    assert explained["extra_info"]["missing_node_types"] == {"2": "Foo", "10": "Bar"}
    assert list(node_errors) == ["2", "10"]
    [entry] = node_errors["10"]["errors"]
    assert entry["message"] == "class_type 'Bar' is not installed on this ComfyUI"
    assert node_errors["10"]["class_type"] == "Bar"
    assert node_errors["10"]["dependent_outputs"] == []


@pytest.mark.parametrize("error", [COMFY_0_3, COMFY_0_33])
def test_without_the_node_list_the_node_comfyui_named_is_reported(error):
    explained, node_errors = explain_missing_nodes(error, PROMPT, None)
    assert explained["message"] == "node 2: class_type 'Foo' is not installed on this ComfyUI"
    assert list(node_errors) == ["2"]


@pytest.mark.parametrize("error", [
    None,
    {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": ""},
    {"type": "invalid_prompt", "message": "Invalid prompt: x", "details": "TypeError"},
    {"type": "invalid_prompt", "message": "m", "details": "Node ID '#99'"},  # no such node
])
def test_other_errors_pass_through(error):
    assert explain_missing_nodes(error, PROMPT, {"EmptyImage"}) is None


@pytest.mark.parametrize("version", ["0.3.64", "0.33.0"])
async def test_the_400_names_the_missing_node_types(make_harness, version):
    h = await make_harness(version=version, start_worker=False)
    workflow = model_free()
    workflow["3"] = {"class_type": "Foo", "inputs": {"images": ["1", 0]}}
    workflow["2"]["class_type"] = "SaveAndCallbackTypo"
    status, body = await h.post(workflow, f"missing-{version.replace('.', '_')}")
    assert status == 400
    assert body["error"]["message"] == (
        "node 2: class_type 'SaveAndCallbackTypo' is not installed on this ComfyUI; "
        "node 3: class_type 'Foo' is not installed on this ComfyUI")
    assert set(body["node_errors"]) == {"2", "3"}
    assert body["node_errors"]["3"]["errors"][0]["type"] == "missing_node_type"
    assert h.comfy.prompt_queue.get_tasks_remaining() == 0


# -- host paths ------------------------------------------------------------------------

DIRS = [("/srv/ComfyUI/output", "output"), ("/srv/ComfyUI/input", "input"),
        ("/srv/ComfyUI", ""), ("/mnt/models/checkpoints", "checkpoints"), ("/", "root")]


@pytest.mark.parametrize("text, expected", [
    ("full_output_folder: /srv/ComfyUI/output/social/x\n output_dir: /srv/ComfyUI/output",
     "full_output_folder: output/social/x\n output_dir: output"),
    ("No such file: '/srv/ComfyUI/input/a.png'", "No such file: 'input/a.png'"),
    ("in /srv/ComfyUI/custom_nodes/pack/nodes.py", "in custom_nodes/pack/nodes.py"),
    ("load /mnt/models/checkpoints/sd.safetensors", "load checkpoints/sd.safetensors"),
    ("/srv/ComfyUI/output2/x and /srv/ComfyUI", "output2/x and ."),
    ("/elsewhere/file.txt", "/elsewhere/file.txt"),  # not ComfyUI's: unchanged; no root rule
])
def test_comfyuis_directories_become_relative(text, expected):
    assert relative_paths(text, DIRS) == expected


def test_parents_are_paths_up_from_their_directory():
    assert parents("/srv/ComfyUI/output", "output") == [
        ("/srv/ComfyUI", "output/.."), ("/srv", "output/../.."), ("/", "output/../../..")]
    text = "full_output_folder: /srv/escape\n commonpath: /srv"
    directories = [("/srv/ComfyUI", ""), *parents("/srv/ComfyUI", "")]
    assert relative_paths(text, directories) == "full_output_folder: ../escape\n commonpath: .."


def test_windows_directories_too():
    text = r"could not write C:\ComfyUI\output\x\1.png"
    relative = relative_paths(text, [(r"C:\ComfyUI\output", "output"), ("C:\\", "drive")])
    assert relative == "could not write output/x\\1.png"


def test_the_adapter_knows_comfyuis_directories(tmp_path):
    adapter = StandinComfy(tmp_path / "comfy").adapter()
    labels = dict((label, path) for path, label in adapter.host_directories())
    assert labels["output"] == str(tmp_path / "comfy" / "output")
    assert {"input", "temp", "user", "models", "checkpoints", ""} <= set(labels)


async def test_an_execution_error_leaves_the_host_without_its_directories(make_harness, tmp_path):
    h = await make_harness(base=tmp_path / "ComfyUI")
    output_dir = h.comfy.folder_paths.get_output_directory()
    workflow = model_free()
    message = f"cannot write {output_dir}/a/b.png"
    workflow["3"] = {"class_type": "FailingNode",
                     "inputs": {"images": ["1", 0], "message": message}}
    workflow["2"]["inputs"]["images"] = ["3", 0]
    await h.post(workflow, "paths1")
    final = await h.wait_final("paths1")
    assert final["error_message"] == (
        "FailingNode (node 3) failed: RuntimeError: cannot write output/a/b.png")
    await h.settle()
    [callback] = h.receiver.bodies("paths1")
    assert callback["error_message"] == final["error_message"]
    # ComfyUI's own history keeps the full message for the host's operator (its worker
    # writes it in task_done, after the error message that made the job final)
    for _ in range(1000):
        if h.comfy.prompt_queue.get_history():
            break
        await asyncio.sleep(0.005)
    [entry] = h.comfy.prompt_queue.get_history().values()
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert output_dir in errors[0][1]["exception_message"]


@pytest.mark.parametrize("prefix, shown", [("../escape/x", "full_output_folder: escape"),
                                            ("../../escape/x", "full_output_folder: ../escape")])
async def test_a_refused_save_path_names_no_host_directory(make_harness, tmp_path, prefix,
                                                           shown):
    """ComfyUI's refusal prints full_output_folder and output_dir (the issue's case)."""
    h = await make_harness(base=tmp_path / "ComfyUI")
    workflow = model_free()
    workflow["3"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    await h.post(workflow, "paths2")
    final = await h.wait_final("paths2")
    assert final["error_type"] == "execution"
    assert shown in final["error_message"] and "output_dir: output" in final["error_message"]
    assert str(tmp_path) not in json.dumps(final)


async def test_an_output_folder_outside_comfyui_is_relative_too(make_harness, tmp_path):
    """`--output-directory <elsewhere>`: its paths, and those beside it, show relative."""
    h = await make_harness(base=tmp_path / "ComfyUI")
    h.comfy.folder_paths.output_directory = str(tmp_path / "data" / "out")
    workflow = model_free()
    workflow["3"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["1", 0], "filename_prefix": "../../escape/x"}}
    await h.post(workflow, "paths3")
    final = await h.wait_final("paths3")
    assert "full_output_folder: ../escape" in final["error_message"]  # beside ComfyUI's folder
    assert "output_dir: output" in final["error_message"]
    assert str(tmp_path) not in json.dumps(final)


async def test_the_courier_failing_to_finish_a_job_names_no_host_directory(
        make_harness, tmp_path, monkeypatch):
    """The last resort when finishing a job breaks (reading what SaveImage saved, say)
    still ends it with one callback, and its message leaves no host folder behind."""
    h = await make_harness(base=tmp_path / "ComfyUI")
    saved = f"{h.comfy.folder_paths.get_output_directory()}/social/x_00001_.png"

    async def unreadable(run, completion):
        raise RuntimeError(f"cannot read {saved}")

    monkeypatch.setattr(h.courier.uploader, "collect_saved_files", unreadable)
    workflow = model_free()
    workflow["2"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["1", 0], "filename_prefix": "social/x"}}
    await h.post(workflow, "paths4")
    final = await h.wait_final("paths4")
    assert final["error_type"] == "execution"
    assert final["error_message"] == (
        "comfy-courier failed: RuntimeError('cannot read output/social/x_00001_.png')")
    await h.settle()
    [callback] = h.receiver.bodies("paths4")
    assert callback["error_message"] == final["error_message"]
