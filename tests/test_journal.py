import pytest

from comfy_courier.executor.jobs import ErrorType, Job, JobState, Output
from comfy_courier.executor.store import DuplicateAttempt, OutboxEvent
from comfy_courier.executor.store.sqlite.journal import SCHEMA_VERSION, Journal


def make_job(cid="j1", attempt=1, prompt_id="p1", instance="host:8188"):
    return Job(content_request_id=cid, attempt=attempt, prompt_id=prompt_id, instance=instance,
               workflow="{}", fingerprint="f", created_at=1.0)


def event(cid="j1", attempt=1, event_id="msg_1"):
    return OutboxEvent(event_id, cid, attempt, b'{"x":1}', 0, 2.0)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.sqlite3")
    yield j
    j.close()


def test_wal_and_schema_version(journal):
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_same_attempt_cannot_be_inserted_twice(journal):
    journal.insert(make_job())
    with pytest.raises(DuplicateAttempt):
        journal.insert(make_job(prompt_id="p2"))


def test_finish_happens_once_with_its_event(journal):
    job = make_job()
    journal.insert(job)
    job.state, job.finished_at = JobState.SUCCESS, 3.0
    assert journal.finish(job, event()) is True
    job.state, job.error_type = JobState.ERROR, ErrorType.TIMEOUT
    assert journal.finish(job, event(event_id="msg_2")) is False
    assert journal.latest("j1").state is JobState.SUCCESS
    assert journal.outbox_counts() == {"pending": 1}


def test_new_attempt_drops_undelivered_events_of_older_ones(journal):
    job = make_job()
    journal.insert(job)
    job.state, job.error_type, job.finished_at = JobState.ERROR, ErrorType.EXECUTION, 3.0
    journal.finish(job, event())
    journal.insert(make_job(attempt=2, prompt_id="p2"))
    assert journal.outbox_counts() == {"dropped": 1}
    assert journal.latest("j1").attempt == 2


def test_admit_applies_the_duplicate_rule_in_its_transaction(journal):
    first = make_job(attempt=0)
    assert journal.admit([first]) == [1] and first.attempt == 0  # the caller's job: unchanged
    first.attempt = 1
    # while the first attempt runs, the same request and another workflow are both blocked
    assert journal.admit([make_job(attempt=0, prompt_id="p2")])[0].prompt_id == "p1"
    other = make_job(attempt=0, prompt_id="p3")
    other.fingerprint = "g"
    assert journal.admit([other])[0].prompt_id == "p1"
    # after a final error the same request starts attempt 2 and drops the old event
    first.state, first.error_type, first.finished_at = JobState.ERROR, ErrorType.EXECUTION, 3.0
    journal.finish(first, event())
    second = make_job(attempt=0, prompt_id="p4")
    assert journal.admit([second]) == [2]
    second.attempt = 2
    assert journal.outbox_counts() == {"dropped": 1}
    # a success blocks for good
    second.state, second.finished_at = JobState.SUCCESS, 4.0
    journal.finish(second, event(attempt=2, event_id="msg_2"))
    assert journal.admit([make_job(attempt=0, prompt_id="p5")])[0].attempt == 2


def test_admit_of_a_large_mixed_lot_matches_one_by_one(journal):
    # ids with an attempt that failed, that runs, that succeeded; new ids; one id twice
    for cid, state in (("err", JobState.ERROR), ("run", JobState.QUEUED), ("ok", JobState.SUCCESS)):
        job = make_job(cid, attempt=0, prompt_id=f"{cid}-1")
        [job.attempt] = journal.admit([job])
        if state.final:
            job.state, job.finished_at = state, 2.0
            job.error_type = ErrorType.EXECUTION if state is JobState.ERROR else None
            journal.finish(job, event(cid, 1, f"msg_{cid}"))
    lot = [make_job(f"new{i}", attempt=0, prompt_id=f"new{i}-1") for i in range(230)]
    lot += [make_job(cid, attempt=0, prompt_id=f"{cid}-2") for cid in ("err", "run", "ok")]
    lot.append(make_job("new7", attempt=0, prompt_id="new7-2"))  # the lot's own first blocks it
    results = journal.admit(lot)
    assert results[:230] == [1] * 230
    assert results[230] == 2  # after an error: the next attempt
    assert [r.prompt_id for r in results[231:]] == ["run-1", "ok-1", "new7-1"]
    assert journal.latest("new229").prompt_id == "new229-1"
    assert journal.by_prompt("new7-2") is None and journal.by_prompt("ok-2") is None
    assert journal.outbox_counts() == {"dropped": 1, "pending": 1}  # err's old event dropped


