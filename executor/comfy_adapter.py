"""The one module that touches ComfyUI internals.

It submits prompts the way ComfyUI's POST /prompt does, reads the queue, and observes
completion by wrapping `PromptQueue.task_done` (ComfyUI has no job-finished hook).
Differences between ComfyUI versions are detected here, from signatures and module
attributes, and nowhere else:
- `validate_prompt(prompt_id, prompt[, partial_execution_list])`: 2 or 3 parameters;
- queue items of 5 elements, or 6 with `sensitive` (0.33+); a wrong length kills the worker;
- `task_done(item_id, history_result, status[, process_item])`: passed through as given.

Which queue items are the courier's is known by identity, never by `prompt_id`
(`comfy_items.py` keeps that bookkeeping; the hooks here feed it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
import socket
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from types import ModuleType
from typing import Any

from .comfy_hooks import WorkerHooks
from .comfy_items import CourierItems
from .comfy_port import Completion, Executing, QueueSnapshot, SavedFile, Validation
from .comfy_reports import explain_missing_nodes, parents, relative_paths
from .errors import UnsupportedComfyUI

log = logging.getLogger(__name__)

MIN_VERSION = (0, 3, 45)  # async validate_prompt and get_executing_context
CLIENT_ID = "comfy-courier"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(p) for p in match.groups()) if match else None


class ComfyAdapter:
    client_id = CLIENT_ID

    def __init__(
        self,
        server: Any,
        execution: ModuleType | Any,
        folder_paths: ModuleType | Any,
        get_executing_context: Callable[[], Any],
        interrupt_processing: Callable[[bool], None],
        listen: str = "127.0.0.1",
        port: int = 8188,
        tls: bool = False,
        version: str | None = None,
        progress_hooks: Any = None,
        worker_name: str = "prompt_worker",  # main.py's thread: "Thread-N (prompt_worker)"
        node_types: Callable[[], Collection[str]] | None = None,  # nodes.NODE_CLASS_MAPPINGS
    ) -> None:
        self.server = server
        self.queue = server.prompt_queue
        self.folder_paths = folder_paths
        self.version = version
        self._execution = execution
        self._get_executing_context = get_executing_context
        self._interrupt_processing = interrupt_processing
        self._listen = listen
        self._port = port
        self._tls = tls
        self._worker_seen = False
        self._worker_name = worker_name
        self._node_types = node_types
        self.items = CourierItems(self.queue)  # the courier's queue items, by identity
        self.hooks = WorkerHooks(
            self.queue,
            self.items,
            progress_hooks,
            get_executing_context,
            self.relative_paths,
        )
        validate = getattr(execution, "validate_prompt", None)
        if validate is None or not inspect.iscoroutinefunction(validate):
            raise UnsupportedComfyUI(
                "this ComfyUI has no async execution.validate_prompt; comfy-courier needs "
                f"ComfyUI {'.'.join(map(str, MIN_VERSION))} or newer"
            )
        self._validate = validate
        self._validate_arity = len(inspect.signature(validate).parameters)
        self.queue_item_length = self._detect_queue_item_length()

    @classmethod
    def from_comfyui(cls) -> ComfyAdapter:
        """Build the adapter from the running ComfyUI; raises UnsupportedComfyUI if too old."""
        try:
            import comfy.utils
            import execution
            import folder_paths
            import server
            from comfy.cli_args import args
            from comfy.model_management import interrupt_current_processing
            from comfy_execution.utils import get_executing_context
        except ImportError as e:
            raise UnsupportedComfyUI(
                f"ComfyUI internals missing ({e}); comfy-courier needs ComfyUI "
                f"{'.'.join(map(str, MIN_VERSION))} or newer"
            ) from e
        try:
            from comfyui_version import __version__ as version
        except ImportError:
            version = None
        # ComfyUI's own top-level `nodes`; its mapping grows as custom nodes load
        comfy_nodes = importlib.import_module("nodes")
        parsed = parse_version(version)
        if parsed is not None and parsed < MIN_VERSION:
            raise UnsupportedComfyUI(
                f"ComfyUI {version} is older than {'.'.join(map(str, MIN_VERSION))}"
            )
        return cls(
            server.PromptServer.instance,
            execution,
            folder_paths,
            get_executing_context,
            interrupt_current_processing,
            listen=str(getattr(args, "listen", "127.0.0.1") or "127.0.0.1"),
            port=int(getattr(args, "port", 8188)),
            tls=bool(getattr(args, "tls_keyfile", None)),
            version=version,
            progress_hooks=comfy.utils,
            node_types=lambda: comfy_nodes.NODE_CLASS_MAPPINGS,
        )

    def _detect_queue_item_length(self) -> int:
        # ComfyUI 0.3.68 moved secrets out of extra_data into a 6th `sensitive` element; the
        # same commit added `process_item` to task_done. (SENSITIVE_EXTRA_DATA_KEYS is older,
        # 0.3.45, so it cannot tell the two shapes apart.)
        params = inspect.signature(self.queue.task_done).parameters
        return 6 if "process_item" in params else 5

    # -- identity -----------------------------------------------------------------------

    @property
    def loop(self) -> Any:
        return self.server.loop

    @property
    def routes(self) -> Any:
        return self.server.routes

    def instance_name(self) -> str:
        """Stable across restarts of one ComfyUI process, distinct between its siblings."""
        return f"{socket.gethostname()}:{self._port}"

    def base_url(self) -> str:
        host = self._listen.split(",")[0].strip()
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self._tls else 'http'}://{host}:{self._port}"

    def listens_beyond_loopback(self) -> bool:
        hosts = [h.strip() for h in self._listen.split(",")]
        return any(h not in ("127.0.0.1", "localhost", "::1") for h in hosts)

    def user_directory(self) -> Path:
        return Path(self.folder_paths.get_user_directory())

    def output_directory(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    def relative_paths(self, text: str) -> str:
        return relative_paths(text, self.host_directories())

    def host_directories(self) -> list[tuple[str, str]]:
        """ComfyUI's own directories and what they become in messages leaving the host."""
        fp = self.folder_paths
        found: list[tuple[str, str]] = []
        for label, get in (
            ("output", "get_output_directory"),
            ("input", "get_input_directory"),
            ("temp", "get_temp_directory"),
            ("user", "get_user_directory"),
        ):
            with contextlib.suppress(Exception):
                found.append((str(getattr(fp, get)()), label))
        # model folders, also those of extra_model_paths.yaml: checkpoints/x.safetensors
        for name, entry in (getattr(fp, "folder_names_and_paths", None) or {}).items():
            paths = entry[0] if isinstance(entry, (list, tuple)) and entry else ()
            found += [(str(p), str(name)) for p in paths if isinstance(p, str)]
        for attribute, label in (("models_dir", "models"), ("base_path", "")):
            value = getattr(fp, attribute, None)
            if isinstance(value, str):
                found.append((value, label))
        # what lies beside ComfyUI's folder or the output folder, as ../ paths from them
        anchors = sorted((d for d in found if d[1] in ("", "output")), key=lambda d: d[1])
        return found + [p for directory, label in anchors for p in parents(directory, label)]

    # -- submission ---------------------------------------------------------------------

    def apply_on_prompt_handlers(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """Run the on_prompt handlers /prompt runs (wildcard packs rewrite prompts there)."""
        trigger = getattr(self.server, "trigger_on_prompt", None)
        if trigger is None:
            return prompt
        try:
            json_data = trigger({"prompt": prompt, "client_id": self.client_id})
        except Exception:
            log.exception("[courier] an on_prompt handler failed; running the prompt as sent")
            return prompt
        result = json_data.get("prompt") if isinstance(json_data, dict) else None
        return result if isinstance(result, dict) else prompt

    async def validate(self, prompt_id: str, prompt: dict[str, Any]) -> Validation:
        args: tuple[Any, ...] = (prompt_id, prompt, None)[: self._validate_arity]
        try:
            ok, error, outputs, node_errors = await self._validate(*args)
        except Exception as e:  # validate_prompt raises on shapes it does not expect
            return Validation(
                False,
                {
                    "type": "invalid_prompt",
                    "message": f"Invalid prompt: {e}",
                    "details": type(e).__name__,
                    "extra_info": {},
                },
                [],
                {},
            )
        if not ok:
            known = self._node_types() if self._node_types is not None else None
            explained = explain_missing_nodes(error, prompt, known)
            if explained is not None:
                error, node_errors = explained
        return Validation(bool(ok), error or None, list(outputs or []), dict(node_errors or {}))

    def enqueue(
        self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str]
    ) -> None:
        # By now ComfyUI has installed its own progress hook. The get wrapper chains ours
        # too, but a worker that on_start could not wake (a get() without a timeout) would
        # take this job unwrapped.
        self.hooks.chain_progress_hook()
        # The queue's lock is re-entrant: numbers are taken in the order jobs are queued.
        with self.queue.mutex:
            number = self.server.number
            self.server.number += 1
            item: tuple[Any, ...] = (number, prompt_id, prompt, extra_data, outputs)
            if self.queue_item_length == 6:
                item += ({},)  # `sensitive`: the courier never puts secrets in a job
            self.items.put(prompt_id, item)

    # -- the queue ----------------------------------------------------------------------

    def queue_length(self) -> int:
        with self.queue.mutex:
            return len(self.queue.currently_running) + len(self.queue.queue)

    def queue_snapshot(self) -> QueueSnapshot:
        return self.items.snapshot()

    def remove_pending(self, prompt_id: str) -> bool:
        return self.items.remove(prompt_id)

    def worker_alive(self) -> bool | None:
        """Is ComfyUI's prompt worker thread alive? None until one has been seen.

        Any exception in it kills it (in every version), after which nothing queued runs.
        """
        alive = any(self._worker_name in t.name for t in threading.enumerate())
        if alive:
            self._worker_seen = True
        return alive if self._worker_seen else None

    def on_server_start(self, callback: Callable[[], None]) -> None:
        """Run `callback` once ComfyUI serves: every custom node is loaded by then.

        Custom nodes are imported while the loop runs (0.3.48+); starting earlier could
        validate a resubmitted workflow before the nodes it uses are registered.
        """

        async def on_startup(app: Any) -> None:
            callback()

        self.server.app.on_startup.append(on_startup)

    def running_prompt(self, prompt_id: str) -> dict[str, Any] | None:
        with self.queue.mutex:
            for item in self.queue.currently_running.values():
                if item[1] == prompt_id:
                    return dict(item[2])
        return None

    def interrupt(self, prompt_id: str) -> bool:
        """Interrupt only if the courier's item for this prompt is the one running: the
        flag is global. Under the queue's lock, so the worker cannot move on meanwhile."""
        with self.queue.mutex:
            if not self.items.running(prompt_id):
                return False
            atomic = getattr(self.queue, "interrupt_if_running", None)  # ComfyUI 0.26+
            if atomic is not None:
                return bool(atomic(prompt_id))
            self._interrupt_processing(True)
        return True

    # -- the worker's hooks (comfy_hooks.py) ---------------------------------------------

    def on_start(self, callback: Callable[[str], None]) -> None:
        self.worker_alive()  # ComfyUI starts its worker before it serves: note it now
        self.hooks.on_start(callback)

    def on_progress(self, callback: Callable[[str, float], None]) -> None:
        self.hooks.on_progress(callback)

    def on_completion(self, callback: Callable[[Completion], None]) -> None:
        self.hooks.on_completion(callback)

    def notify_client(self, prompt_id: str, event: str, data: dict[str, Any]) -> None:
        """Send a websocket event to the browser that queued `prompt_id` (UI runs only)."""
        client_id = None
        with self.queue.mutex:
            for item in self.queue.currently_running.values():
                if item[1] == prompt_id:
                    client_id = item[3].get("client_id")
            entry = self.queue.history.get(prompt_id) if client_id is None else None
        if entry is not None:
            prompt = entry.get("prompt")
            if (
                isinstance(prompt, (list, tuple))
                and len(prompt) > 3
                and isinstance(prompt[3], dict)
            ):
                client_id = prompt[3].get("client_id")
        if client_id and client_id != self.client_id:
            self.server.send_sync(event, data, client_id)

    # -- nodes --------------------------------------------------------------------------

    def executing(self) -> Executing | None:
        """The node running on this thread, and whether its prompt is a courier item."""
        context = self._get_executing_context()
        if context is None:
            return None
        prompt_id = str(context.prompt_id)
        return Executing(prompt_id, str(context.node_id), self.items.executing == prompt_id)

    def save_path(self, prefix: str, width: int, height: int) -> tuple[str, str, int, str, str]:
        """folder_paths.get_save_image_path: refuses prefixes that leave the output folder."""
        folder, filename, counter, subfolder, full_prefix = self.folder_paths.get_save_image_path(
            prefix, self.folder_paths.get_output_directory(), width, height
        )
        return str(folder), str(filename), int(counter), str(subfolder), str(full_prefix)

    def output_files(self, outputs: dict[str, Any]) -> list[SavedFile]:
        """Files of output nodes (type 'output', never temp previews) from a history result."""
        root = self.output_directory()
        files: list[SavedFile] = []
        for node_id, ui in outputs.items():
            if not isinstance(ui, dict):
                continue
            index = 0
            for entry in ui.get("images") or []:
                if not isinstance(entry, dict) or entry.get("type") != "output":
                    continue
                path = (root / str(entry.get("subfolder") or "") / str(entry["filename"])).resolve()
                if root.resolve() not in path.parents:
                    continue
                files.append(SavedFile(str(node_id), index, path))
                index += 1
        return files
