"""A stand-in for the parts of ComfyUI the courier touches, for tests where a real one cannot run.

It mirrors the real signatures and shapes (design.md, "ComfyUI facts"), in two flavours:
- "0.3.64": queue items (number, prompt_id, prompt, extra_data, outputs_to_execute),
  task_done(item_id, history_result, status);
- "0.33.0": a 6th `sensitive` element, task_done(..., process_item=None), and
  `execution.SENSITIVE_EXTRA_DATA_KEYS`; a 5-element item kills the worker thread, as
  it does in the real one.
The worker executes a small graph language: EmptyImage, SaveImage, SaveAndCallback (the
real node class), plus test nodes that fail, sleep (interruptibly) or block.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import io
import json
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
from aiohttp import web
from PIL import Image
from PIL.PngImagePlugin import PngInfo


class ExecutionStatus(NamedTuple):
    status_str: str
    completed: bool
    messages: list[tuple[str, dict[str, Any]]]


class InterruptProcessingException(Exception):
    pass


# -- folder_paths ----------------------------------------------------------------------


class FolderPaths:
    """folder_paths: ComfyUI's directories and get_save_image_path's contract."""

    def __init__(self, base: Path) -> None:
        self.base_path = str(base)
        self.models_dir = str(base / "models")
        self.folder_names_and_paths = {
            "checkpoints": ([str(base / "models" / "checkpoints")], {".safetensors"})}
        self.output_directory = str(base / "output")
        self.input_directory = str(base / "input")
        self.temp_directory = str(base / "temp")
        self.user_directory = str(base / "user")
        for directory in (self.output_directory, self.input_directory, self.user_directory):
            os.makedirs(directory, exist_ok=True)

    def get_output_directory(self) -> str:
        return self.output_directory

    def get_input_directory(self) -> str:
        return self.input_directory

    def get_temp_directory(self) -> str:
        return self.temp_directory

    def get_user_directory(self) -> str:
        return self.user_directory

    def get_save_image_path(
        self, filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
    ) -> tuple[str, str, int, str, str]:
        """(full_output_folder, filename, counter, subfolder, filename_prefix), refusing escapes."""
        prefix = filename_prefix.replace("%width%", str(image_width)).replace(
            "%height%", str(image_height)
        )
        subfolder = os.path.dirname(os.path.normpath(prefix))
        filename = os.path.basename(os.path.normpath(prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
                f"\n         output_dir: {output_dir}"
            )
        os.makedirs(full_output_folder, exist_ok=True)
        pattern = re.compile(re.escape(filename) + r"_(\d+)_")
        numbers = [
            int(m.group(1))
            for f in os.listdir(full_output_folder)
            if (m := pattern.match(f))
        ]
        counter = max(numbers, default=0) + 1
        return full_output_folder, filename, counter, subfolder, prefix


# -- the prompt queue ------------------------------------------------------------------


class PromptQueue:
    """execution.PromptQueue: a heap of items, currently_running and history."""

    def __init__(self, server: Any, version: str) -> None:
        self.server = server
        self.version = version
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[tuple[Any, ...]] = []
        self.currently_running: dict[int, tuple[Any, ...]] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}

    def put(self, item: tuple[Any, ...]) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[tuple[Any, ...], int] | None:
        with self.not_empty:
            while len(self.queue) == 0:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and len(self.queue) == 0:
                    return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            return item, i

    def _task_done(self, item_id: int, history_result: dict[str, Any], status: Any,
                   process_item: Callable[[Any], Any] | None = None) -> None:
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            if process_item is not None:
                prompt = process_item(prompt)
            status_dict = None
            if status is not None:
                status_dict = status._asdict()
            self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": status_dict}
            self.history[prompt[1]].update(history_result)

    def get_current_queue(self) -> tuple[list[Any], list[Any]]:
        with self.mutex:
            return list(self.currently_running.values()), copy.deepcopy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []

    def delete_queue_item(self, function: Callable[[Any], bool]) -> bool:
        with self.mutex:
            for x in range(len(self.queue)):
                if function(self.queue[x]):
                    if len(self.queue) == 1:
                        self.wipe_queue()
                    else:
                        self.queue.pop(x)
                        heapq.heapify(self.queue)
                    return True
        return False

    def get_history(self, prompt_id: str | None = None) -> dict[str, Any]:
        with self.mutex:
            if prompt_id is None:
                return copy.deepcopy(self.history)
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}


class PromptQueue0364(PromptQueue):
    def task_done(self, item_id: int, history_result: dict[str, Any], status: Any) -> None:
        self._task_done(item_id, history_result, status)


class PromptQueue033(PromptQueue):
    def task_done(self, item_id: int, history_result: dict[str, Any], status: Any,
                  process_item: Callable[[Any], Any] | None = None) -> None:
        self._task_done(item_id, history_result, status, process_item)

    def get_current_queue_volatile(self) -> tuple[list[Any], list[Any]]:
        with self.mutex:
            return list(self.currently_running.values()), list(self.queue)


# -- nodes the stand-in worker can run --------------------------------------------------


class Context(NamedTuple):
    prompt_id: str
    node_id: str
    list_index: int | None


_context = threading.local()


def get_executing_context() -> Context | None:
    return getattr(_context, "value", None)


class StandinNodes:
    """The worker's node implementations (except SaveAndCallback, which is the real one)."""

    def __init__(self, comfy: StandinComfy) -> None:
        self.comfy = comfy

    def EmptyImage(self, width: int = 64, height: int = 64, batch_size: int = 1,
                   color: int = 0) -> np.ndarray:
        rgb = [(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF]
        image = np.empty((batch_size, height, width, 3), dtype=np.float32)
        image[...] = np.array(rgb, dtype=np.float32) / 255.0
        return image

    def SaveImage(self, images: np.ndarray, filename_prefix: str = "ComfyUI",
                  prompt: Any = None) -> dict[str, Any]:
        folder, filename, counter, subfolder, _ = self.comfy.folder_paths.get_save_image_path(
            filename_prefix, self.comfy.folder_paths.get_output_directory(),
            images.shape[2], images.shape[1])
        results = []
        for batch_number, frame in enumerate(images):
            pixels = np.clip(255.0 * frame, 0, 255).astype(np.uint8)
            metadata = PngInfo()
            if prompt is not None:  # what the real SaveImage does: the prompt goes in the file
                metadata.add_text("prompt", json.dumps(prompt))
            file = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            Image.fromarray(pixels).save(os.path.join(folder, file), pnginfo=metadata,
                                         compress_level=4)
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}

    def PreviewImage(self, images: np.ndarray) -> dict[str, Any]:
        return {"ui": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}}

    def FailingNode(self, images: Any = None, message: str = "boom") -> Any:
        raise RuntimeError(message)

    def SlowNode(self, images: Any, seconds: float = 1.0) -> Any:
        """Sleeps, checking the interrupt flag like ComfyUI's progress points do."""
        steps = max(1, int(seconds / 0.005))
        hook = self.comfy.utils.PROGRESS_BAR_HOOK  # what comfy.utils.ProgressBar captures
        for step in range(1, steps + 1):
            if self.comfy.interrupted:
                self.comfy.interrupted = False
                raise InterruptProcessingException()
            time.sleep(0.005)
            if hook is not None:
                hook(step, steps, None, node_id=get_executing_context().node_id)
        return images

    def BlockingNode(self, images: Any, seconds: float = 1.0) -> Any:
        """Stuck in I/O: ignores the interrupt flag, as a real node in a network call does."""
        time.sleep(seconds)
        return images