def test_unfinished_is_per_instance_and_survives_reopen(tmp_path):
    j = Journal(tmp_path / "x.sqlite3")
    j.insert(make_job("a", prompt_id="pa"))
    j.insert(make_job("b", prompt_id="pb", instance="host:8189"))
    j.close()
    j = Journal(tmp_path / "x.sqlite3")
    assert [job.content_request_id for job in j.unfinished("host:8188")] == ["a"]
    assert j.count_unfinished() == 2
    j.close()


def test_due_events_and_delivery_records(journal):
    job = make_job()
    journal.insert(job)
    job.state, job.finished_at = JobState.SUCCESS, 3.0
    journal.finish(job, event())
    assert [e.event_id for e in journal.due_events("host:8188", 5.0, 10)] == ["msg_1"]
    journal.record_delivery("msg_1", "pending", 1, 5.0, 100.0, "HTTP 503")
    assert journal.due_events("host:8188", 5.0, 10) == []
    assert journal.next_due_at("host:8188") == 100.0
    assert journal.callback_summary("j1", 1).last_error == "HTTP 503"


def test_a_dropped_event_stays_dropped(journal):
    job = make_job()
    journal.insert(job)
    job.state, job.error_type, job.finished_at = JobState.ERROR, ErrorType.EXECUTION, 3.0
    journal.finish(job, event())
    journal.insert(make_job(attempt=2, prompt_id="p2"))  # drops attempt 1's event
    journal.record_delivery("msg_1", "pending", 1, 4.0, 10.0, "HTTP 503")  # a late record
    assert journal.outbox_counts() == {"dropped": 1}
    assert journal.due_events("host:8188", 100.0, 10) == []


def test_adopting_a_silent_instance_moves_its_unfinished_work(journal):
    journal.heartbeat("old:8188", 0.0)
    journal.heartbeat("live:8188", 100.0)
    journal.insert(make_job("a", prompt_id="pa", instance="old:8188"))
    assert journal.adopt_stale("live:8188", 100.0, 60.0) == ["old:8188"]
    assert [j.content_request_id for j in journal.unfinished("live:8188")] == ["a"]
    assert journal.adopt_stale("other:8188", 100.0, 60.0) == []  # taken once


async def test_group_commit_writes_a_burst_in_few_transactions(tmp_path):
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit
    from comfy_courier.executor.store.sqlite.thread import JournalThread

    db = JournalThread(lambda: Journal(tmp_path / "g.sqlite3"))
    batches: list[int] = []

    def admit(journal, jobs):
        batches.append(len(jobs))
        return Journal.admit(journal, jobs)

    commit = GroupCommit(db, admit)
    jobs = [make_job(f"g{i}", attempt=0, prompt_id=f"pg{i}") for i in range(50)]
    results = await asyncio.gather(*(commit(job) for job in jobs))
    assert results == [1] * 50
    assert sum(batches) == 50 and len(batches) < 50
    assert await db(Journal.count_unfinished) == 50
    db.close()


