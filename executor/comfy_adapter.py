"""The one module that touches ComfyUI internals.

It submits prompts the way ComfyUI's POST /prompt does, reads the queue, and observes
completion by wrapping `PromptQueue.task_done` (ComfyUI has no job-finished hook).
Differences between ComfyUI versions are detected here, from signatures and module
attributes, and nowhere else:
- `validate_prompt(prompt_id, prompt[, partial_execution_list])`: 2 or 3 parameters;
- queue items of 5 elements, or 6 with `sensitive` (0.33+); a wrong length kills the worker;
- `task_done(item_id, history_result, status[, process_item])`: passed through as given.
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

from .comfy_port import Completion, QueueSnapshot, SavedFile, Validation
from .comfy_reports import explain_missing_nodes, relative_paths
from .errors import UnsupportedComfyUI

log = logging.getLogger(__name__)

MIN_VERSION = (0, 3, 45)  # async validate_prompt and get_executing_context
CLIENT_ID = "comfy-courier"
_WRAPPED = "_courier_wrapped"


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
        self._progress_hooks = progress_hooks  # comfy.utils: PROGRESS_BAR_HOOK lives there
        self._progress_callback: Callable[[str, float], None] | None = None
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
        return found

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
        self._chain_progress_hook()
        # The queue's lock is re-entrant: numbers are taken in the order jobs are queued.
        with self.queue.mutex:
            number = self.server.number
            self.server.number += 1
            item: tuple[Any, ...] = (number, prompt_id, prompt, extra_data, outputs)
            if self.queue_item_length == 6:
                item += ({},)  # `sensitive`: the courier never puts secrets in a job
            if self.queue.put(item) is False:  # some newer queues refuse a reused prompt_id
                raise RuntimeError(f"ComfyUI refused to queue prompt {prompt_id}")

    # -- the queue ----------------------------------------------------------------------

    def queue_length(self) -> int:
        with self.queue.mutex:
            return len(self.queue.currently_running) + len(self.queue.queue)

    def queue_snapshot(self) -> QueueSnapshot:
        # Read ids under the queue's own lock; get_current_queue() would deep-copy every
        # pending prompt, which costs milliseconds on a long queue.
        with self.queue.mutex:
            running = frozenset(item[1] for item in self.queue.currently_running.values())
            pending = {item[1]: item[0] for item in self.queue.queue}
        return QueueSnapshot(running, pending)

    def remove_pending(self, prompt_id: str) -> bool:
        return bool(self.queue.delete_queue_item(lambda item: item[1] == prompt_id))

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
        """Interrupt only if this prompt is the one running: the flag is global."""
        atomic = getattr(self.queue, "interrupt_if_running", None)  # ComfyUI 0.26+
        if atomic is not None:
            return bool(atomic(prompt_id))
        with self.queue.mutex:
            running = {item[1] for item in self.queue.currently_running.values()}
            if prompt_id not in running:
                return False
            self._interrupt_processing(True)
        return True

    def on_start(self, callback: Callable[[str], None]) -> None:
        """Call `callback(prompt_id)` on the worker thread when it takes a prompt to run."""
        self.worker_alive()  # ComfyUI starts its worker before it serves: note it now
        queue = self.queue
        original = queue.get
        if getattr(original, _WRAPPED, False):
            original = original.__wrapped__

        def get(*args: Any, **kwargs: Any) -> Any:
            taken = original(*args, **kwargs)
            if taken is not None:
                try:
                    self._chain_progress_hook()
                    callback(str(taken[0][1]))
                except Exception:  # never break ComfyUI's worker
                    log.exception("[courier] start hook failed")
            return taken

        get.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(get, _WRAPPED, True)
        queue.get = get
        # The idle worker has sat in the unwrapped get() since start-up (ComfyUI waits up
        # to 1000 s), and would take the first job without this hook. Woken with an empty
        # queue, ComfyUI's get() returns None, which its worker takes for a timeout; its
        # next call is the wrapper.
        with queue.not_empty:
            queue.not_empty.notify_all()

    def on_progress(self, callback: Callable[[str, float], None]) -> None:
        """Call `callback(prompt_id, value/total)` on the worker thread for progress bars.

        ComfyUI installs its own global progress hook after custom nodes load, so ours is
        chained onto whatever is installed when a prompt is queued or taken, not now.
        """
        self._progress_callback = callback

    def _chain_progress_hook(self) -> None:
        hooks = self._progress_hooks
        if hooks is None or self._progress_callback is None:
            return
        current = getattr(hooks, "PROGRESS_BAR_HOOK", None)
        if getattr(current, _WRAPPED, False):
            return
        callback = self._progress_callback

        def hook(value: Any, total: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                context = self._get_executing_context()
                if context is not None and total:
                    callback(str(context.prompt_id), float(value) / float(total))
            except Exception:  # never break a node's progress bar
                log.exception("[courier] progress hook failed")
            if current is not None:
                return current(value, total, *args, **kwargs)
            return None

        setattr(hook, _WRAPPED, True)
        hooks.PROGRESS_BAR_HOOK = hook

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

    def on_completion(self, callback: Callable[[Completion], None]) -> None:
        """Call `callback` on the worker thread when a prompt leaves execution."""
        queue = self.queue
        original = queue.task_done
        if getattr(original, _WRAPPED, False):
            original = original.__wrapped__

        def task_done(
            item_id: Any, history_result: Any, status: Any, *args: Any, **kwargs: Any
        ) -> Any:
            item = queue.currently_running.get(item_id)
            if item is not None:
                try:
                    callback(_completion(item[1], history_result, status, self._scrub))
                except Exception:  # never break ComfyUI's worker
                    log.exception("[courier] completion hook failed")
            return original(item_id, history_result, status, *args, **kwargs)

        task_done.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(task_done, _WRAPPED, True)
        queue.task_done = task_done

    def _scrub(self, text: str) -> str:
        """ComfyUI's directories made relative: error messages go to callbacks and status."""
        return relative_paths(text, self.host_directories())

    # -- nodes --------------------------------------------------------------------------

    def executing(self) -> tuple[str, str] | None:
        """(prompt_id, node_id) of the node running on this thread, if any."""
        context = self._get_executing_context()
        if context is None:
            return None
        return str(context.prompt_id), str(context.node_id)

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


def _completion(
    prompt_id: str, history_result: Any, status: Any, scrub: Callable[[str], str] = str
) -> Completion:
    outputs: Any = history_result
    if isinstance(history_result, dict) and "outputs" in history_result:
        outputs = history_result["outputs"]
    status_str = getattr(status, "status_str", None) or "success"
    messages = [
        (str(m[0]), dict(m[1]) if isinstance(m[1], dict) else {})
        for m in (getattr(status, "messages", None) or [])
        if isinstance(m, (list, tuple)) and len(m) == 2
    ]
    for _, data in messages:  # copies: ComfyUI's history keeps its own
        if isinstance(data.get("exception_message"), str):
            data["exception_message"] = scrub(data["exception_message"])
    return Completion(prompt_id, status_str, messages, dict(outputs or {}))
