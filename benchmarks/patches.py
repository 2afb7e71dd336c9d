"""Prototypes of the performance fixes proposed in benchmarks/README.md, as monkeypatches, so
the benchmarks can measure a fix (`--patched`) before anyone edits the package. Benchmark
tooling only: nothing in the package imports this file.

- P1 intake in one journal call (executor/courier.py Courier.submit, new Journal.admit):
  validate first, then one BEGIN IMMEDIATE transaction does the duplicate rule, the queue
  limit and the insert (was: latest, count_unfinished, insert, callback_summary = 4 calls
  through the single journal thread). The 202 body of a new attempt needs no outbox read:
  its callback summary is "pending" (callback configured) or "none". The observable order of
  the checks is unchanged (duplicate -> 429 -> validation error).
- P2 deliver a fresh final event at once (Courier._finish, new Deliverer.deliver_now): the
  event is in hand once Journal.finish commits; start its delivery task directly instead of
  waking the outbox loop to read it back (Journal.due_events + its wake-up). The
  event_still_current check before sending stays; the loop is woken after the try, so a
  retry is planned as before.
- P3 callbacks over aiohttp instead of httpx (Deliverer._send): ~0.45 ms less per callback on
  loopback, measured with the same receiver; aiohttp is already in every ComfyUI.
- P4 the first images row is written while the upload runs (Courier._upload), not before it.
- P5 (with P1) intake's journal call on a connection and thread of its own
  (Courier.__init__: `self.intake_db = JournalThread(opener)`), so a 202 no longer waits in
  the FIFO behind the running jobs' writes (images, states, finish, deliveries). SQLite
  serialises the two writers with its write lock (busy_timeout); each holds it < 1 ms.
- P7 (with P1) the 202's queue position counted in one pass over the pending queue instead
  of sorting all of it (ComfyAdapter.queue_snapshot sorts with a key function: O(n log n)
  per accepted job, 0.3 ms at ~1,200 queued).
- P6 (instead of P5) intake's transaction runs on the event loop itself, on a connection of
  its own with busy_timeout 20 ms and wal_autocheckpoint 0 (the journal thread keeps
  checkpointing), falling back to the journal thread when the write lock stays busy.

apply(names) patches the classes of an already imported comfy_courier package.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALL = ("P1", "P2", "P3", "P4", "P5", "P7")
log = logging.getLogger("comfy_courier.bench_patches")


def _package_modules() -> dict[str, ModuleType]:
    """The loaded modules of this checkout's package, whatever name ComfyUI gave it."""
    found: dict[str, ModuleType] = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        try:
            path = Path(file).resolve()
        except OSError:
            continue
        if REPO not in path.parents:
            continue
        rel = path.relative_to(REPO).with_suffix("")
        key = ".".join(rel.parts)
        if key.startswith(("executor.", "routes", "wiring")):
            found[key] = module
    return found


def apply(names: tuple[str, ...] = ALL) -> list[str]:
    mods = _package_modules()
    if "executor.courier" not in mods:
        raise RuntimeError("comfy_courier is not imported yet")
    courier_mod = mods["executor.courier"]
    journal_mod = mods["executor.journal"]
    delivery_mod = mods["executor.delivery"]
    jobs_mod = mods["executor.jobs"]
    done = []
    if {"P1", "P5", "P6", "P7"} & set(names):
        _p1(
            courier_mod,
            journal_mod,
            jobs_mod,
            lane="P5" in names,
            inline="P6" in names,
            fast_position="P7" in names,
        )
        done += [p for p in ("P1", "P5", "P6", "P7") if p in names]
    if "P2" in names:
        _p2(courier_mod, delivery_mod, journal_mod)
        done.append("P2")
    if "P3" in names:
        _p3(delivery_mod)
        done.append("P3")
    if "P4" in names:
        _p4(courier_mod, journal_mod)
        done.append("P4")
    log.warning("[courier] benchmark patches applied: %s", ",".join(done))
    return done


# -- P1 ----------------------------------------------------------------------------------


