"""Which items on ComfyUI's prompt queue are the courier's: known by identity, never by id.

ComfyUI's /prompt takes a client-chosen prompt_id and /queue shows the courier's, so
anyone could queue a prompt under a waiting job's id. This keeps the tuple object put for
each job; `PromptQueue.get` hands the worker that very object (heappop, no copy), so the
worker's hooks know whether the item it took is one the courier put, and remember its
`item_id` for `task_done`. Nothing of this is in the item, so nothing of it shows in
/queue or /history. Anything else run under a job's id is an ordinary prompt.

Plain bookkeeping over the queue object `comfy_adapter` passes in; every method runs
under the queue's own (re-entrant) lock, as ComfyUI's worker and server threads share it.
"""

from __future__ import annotations

import logging
from typing import Any

from .comfy_port import QueueSnapshot

log = logging.getLogger(__name__)


class CourierItems:
    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self._waiting: dict[str, tuple[Any, ...]] = {}  # put and waiting, by prompt_id
        self._taken: dict[Any, str] = {}  # taken by the worker, not done, by item_id
        self.executing: str | None = None  # the prompt_id running now, if the courier's

    def put(self, prompt_id: str, item: tuple[Any, ...]) -> None:
        with self.queue.mutex:
            self._waiting[prompt_id] = item
            if self.queue.put(item) is False:  # some newer queues refuse a reused prompt_id
                del self._waiting[prompt_id]
                raise RuntimeError(f"ComfyUI refused to queue prompt {prompt_id}")

    def took(self, taken: Any) -> str | None:
        """The worker took `taken` = (item, item_id): the prompt_id if it is the courier's.

        Called with the queue's lock held, by the worker's wrapped get()."""
        try:
            item, item_id = taken
            prompt_id = item[1]
            ours = isinstance(prompt_id, str) and self._waiting.get(prompt_id) is item
            self.executing = prompt_id if ours else None
            if not ours:
                return None
            del self._waiting[prompt_id]
            self._taken[item_id] = prompt_id
            return str(prompt_id)
        except Exception:  # never break ComfyUI's worker
            log.exception("[courier] start hook failed")
            return None

    def ending(self, item_id: Any) -> str | None:
        """The courier's prompt_id for a task_done of `item_id`, or None."""
        with self.queue.mutex:
            return self._taken.get(item_id)

    def ended(self, item_id: Any) -> None:
        """After ComfyUI's task_done: until it returns, the item counts as running."""
        with self.queue.mutex:
            self._taken.pop(item_id, None)
            self.executing = None

    def running(self, prompt_id: str) -> bool:
        return prompt_id in self._taken.values()

    def snapshot(self) -> QueueSnapshot:
        # get_current_queue() would deep-copy every pending prompt: milliseconds on a long
        # queue. A set lookup per item instead.
        with self.queue.mutex:
            waiting = self._waiting
            ours = waiting.get
            numbers: list[float] = []
            pending: dict[str, float] = {}
            for item in self.queue.queue:
                number, prompt_id = item[0], item[1]
                numbers.append(number)
                if ours(prompt_id) is item:
                    pending[prompt_id] = number
            if len(pending) != len(waiting):  # deleted through ComfyUI's /queue: forget them
                for prompt_id in waiting.keys() - pending.keys():
                    del waiting[prompt_id]
            return QueueSnapshot(
                frozenset(self._taken.values()),
                pending,
                busy=len(self.queue.currently_running),
                numbers=tuple(numbers),
            )

    def remove(self, prompt_id: str) -> bool:
        """Take the courier's own item for `prompt_id` off the queue (never another's)."""
        with self.queue.mutex:
            item = self._waiting.pop(prompt_id, None)
            if item is None:
                return False
            return bool(self.queue.delete_queue_item(lambda candidate: candidate is item))
