"""Local storage on any file system: ids that differ only in case, and ids that are Windows
device names, get files of their own (issue 15, item 9)."""

from __future__ import annotations

import itertools
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

import pytest

from comfy_courier.executor.errors import StorageError
from comfy_courier.executor.storage.local import (
    WINDOWS_RESERVED,
    LocalStorage,
    local_name,
    local_path,
)

from conftest import model_free

IDS = ["first-call-1", "Job1", "job1", "JOB1", "jOb1", "con", "CON", "Con", "con_", "CON_",
       "nul", "NUL", "COM1", "com1", "com0", "LPT9", "lpt0", "aux", "prn", "a", "A", "_", "-",
       "A" * 128, "Ab" * 64, "a_b-C", "ui", "UI", "Ui"]


def windows_device(name: str) -> bool:
    """Would Windows refuse this as a file or folder name? (the part before the first dot)"""
    return name.split(".")[0].rstrip(" .").lower() in WINDOWS_RESERVED


def test_local_names_are_distinct_on_case_insensitive_file_systems():
    names = [local_name(i) for i in IDS]
    assert len({n.casefold() for n in names}) == len(IDS), names
    assert all(n == n.lower() for n in names)


def test_local_names_are_never_windows_device_names_and_fit_a_file_system():
    for name in map(local_name, IDS + ["nul.png", "CON.jpg", "Node-1.png", "12:3-1.png"]):
        assert not windows_device(name), name
        assert len(name) <= 255 and "~" not in name and not name.endswith((".", " "))


def test_local_names_keep_readable_ids_and_image_extensions_as_they_are():
    assert local_name("first-call-1") == "first-call-1"
    assert local_name("1-1.jpg") == "1-1.jpg"
    assert local_name("Job1") == "job1.1"  # capitals kept in a tag: bit 0 = first char
    assert local_name("con") == "con_.r"
    assert local_name("Node-1.png") == "node-1.1.png"


def test_file_names_with_and_without_a_tag_never_meet():
    parts = ["".join(p) for p in itertools.product("aB", repeat=4)]
    parts += [p + ".png" for p in parts] + [p + ".a" for p in parts] + ["aaaa.5", "aaaa.r"]
    names = [local_name(p) for p in parts]
    assert len({n.casefold() for n in names}) == len(parts)


def test_keys_outside_the_folder_are_refused():
    for key in ("../x/1-1.png", "/etc/1-1.png", "a/../../1-1.png"):
        with pytest.raises(StorageError):
            local_path(key)


@pytest.mark.parametrize("output_node", ["SaveAndCallback", "SaveImage"])
async def test_ids_differing_in_case_or_naming_a_device_get_files_of_their_own(
        make_harness, receiver, output_node):
    # SaveAndCallback's own file is what local storage serves; SaveImage's is copied
    # under courier/ (stripped of its metadata): both are named by the id
    h = await make_harness()
    ids = ["Job1", "job1", "CON", "nul", "COM1", "Lpt9"]
    for n, cid in enumerate(ids):
        workflow = model_free()
        workflow["2"]["class_type"] = output_node
        workflow["1"]["inputs"]["color"] = 0x111111 * (n + 1)  # a picture of its own
        assert (await h.post(workflow, cid))[0] == 202
    files: dict[str, Path] = {}
    for cid in ids:
        final = await h.wait_final(cid)
        assert final["state"] == "success", final
        query = parse_qs(urlsplit(final["image_url"]).query)
        relative = PurePosixPath(query["subfolder"][0], query["filename"][0])
        assert not any(windows_device(part) for part in relative.parts), relative
        files[cid] = h.courier.storage._root.parent.joinpath(*relative.parts)
    # one file each, even where the file system folds case (Windows, macOS)
    assert len({str(path).casefold() for path in files.values()}) == len(ids)
    assert len({path.read_bytes() for path in files.values()}) == len(ids)


async def test_local_urls_are_stable_for_an_id(tmp_path):
    storage = LocalStorage(tmp_path, lambda: "http://courier.test:8188")
    first = await storage.put("Job1/1-1.jpg", b"a", "image/jpeg")
    again = await storage.put("Job1/1-1.jpg", b"b", "image/jpeg")  # an upsert: same URL
    assert first == again == (
        "http://courier.test:8188/view?filename=1-1.jpg&subfolder=courier%2Fjob1.1&type=output")
    assert (tmp_path / "courier" / "job1.1" / "1-1.jpg").read_bytes() == b"b"