OUTPUT_NODES = {"SaveImage", "SaveAndCallback", "PreviewImage"}
REQUIRED = {
    "EmptyImage": (),
    "SaveImage": ("images",),
    "SaveAndCallback": ("images",),
    "PreviewImage": ("images",),
    "FailingNode": (),
    "SlowNode": ("images",),
    "BlockingNode": ("images",),
}


class StandinComfy:
    """PromptServer + PromptQueue + worker thread + folder_paths, wired as in ComfyUI."""

    def __init__(self, base: Path, version: str = "0.3.64", port: int = 8188) -> None:
        from comfy_courier.nodes import NODE_CLASS_MAPPINGS

        self.version = version
        self.folder_paths = FolderPaths(base)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.routes = web.RouteTableDef()
        self.number = 0
        self.client_id: str | None = None
        self.on_prompt_handlers: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
        self.prompt_queue: PromptQueue = (
            PromptQueue033(self, version)
            if version.startswith("0.33")
            else PromptQueue0364(self, version)
        )
        self.interrupted = False
        self.nodes = StandinNodes(self)
        self.save_and_callback = NODE_CLASS_MAPPINGS["SaveAndCallback"]
        self.worker_error: BaseException | None = None
        self.executed: list[str] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        execution = SimpleNamespace(
            validate_prompt=self.validate_prompt,
            SENSITIVE_EXTRA_DATA_KEYS=("auth_token_comfy_org", "api_key_comfy_org"),  # 0.3.45+
        )
        self.execution = execution
        self.port = port
        self.worker_name = f"standin-{id(self):x} (prompt_worker)"
        self.utils = SimpleNamespace(PROGRESS_BAR_HOOK=None)  # comfy.utils
        self.sent: list[tuple[str, dict[str, Any], str | None]] = []  # send_sync messages

    # PromptServer surface
    @property
    def server(self) -> StandinComfy:
        return self

    def trigger_on_prompt(self, json_data: dict[str, Any]) -> dict[str, Any]:
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:
                traceback.print_exc()
        return json_data

    def add_on_prompt_handler(self, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.on_prompt_handlers.append(handler)

    def send_sync(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        self.sent.append((event, data, sid))

    def interrupt_processing(self, value: bool = True) -> None:
        self.interrupted = value

    def make_app(self) -> web.Application:
        """Like PromptServer.add_routes: every route also under /api."""
        app = web.Application()
        app.add_routes(self.routes)
        api = web.RouteTableDef()
        for route in self.routes:
            if isinstance(route, web.RouteDef):
                api.route(route.method, "/api" + route.path)(route.handler, **route.kwargs)
        app.add_routes(api)
        return app

    def adapter(self) -> Any:
        from comfy_courier.executor.comfy_adapter import ComfyAdapter

        return ComfyAdapter(self, self.execution, self.folder_paths, get_executing_context,
                            self.interrupt_processing, port=self.port, version=self.version,
                            progress_hooks=self.utils, worker_name=self.worker_name,
                            node_types=lambda: REQUIRED)

    # execution.validate_prompt
    async def validate_prompt(self, prompt_id: str, prompt: dict[str, Any],
                              partial_execution_list: list[str] | None) -> tuple[Any, ...]:
        outputs = set()
        for node_id, node in prompt.items():
            if "class_type" not in node:
                return (False, {"type": "invalid_prompt", "message": "Cannot execute because a "
                                "node is missing the class_type property.",
                                "details": f"Node ID '#{node_id}'", "extra_info": {}}, [], {})
            class_type = node["class_type"]
            if class_type not in REQUIRED and not self.version.startswith("0.33"):
                return (False, {"type": "invalid_prompt",
                                "message": f"Cannot execute because node {class_type} does not "
                                "exist.", "details": f"Node ID '#{node_id}'", "extra_info": {}},
                        [], {})
            if class_type not in REQUIRED:
                title = node.get("_meta", {}).get("title", class_type)
                return (False, {"type": "missing_node_type",
                                "message": f"Node '{title}' not found. The custom node may not "
                                "be installed.", "details": f"Node ID '#{node_id}'",
                                "extra_info": {"node_id": node_id, "class_type": class_type,
                                               "node_title": title}}, [], {})
            if node["class_type"] in OUTPUT_NODES:
                outputs.add(node_id)
        if not outputs:
            return (False, {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                            "details": "", "extra_info": {}}, [], {})
        good, node_errors = [], {}
        for output in sorted(outputs):
            errors = self._input_errors(prompt, output, set())
            if errors:
                for node_id, errs in errors.items():
                    entry = node_errors.setdefault(node_id, {
                        "errors": errs, "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"]})
                    entry["dependent_outputs"].append(output)
            else:
                good.append(output)
        if not good:
            return (False, {"type": "prompt_outputs_failed_validation",
                            "message": "Prompt outputs failed validation", "details": "",
                            "extra_info": {}}, [], node_errors)
        return (True, None, good, node_errors)

    def _input_errors(self, prompt: dict[str, Any], node_id: str,
                      seen: set[str]) -> dict[str, list[dict[str, Any]]]:
        if node_id in seen:
            return {}
        seen.add(node_id)
        node = prompt[node_id]
        errors: dict[str, list[dict[str, Any]]] = {}
        for name in REQUIRED[node["class_type"]]:
            value = node.get("inputs", {}).get(name)
            if value is None:
                errors.setdefault(node_id, []).append({
                    "type": "required_input_missing", "message": "Required input is missing",
                    "details": name, "extra_info": {"input_name": name}})
        for value in node.get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                errors.update(self._input_errors(prompt, str(value[0]), seen))
        return errors

    # the worker
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # named like ComfyUI's own ("Thread-N (prompt_worker)"): the adapter watches for it
        self._thread = threading.Thread(target=self._worker, name=self.worker_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        with self.prompt_queue.not_empty:
            self.prompt_queue.not_empty.notify_all()
        if self._thread:
            self._thread.join(timeout=5)

    @property
    def worker_alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _worker(self) -> None:
        queue = self.prompt_queue
        while not self._stop:
            got = queue.get(timeout=0.05)
            if got is None:
                continue
            item, item_id = got
            try:
                if self.version.startswith("0.33"):
                    sensitive = item[5]  # the real worker indexes it: a 5-tuple kills it
                    extra_data = {**item[3], **sensitive}
                else:
                    extra_data = item[3]
            except IndexError as e:
                self.worker_error = e
                raise
            prompt_id, prompt, outputs = item[1], item[2], item[4]
            status, history_result = self._execute(prompt_id, prompt, outputs, extra_data)
            if isinstance(queue, PromptQueue033):
                queue.task_done(item_id, history_result, status=status,
                                process_item=lambda i: i[:5])
            else:
                queue.task_done(item_id, history_result, status=status)

    def _execute(self, prompt_id: str, prompt: dict[str, Any], outputs: list[str],
                 extra_data: dict[str, Any]) -> tuple[ExecutionStatus, dict[str, Any]]:
        messages: list[tuple[str, dict[str, Any]]] = [
            ("execution_start", {"prompt_id": prompt_id, "timestamp": int(time.time() * 1000)})]
        values: dict[str, Any] = {}
        ui: dict[str, Any] = {}
        self.interrupted = False

        def run(node_id: str) -> Any:
            if node_id in values:
                return values[node_id]
            node = prompt[node_id]
            kwargs = {}
            for name, value in node.get("inputs", {}).items():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    kwargs[name] = run(str(value[0]))
                else:
                    kwargs[name] = value
            _context.value = Context(prompt_id, node_id, None)
            current["node"] = node_id
            try:
                class_type = node["class_type"]
                if class_type == "SaveAndCallback":
                    result = getattr(self.save_and_callback(), self.save_and_callback.FUNCTION)(
                        **kwargs)
                elif class_type == "SaveImage":
                    result = self.nodes.SaveImage(prompt=prompt, **kwargs)
                else:
                    result = getattr(self.nodes, class_type)(**kwargs)
            finally:
                _context.value = None
            self.executed.append(node_id)
            if isinstance(result, dict) and "ui" in result:
                ui[node_id] = result["ui"]
            values[node_id] = result
            return result

        current = {"node": outputs[0] if outputs else ""}
        try:
            for output in outputs:
                run(output)
        except InterruptProcessingException:
            messages.append(("execution_interrupted", {
                "prompt_id": prompt_id, "node_id": current["node"],
                "node_type": prompt[current["node"]]["class_type"], "executed": list(values),
                "timestamp": int(time.time() * 1000)}))
            return ExecutionStatus("error", False, messages), {"outputs": ui, "meta": {}}
        except Exception as e:
            failing = current["node"]
            messages.append(("execution_error", {
                "prompt_id": prompt_id, "node_id": failing,
                "node_type": prompt[failing]["class_type"], "executed": list(values),
                "exception_message": str(e), "exception_type": type(e).__name__,
                "traceback": traceback.format_tb(e.__traceback__), "current_inputs": {},
                "current_outputs": {}, "timestamp": int(time.time() * 1000)}))
            return ExecutionStatus("error", False, messages), {"outputs": ui, "meta": {}}
        messages.append(("execution_success", {"prompt_id": prompt_id,
                                               "timestamp": int(time.time() * 1000)}))
        return ExecutionStatus("success", True, messages), {"outputs": ui, "meta": {}}


def image_metadata(data: bytes) -> dict[str, str]:
    """Text a PNG carries, and EXIF/XMP/comments a JPEG or WebP carries: {} when clean."""
    with Image.open(io.BytesIO(data)) as image:
        found = {k: str(v) for k, v in (getattr(image, "text", {}) or {}).items()}
        for key in ("exif", "xmp", "comment"):
            if image.info.get(key):
                found[key] = str(image.info[key])[:200]
        return found
