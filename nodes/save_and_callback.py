"""SaveAndCallback: save images like SaveImage, and hand them to the courier for delivery.

The node runs on ComfyUI's worker thread, which must never wait on the network: it
encodes, writes the files (the UI preview and crash recovery need them on disk), passes
the bytes to the server loop without waiting, and returns its UI dict.

A job's files go to a folder of their own, `<prefix folder>/<content_request_id>/`:
ComfyUI numbers a saved file by listing its whole folder, so with one shared folder every
save got slower as the folder grew (measured with ComfyUI 0.33's `get_save_image_path`:
27 ms of the worker's time, holding the GIL, at 20,000 files; 0.03 ms in a folder of its
own).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..executor.images import FORMATS, encode, to_uint8_batch
from ..executor.storage.local import SUBFOLDER, local_name
from ..wiring import current_runtime

log = logging.getLogger(__name__)


def job_prefix(filename_prefix: str, content_request_id: str) -> str:
    """A job's files go to `courier/<id folder>/<filename_prefix>`: with local storage they
    are what the URL serves, in the one folder a reverse proxy lets through (deploy/)."""
    # the id as local storage names it: a folder of its own on any file system, also for
    # ids that differ only in case, and never a name Windows refuses (`Job1` -> `job1.1`)
    folder = local_name(content_request_id)
    prefix = os.path.normpath(filename_prefix)
    if os.path.isabs(prefix) or prefix.split(os.sep)[0] == "..":
        return filename_prefix  # leaves the output folder: ComfyUI refuses it, as for SaveImage
    return os.path.join(SUBFOLDER, folder, prefix)


class SaveAndCallback:
    CATEGORY = "courier"
    DESCRIPTION = (
        "Saves images to the output folder and delivers them to storage; for jobs sent to "
        "/execute-workflow, the backend gets one callback with the URLs when the prompt ends."
    )
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save and deliver."}),
            },
            "optional": {
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "courier",
                        "tooltip": "Prefix of the files in ComfyUI's output folder; may contain a "
                        "subfolder and %date:yyyy-MM-dd% like SaveImage.",
                    },
                ),
                "format": (
                    list(FORMATS),
                    {
                        "default": "jpeg",
                        "tooltip": "jpeg (default): a 1080x1920 image in ~20 ms and ~0.4 MB, "
                        "accepted by every social network; webp is smaller but ~10x slower "
                        "to encode; png is lossless, ~20x slower and ~8x larger.",
                    },
                ),
                "quality": (
                    "INT",
                    {
                        "default": 90,
                        "min": 1,
                        "max": 100,
                        "step": 1,
                        "tooltip": "Quality for webp and jpeg (ignored for png).",
                    },
                ),
                "content_request_id": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Filled in by /execute-workflow. Leave empty when running from "
                        "the UI: images then go to storage under ui/<prompt_id>/ and no "
                        "callback is sent.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        # NaN never equals itself, so ComfyUI never serves this node from its cache:
        # every job must save, upload and report.
        return float("nan")

    def save(
        self,
        images: Any,
        filename_prefix: str = "courier",
        format: str = "jpeg",
        quality: int = 90,
        content_request_id: str = "",
    ) -> dict[str, Any]:
        runtime = current_runtime()
        if runtime is None:
            raise RuntimeError("comfy-courier is not running in this ComfyUI; see its log")
        adapter = runtime.adapter
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        frames = to_uint8_batch(images)
        height, width = frames[0].shape[:2]
        prefix = filename_prefix
        if content_request_id:  # a job sent to /execute-workflow
            prefix = job_prefix(filename_prefix, content_request_id)
        folder, filename, counter, subfolder, _ = adapter.save_path(prefix, width, height)
        context = adapter.executing()
        prompt_id, node_id = (context.prompt_id, context.node_id) if context else ("", "")
        # the job's images only when ComfyUI runs the item the courier put: a prompt queued
        # through /prompt under a job's prompt_id is an ordinary run
        courier_item = bool(context and context.courier_item)
        text = self._metadata(runtime, prompt_id)

        saved = []
        ui_images = []
        for batch_number, pixels in enumerate(frames):
            image = encode(pixels, format, quality, text)
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.{image.extension}"
            path = Path(folder) / file
            with open(path, "wb") as handle:
                handle.write(image.data)
            saved.append((image, path))
            ui_images.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1

        courier = runtime.courier
        if courier is not None and prompt_id:
            courier.from_worker(
                courier.images_saved, prompt_id, node_id, content_request_id, saved, courier_item
            )
        return {"ui": {"images": ui_images}}

    @staticmethod
    def _metadata(runtime: Any, prompt_id: str) -> dict[str, str] | None:
        """Only with COURIER_KEEP_METADATA=1: the prompt, as SaveImage would write it."""
        if not runtime.settings.keep_metadata or not prompt_id:
            return None
        prompt = runtime.adapter.running_prompt(prompt_id)
        return {"prompt": json.dumps(prompt)} if prompt is not None else None