def _p1(
    courier_mod: ModuleType,
    journal_mod: ModuleType,
    jobs_mod: ModuleType,
    lane: bool = False,
    inline: bool = False,
    fast_position: bool = False,
) -> None:
    import sqlite3

    Journal = journal_mod.Journal
    JobState = jobs_mod.JobState
    CallbackSummary = jobs_mod.CallbackSummary
    status_body = jobs_mod.status_body
    Courier = courier_mod.Courier
    intake = courier_mod.intake
    QueueFull = courier_mod.QueueFull
    WorkflowRejected = courier_mod.WorkflowRejected

    def admit(self: Any, job: Any, max_queue: int, insert: bool) -> tuple[str, Any, int]:
        """One transaction: the duplicate rule, the queue limit, then the insert.

        Returns ("replay", existing, 0) when `job` repeats a job that runs or succeeded,
        ("full", existing, unfinished) at the limit, ("checked", existing, n) when `insert` is
        False, else ("inserted", existing, n) with job.attempt set.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE content_request_id = ? ORDER BY attempt DESC LIMIT 1",
                (job.content_request_id,),
            ).fetchone()
            existing = self._job(row) if row else None
            if existing is not None and (not existing.final or existing.state is JobState.SUCCESS):
                return "replay", existing, 0
            unfinished = int(
                db.execute(
                    "SELECT count(*) FROM jobs WHERE state NOT IN ('success', 'error')"
                ).fetchone()[0]
            )
            if unfinished >= max_queue:
                return "full", existing, unfinished
            if not insert:
                return "checked", existing, unfinished
            job.attempt = existing.attempt + 1 if existing is not None else 1
            db.execute(
                "INSERT INTO jobs (content_request_id, attempt, prompt_id, instance, state,"
                " workflow, fingerprint, runs, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    job.content_request_id,
                    job.attempt,
                    job.prompt_id,
                    job.instance,
                    job.state.value,
                    job.workflow,
                    job.fingerprint,
                    job.runs,
                    job.created_at,
                ),
            )
            db.execute(
                "UPDATE outbox SET state = 'dropped', updated_at = ?"
                " WHERE content_request_id = ? AND attempt < ? AND state = 'pending'",
                (job.created_at, job.content_request_id, job.attempt),
            )
            return "inserted", existing, unfinished

    async def submit(self: Any, request: Any) -> tuple[int, dict[str, Any]]:
        cid = request.content_request_id
        async with self._locked(cid):
            job = jobs_mod.Job(
                content_request_id=cid,
                attempt=0,
                prompt_id=str(uuid.uuid4()),
                instance=self.instance,
                workflow=request.canonical,
                fingerprint=request.fingerprint,
                created_at=self.clock(),
            )
            rejected = None
            try:
                prompt, outputs = await self._validated_prompt(job, request.workflow)
            except WorkflowRejected as e:
                rejected = e
            args = (job, self.settings.max_queue, rejected is None)
            if inline:  # P6: commit on the loop, no thread hop; the thread if the lock is busy
                try:
                    verdict, existing, unfinished = Journal.admit(_inline(self), *args)
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e):
                        raise
                    verdict, existing, unfinished = await self.db(Journal.admit, *args)
            else:
                db = self.db
                if lane:  # P5: intake's own connection and thread, not queued behind job writes
                    db = self.__dict__.get("_intake_db")
                    if db is None:
                        db = self._intake_db = journal_mod.JournalThread(self.db._opener)
                verdict, existing, unfinished = await db(Journal.admit, *args)
            if verdict == "replay":
                self._is_replay(existing, request)  # raises the 409 for another workflow
                return 200, await self._status(existing)
            if verdict == "full":
                raise QueueFull(
                    f"comfy-courier has {unfinished} unfinished jobs "
                    f"(COURIER_MAX_QUEUE={self.settings.max_queue}); try again later",
                    retry_after=self._retry_after(),
                )
            if rejected is not None:
                raise rejected
            accepted = replace(job)
            self._enqueue(job, prompt, outputs, intake.uses_courier_node(request.workflow))
            courier_mod.log.info(
                "[courier] queued id=%s attempt=%s prompt=%s", cid, job.attempt, job.prompt_id
            )
            self.metrics.jobs_accepted.inc()
            if self.status_updates is not None:
                self.status_updates.update(job, "queued", 0.0)
            summary = CallbackSummary("pending" if self._will_call_back(accepted) else "none")
            if fast_position:
                position = _position(self.comfy, job.prompt_id)
            else:
                position = self.comfy.queue_snapshot().position(job.prompt_id)
            return 202, status_body(accepted, summary, position)

    def _position(adapter: Any, prompt_id: str) -> int | None:
        """P7: the queue position without sorting the whole pending queue (O(n), no key
        function per comparison): running prompts + pending ones with a lower number."""
        queue = adapter.queue
        with queue.mutex:
            running = [item[1] for item in queue.currently_running.values()]
            if prompt_id in running:
                return 0
            mine = next((item[0] for item in queue.queue if item[1] == prompt_id), None)
            if mine is None:
                return None
            return len(running) + sum(1 for item in queue.queue if item[0] < mine)

    def _inline(courier: Any) -> Any:
        journal = courier.__dict__.get("_inline_journal")
        if journal is None:
            journal = courier._inline_journal = courier.db._opener()
            # never wait long on the loop; never checkpoint (fsync) on the loop
            journal._db.execute("PRAGMA busy_timeout = 20")
            journal._db.execute("PRAGMA wal_autocheckpoint = 0")
        return journal

    Journal.admit = admit
    Courier.submit = submit


# -- P2 ----------------------------------------------------------------------------------


def _p2(courier_mod: ModuleType, delivery_mod: ModuleType, journal_mod: ModuleType) -> None:
    Deliverer = delivery_mod.Deliverer
    JournalThread = journal_mod.JournalThread
    OutboxEvent = journal_mod.OutboxEvent

    def deliver_now(self: Any, event: Any) -> None:
        """Send an event just committed, without reading it back from the outbox."""
        if event.event_id in self._in_flight:
            return
        self._in_flight.add(event.event_id)
        task = asyncio.ensure_future(self._deliver(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # once tried, let the outbox loop plan the retry (if any) as it does after wake()
        task.add_done_callback(lambda _: self._wake.set())

    # Courier._finish commits the event through `await self.db(Journal.finish, job, event)`
    # and then calls deliverer.wake(). The real change: `self.deliverer.deliver_now(event)`
    # in place of `self.deliverer.wake()`. Here, without copying _finish: while a _finish runs
    # (a context variable, so per task), the committed event is remembered and wake() hands
    # it over; every other wake() behaves as before.
    import contextvars

    finishing: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
        "courier_bench_finishing", default=None
    )
    Courier = courier_mod.Courier
    original_finish = Courier._finish
    original_call = JournalThread.__call__

    async def _finish(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = finishing.set([])
        try:
            return await original_finish(self, *args, **kwargs)
        finally:
            finishing.reset(token)

    async def call(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = await original_call(self, fn, *args, **kwargs)
        fresh = finishing.get()
        if (
            fresh is not None
            and result is True
            and len(args) == 2
            and isinstance(args[1], OutboxEvent)
        ):
            fresh.append(args[1])
        return result

    def wake(self: Any) -> None:
        fresh = finishing.get()
        if fresh:
            while fresh:
                self.deliver_now(fresh.pop(0))
            return
        self._wake.set()

    Deliverer.deliver_now = deliver_now
    Deliverer.wake = wake
    JournalThread.__call__ = call
    Courier._finish = _finish


# -- P3 ----------------------------------------------------------------------------------


def _p3(delivery_mod: ModuleType) -> None:
    import aiohttp

    Deliverer = delivery_mod.Deliverer
    signature_headers = delivery_mod.signature_headers
    Retry = delivery_mod.Retry
    Delivered = delivery_mod.Delivered
    Permanent = delivery_mod.Permanent
    RETRYABLE_4XX = delivery_mod.RETRYABLE_4XX
    parse_retry_after = delivery_mod.parse_retry_after

    async def _send(self: Any, event: Any) -> Any:
        headers = {"Content-Type": "application/json", "User-Agent": "comfy-courier"}
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        headers.update(signature_headers(event.event_id, event.body, self._secrets))
        session = getattr(self, "_aiohttp", None)
        if session is None or session.closed:
            session = self._aiohttp = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        try:
            async with session.post(
                self._url, data=event.body, headers=headers, allow_redirects=False
            ) as response:
                await response.read()
                code = response.status
                retry_after = response.headers.get("retry-after")
        except asyncio.TimeoutError:
            return Retry(f"no answer within {self._timeout:g} s")
        except aiohttp.ClientError as e:
            return Retry(f"{type(e).__name__}: {e}"[:300])
        if 200 <= code < 300:
            return Delivered(code)
        reason = f"HTTP {code}"
        if code in RETRYABLE_4XX or code >= 500 or code < 400:
            return Retry(reason, parse_retry_after(retry_after, self._clock()))
        return Permanent(reason)

    Deliverer._send = _send


# -- P4 ----------------------------------------------------------------------------------


def _p4(courier_mod: ModuleType, journal_mod: ModuleType) -> None:
    Courier = courier_mod.Courier
    Journal = journal_mod.Journal

    async def _upload(self: Any, job: Any, seq: int, output: Any, data: bytes) -> Any:
        # The row is queued on the journal thread before the upload starts, so it still
        # commits before set_state(UPLOADING) (one thread, FIFO); the upload no longer waits.
        record = asyncio.ensure_future(self.db(Journal.record_image, job, seq, output))
        try:
            url = await self._store(output.key, data, output.content_type)
        finally:
            await record
        stored = replace(output, url=url)
        await self.db(Journal.record_image, job, seq, stored)
        return stored

    Courier._upload = _upload


# -- loading inside a real ComfyUI ---------------------------------------------------------


def apply_when_loaded(names: tuple[str, ...] = ALL) -> None:
    """From a custom node loaded next to comfy_courier: apply now, or once the server loop
    runs (after every custom node is imported)."""
    try:
        apply(names)
        return
    except (RuntimeError, KeyError):
        pass
    import server  # ComfyUI's

    def later() -> None:
        try:
            apply(names)
        except Exception:
            log.exception("[courier] benchmark patches failed")

    server.PromptServer.instance.loop.call_soon(later)


if __name__ == "__main__":
    print(__doc__)