async def test_group_commit_failure_stays_with_its_own_caller(tmp_path):
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit
    from comfy_courier.executor.store.sqlite.thread import JournalThread

    db = JournalThread(lambda: Journal(tmp_path / "g.sqlite3"))

    def admit(journal, jobs):
        if any(job.content_request_id == "bad" for job in jobs):
            raise RuntimeError("disk says no")
        return Journal.admit(journal, jobs)

    commit = GroupCommit(db, admit)
    ids = ["a", "bad", "b", "c"]
    results = await asyncio.gather(
        *(commit(make_job(cid, attempt=0, prompt_id=f"p{cid}")) for cid in ids),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["int", "RuntimeError", "int", "int"]
    assert [job.content_request_id for job in await db(Journal.unfinished, "host:8188")] == [
        "a", "b", "c"]
    db.close()


async def test_group_commit_runs_then_even_when_the_caller_gave_up(tmp_path):
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit
    from comfy_courier.executor.store.sqlite.thread import JournalThread

    db = JournalThread(lambda: Journal(tmp_path / "g.sqlite3"))
    commit = GroupCommit(db, Journal.admit)
    followed: list[str] = []

    def then(blocking):
        followed.append("blocked" if isinstance(blocking, Job) else "queued")
        return len(followed)

    assert await commit(make_job("t1", attempt=0, prompt_id="pt1"), then) == 1
    caller = asyncio.ensure_future(commit(make_job("t2", attempt=0, prompt_id="pt2"), then))
    await asyncio.sleep(0)  # the write is under way
    caller.cancel()
    while len(followed) < 2:
        await asyncio.sleep(0.01)
    assert caller.cancelled() and followed == ["queued", "queued"]
    assert await db(Journal.count_unfinished) == 2
    db.close()


async def test_group_commit_runs_after_once_the_caller_resumed_or_gave_up(tmp_path):
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit
    from comfy_courier.executor.store.sqlite.thread import JournalThread

    db = JournalThread(lambda: Journal(tmp_path / "a.sqlite3"))
    commit = GroupCommit(db, Journal.admit)
    events: list[str] = []

    async def caller(cid):
        await commit(make_job(cid, attempt=0, prompt_id=f"p-{cid}"),
                     lambda admitted: f"{cid}:{admitted}", lambda v: events.append(v))
        events.append(f"{cid} resumed")  # before `after`, in the same step as the answer

    await caller("a1")
    assert events == ["a1 resumed"]  # `after` waits for the end of the caller's step
    await asyncio.sleep(0)
    assert events == ["a1 resumed", "a1:1"]
    gone = asyncio.ensure_future(caller("a2"))
    await asyncio.sleep(0)  # the write is under way
    gone.cancel()
    while len(events) < 3:
        await asyncio.sleep(0.01)
    assert gone.cancelled() and events[2] == "a2:1"  # the caller is gone: `after` still runs
    db.close()


def test_version_1_journal_gains_the_dead_letter_index(tmp_path):
    j = Journal(tmp_path / "v1.sqlite3")
    j._db.execute("DROP INDEX outbox_dead")
    j._db.execute("PRAGMA user_version = 1")
    j.close()
    j = Journal(tmp_path / "v1.sqlite3")
    names = {r[0] for r in j._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "outbox_dead" in names and j.outbox_backlog() == (0, 0)
    plan = " ".join(str(tuple(r)) for r in j._db.execute(
        "EXPLAIN QUERY PLAN SELECT count(*) FROM outbox WHERE state = 'dead'"))
    assert "outbox_dead" in plan  # no scan of the delivered rows
    j.close()


def test_temp_data_stays_in_memory(journal):
    # on disk, every admission batch created and unlinked a temp file (statement journal)
    assert journal._db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_group_commit_keeps_two_batches_in_flight_and_answers_in_order():
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit

    loop = asyncio.get_running_loop()
    sent: list[tuple[list[int], asyncio.Future[list[int]]]] = []

    async def journal(many, items):  # a runner whose answers the test releases
        answer = loop.create_future()
        sent.append((items, answer))
        return await answer

    commit = GroupCommit(journal, lambda _, items: items)
    followed: list[int] = []
    calls = [asyncio.ensure_future(commit(1, followed.append))]
    await asyncio.sleep(0)
    calls += [asyncio.ensure_future(commit(n, followed.append)) for n in (2, 3)]
    await asyncio.sleep(0)
    calls.append(asyncio.ensure_future(commit(4, followed.append)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert [items for items, _ in sent] == [[1], [2, 3]]  # the third batch waits its turn
    sent[0][1].set_result([1])
    for _ in range(3):
        await asyncio.sleep(0)
    assert [items for items, _ in sent] == [[1], [2, 3], [4]]
    sent[1][1].set_result([2, 3])
    sent[2][1].set_result([4])
    await asyncio.gather(*calls)
    assert followed == [1, 2, 3, 4]


async def test_group_commit_sends_a_lone_call_from_the_callers_own_step():
    """Nothing in flight: the call goes to the runner at once, not a loop pass later, so
    the journal process starts on it while the loop goes on (the 202 waits less)."""
    import asyncio

    from comfy_courier.executor.store.group_commit import GroupCommit

    loop = asyncio.get_running_loop()
    sent: list[list[int]] = []

    def submit(many, items):  # a runner's submit: sends now, answers later
        sent.append(items)
        answer = loop.create_future()
        loop.call_later(0.01, answer.set_result, items)
        return answer

    commit = GroupCommit(submit, lambda _, items: items)
    call = asyncio.ensure_future(commit(1))
    await asyncio.sleep(0)  # one pass: the call's own step has run, no other task's
    assert sent == [[1]]
    assert await call == 1


def finished(journal, cid, at, outbox_state=None, state=JobState.SUCCESS, attempt=1):
    """A final attempt of `cid` that finished at `at`, with one image and, if given, its
    callback event left in `outbox_state`."""
    job = make_job(cid=cid, attempt=attempt, prompt_id=f"p-{cid}-{attempt}")
    job.workflow = '{"1": {}}'
    journal.insert(job)
    journal.record_image(job, 1, Output("9", 0, f"{cid}/{attempt}-1.jpg", "image/jpeg", 10, 8, 8))
    job.state, job.finished_at = state, at
    if state is JobState.ERROR:
        job.error_type = ErrorType.EXECUTION
    event_id = f"msg_{cid}_{attempt}"
    callback = event(cid=cid, attempt=attempt, event_id=event_id) if outbox_state else None
    journal.finish(job, callback)
    if outbox_state not in (None, "pending"):
        journal.record_delivery(event_id, outbox_state, 1, at + 1)


def rows(journal, table, where="1"):
    query = f"SELECT content_request_id, attempt FROM {table} WHERE {where} ORDER BY 1, 2"
    return [f"{r[0]}/{r[1]}" for r in journal._db.execute(query)]


def test_prune_slims_old_final_attempts_and_keeps_each_ids_outcome(journal):
    finished(journal, "old-ok", 100.0, "delivered")
    finished(journal, "old-dead", 110.0, "dead", state=JobState.ERROR)
    finished(journal, "old-quiet", 120.0)  # no callback URL: no event
    finished(journal, "old-pending", 130.0, "pending")  # its callback is still being tried
    finished(journal, "twice", 140.0, "delivered", state=JobState.ERROR)
    finished(journal, "twice", 150.0, "delivered", attempt=2)
    finished(journal, "recent", 900.0, "delivered")
    journal.insert(make_job(cid="old-queued", prompt_id="p-q"))  # never finished
    assert journal.prune(500.0, 100) == 5
    # the latest attempt of each id stays, without its workflow; "twice"'s first one goes
    assert rows(journal, "jobs") == ["old-dead/1", "old-ok/1", "old-pending/1", "old-queued/1",
                                     "old-quiet/1", "recent/1", "twice/2"]
    assert rows(journal, "jobs", "workflow = ''") == ["old-dead/1", "old-ok/1", "old-quiet/1",
                                                      "twice/2"]
    assert rows(journal, "images") == ["old-pending/1", "recent/1"]
    assert rows(journal, "outbox") == ["old-pending/1", "recent/1"]
    kept = journal.latest("old-ok")  # still replays: the id never runs twice
    assert kept.state is JobState.SUCCESS and kept.fingerprint == "f" and kept.attempt == 1
    assert journal.admit([make_job(cid="twice", prompt_id="p-3")]) == [journal.latest("twice")]
    assert journal.admit([make_job(cid="old-dead", prompt_id="p-4")]) == [2]  # not 1 again
    assert journal.outbox_backlog() == (1, 0)
    assert journal.prune(500.0, 100) == 0  # slimmed rows are not taken again


def test_prune_goes_oldest_first_in_batches(journal):
    for i, at in enumerate([50.0, 10.0, 40.0, 20.0, 30.0]):
        finished(journal, f"b{i}", at, "delivered")
    assert journal.prune(1000.0, 2) == 2
    assert rows(journal, "jobs", "workflow = ''") == ["b1/1", "b3/1"]  # 10 and 20 went first
    assert [journal.prune(1000.0, 2), journal.prune(1000.0, 2)] == [2, 1]
    assert len(rows(journal, "jobs", "workflow = ''")) == 5 and journal.prune(1000.0, 2) == 0


@pytest.mark.parametrize("query, params, index", [
    ("PRUNABLE", (1.0, 5), "jobs_prunable"),  # a batch never scans every job's workflow
    ("CANCEL_REQUESTS", ("a:1",), "jobs_cancel_requested"),  # not every queued job
])
def test_periodic_queries_read_their_own_index(journal, query, params, index):
    from comfy_courier.executor.store.sqlite import schema as module

    plan = " ".join(str(tuple(r)) for r in journal._db.execute(
        "EXPLAIN QUERY PLAN " + getattr(module, query), params))
    assert f"USING INDEX {index}" in plan


@pytest.mark.parametrize("version", [2, 3])  # 3: a development journal, index of all finished
def test_older_journals_gain_the_prunable_jobs_index(tmp_path, version):
    j = Journal(tmp_path / "old.sqlite3")
    j._db.execute("DROP INDEX jobs_prunable")
    if version == 3:
        j._db.execute("CREATE INDEX jobs_finished ON jobs (finished_at)"
                      " WHERE state IN ('success', 'error')")
    j._db.execute(f"PRAGMA user_version = {version}")
    finished(j, "kept", 100.0, "delivered")
    j.close()
    j = Journal(tmp_path / "old.sqlite3")
    names = {r[0] for r in j._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_prunable" in names and "jobs_finished" not in names
    assert j._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert j.prune(1000.0, 10) == 1
    j.close()


def test_an_id_retried_after_its_prune_loses_the_slimmed_attempt_too(journal):
    finished(journal, "again", 100.0, "delivered", state=JobState.ERROR)
    assert journal.prune(500.0, 10) == 1  # attempt 1 slimmed, kept as the outcome
    finished(journal, "again", 200.0, "delivered", attempt=2)
    assert journal.prune(500.0, 10) == 1
    assert rows(journal, "jobs") == ["again/2"]


def test_a_job_that_ended_is_not_resubmitted(journal):
    # recovery reads its list once; a job on it may finish before its turn comes
    job = make_job()
    journal.insert(job)
    job.state, job.finished_at = JobState.SUCCESS, 3.0
    journal.finish(job, event())
    assert journal.resubmitted("p1", "p1-again", 4.0, True) is None
    latest = journal.latest("j1")
    assert latest.state is JobState.SUCCESS and latest.prompt_id == "p1" and latest.runs == 1
    journal.insert(make_job(cid="j2", prompt_id="p2"))
    assert journal.resubmitted("p2", "p2-again", 4.0, True) == 2  # the claim's new epoch
    assert journal.latest("j2").prompt_id == "p2-again" and journal.latest("j2").runs == 2


def test_a_resubmission_counts_a_run_only_when_told_the_job_was_executing(journal):
    journal.insert(make_job(cid="j1", prompt_id="p1"))
    assert journal.resubmitted("p1", "p1-b", 4.0, False) == 2  # it only waited
    assert journal.latest("j1").prompt_id == "p1-b" and journal.latest("j1").runs == 1
    journal.set_state("p1-b", JobState.RUNNING)
    assert journal.resubmitted("p1-b", "p1-c", 5.0, True) == 3
    latest = journal.latest("j1")
    assert latest.runs == 2 and latest.state is JobState.QUEUED and latest.started_at is None


def test_cancel_requests_reach_the_owning_instance_only_while_it_can_act(journal):
    journal.insert(make_job(cid="c1", prompt_id="p1", instance="a:1"))
    journal.insert(make_job(cid="c2", prompt_id="p2", instance="b:2"))
    assert journal.request_cancel("c1", 1) and journal.request_cancel("c2", 1)
    assert journal.cancel_requests("a:1") == ["p1"]
    journal.resubmitted("p1", "p1-again", 4.0, True)  # the owner restarted: the flag stays
    assert journal.cancel_requests("a:1") == ["p1-again"] and journal.request_cancel("c1", 1)
    journal.set_state("p1-again", JobState.UPLOADING)
    assert journal.request_cancel("c1", 1) is False  # past cancelling: its images are stored
    job = journal.by_prompt("p2")
    job.state, job.finished_at = JobState.SUCCESS, 5.0
    journal.finish(job, None)
    assert journal.cancel_requests("b:2") == [] and journal.request_cancel("c2", 1) is False
