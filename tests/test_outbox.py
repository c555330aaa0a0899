"""The durable outbox: order, persistence across reopen, message ids."""
import json
import sqlite3

import pytest

from edge.line.outbox import Outbox, OutboxError


@pytest.mark.timeout(10)
def test_outbox_keeps_order_and_survives_reopen(tmp_path):
    db = tmp_path / "outbox.sqlite"
    with Outbox(db) as outbox:
        ids = [outbox.put(f"line/{i % 3}", f"payload-{i}") for i in range(10)]
        outbox.mark_sent(ids[0])
        assert outbox.size() == 9

    with Outbox(db) as reopened:
        pending = reopened.pending(100)
        assert [m.message_id for m in pending] == ids[1:]
        assert [m.payload for m in pending] == [f"payload-{i}".encode() for i in range(1, 10)]
        assert [m.seq for m in pending] == sorted(m.seq for m in pending)
        assert [m.message_id for m in reopened.pending(3)] == ids[1:4]
        later = reopened.put("line/0", b"after-reopen")
        assert reopened.pending(100)[-1].message_id == later


@pytest.mark.timeout(10)
def test_dict_payloads_get_their_message_id(tmp_path):
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        message_id = outbox.put("parts", {"part": "p-1", "score": 1.5}, qos=1, retain=True)
        (message,) = outbox.pending(10)
    assert json.loads(message.payload) == {"part": "p-1", "score": 1.5, "message_id": message_id}
    assert (message.message_id, message.qos, message.retain) == (message_id, 1, True)
    assert len(message_id) == 32


@pytest.mark.timeout(10)
def test_outbox_uses_wal_mode(tmp_path):
    db = tmp_path / "outbox.sqlite"
    Outbox(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.timeout(10)
def test_errors_name_the_database_path(tmp_path):
    db = tmp_path / "outbox.sqlite"
    outbox = Outbox(db)
    with pytest.raises(OutboxError, match=str(db)):
        outbox.put("t", 42)
    outbox.close()
    with pytest.raises(OutboxError, match=str(db)):
        outbox.size()
    not_a_db = tmp_path / "garbage.sqlite"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match=str(not_a_db)):
        Outbox(not_a_db)
