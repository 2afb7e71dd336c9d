import time
import uuid

from comfy_courier.executor.ids import uuid7


def test_uuid7_is_a_version_7_rfc_uuid_that_sorts_by_time():
    ids = []
    for _ in range(3):
        ids.append(uuid7())
        time.sleep(0.002)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert sorted(ids) == ids and sorted(str(u) for u in ids) == [str(u) for u in ids]
    assert abs((ids[0].int >> 80) - time.time_ns() // 1_000_000) < 5_000
    assert len({uuid7() for _ in range(10_000)}) == 10_000
