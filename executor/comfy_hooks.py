"""The hooks on ComfyUI's worker thread: a courier item starts, reports progress, ends.

ComfyUI has no job hooks, so `PromptQueue.get` and `task_done` and the global progress
bar hook are wrapped (idempotently: a wrapper is never wrapped twice). `comfy_adapter`
passes in ComfyUI's objects; nothing here imports ComfyUI. A hook never raises into
ComfyUI's worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .comfy_items import CourierItems
from .comfy_port import Completion

log = logging.getLogger(__name__)

_WRAPPED = "_courier_wrapped"


class WorkerHooks:
    def __init__(
        self,
        queue: Any,
        items: CourierItems,
        progress_hooks: Any,
        get_executing_context: Callable[[], Any],
        scrub: Callable[[str], str],
    ) -> None:
        self.queue = queue
        self.items = items
        self._progress_hooks = progress_hooks  # comfy.utils: PROGRESS_BAR_HOOK lives there
        self._progress_callback: Callable[[str, float], None] | None = None
        self._get_executing_context = get_executing_context
        self._scrub = scrub

    def on_start(self, callback: Callable[[str], None]) -> None:
        """Call `callback(prompt_id)` on the worker thread when it takes one of the
        courier's items to run (known by identity: see comfy_items.py)."""
        queue = self.queue
        original = queue.get
        if getattr(original, _WRAPPED, False):
            original = original.__wrapped__

        def get(*args: Any, **kwargs: Any) -> Any:
            # Under the queue's lock, so that no snapshot sees the item neither waiting nor
            # taken. The lock is re-entrant and get()'s wait releases it fully.
            with queue.mutex:
                taken = original(*args, **kwargs)
                started = self.items.took(taken) if taken is not None else None
            if taken is not None:
                try:
                    self.chain_progress_hook()
                    if started is not None:
                        callback(started)
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
        """Call `callback(prompt_id, value/total)` on the worker thread for progress bars
        of the courier's items.

        ComfyUI installs its own global progress hook after custom nodes load, so ours is
        chained onto whatever is installed when a prompt is queued or taken, not now.
        """
        self._progress_callback = callback

    def chain_progress_hook(self) -> None:
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
                executing = self.items.executing
                if context is not None and total and executing == context.prompt_id:
                    callback(str(context.prompt_id), float(value) / float(total))
            except Exception:  # never break a node's progress bar
                log.exception("[courier] progress hook failed")
            if current is not None:
                return current(value, total, *args, **kwargs)
            return None

        setattr(hook, _WRAPPED, True)
        hooks.PROGRESS_BAR_HOOK = hook

    def on_completion(self, callback: Callable[[Completion], None]) -> None:
        """Call `callback` on the worker thread when one of the courier's items leaves
        execution: the `item_id` the worker took it under, never its prompt_id."""
        queue = self.queue
        original = queue.task_done
        if getattr(original, _WRAPPED, False):
            original = original.__wrapped__

        def task_done(
            item_id: Any, history_result: Any, status: Any, *args: Any, **kwargs: Any
        ) -> Any:
            prompt_id = self.items.ending(item_id)
            if prompt_id is not None:
                try:
                    callback(completion_of(prompt_id, history_result, status, self._scrub))
                except Exception:  # never break ComfyUI's worker
                    log.exception("[courier] completion hook failed")
            try:
                return original(item_id, history_result, status, *args, **kwargs)
            finally:
                # Only now: until ComfyUI's task_done returns the item counts as running,
                # and the completion handed over above marks it done.
                self.items.ended(item_id)

        task_done.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(task_done, _WRAPPED, True)
        queue.task_done = task_done


def completion_of(
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
