"""The resumable result store: durable appends, torn last lines, stable keys."""

from __future__ import annotations

from edgellm.eval.cache import ResultStore, item_key


def test_roundtrip_and_reload(tmp_path):
    s = ResultStore(tmp_path, "x")
    s.put_many([("a", {"v": 1}), ("b", [1.5, 2])])
    again = ResultStore(tmp_path, "x")
    assert len(again) == 2 and again.get("a") == {"v": 1} and again.get("b") == [1.5, 2]


def test_torn_last_line_is_ignored_and_not_glued(tmp_path):
    s = ResultStore(tmp_path, "x")
    s.put_many([("a", 1)])
    with open(tmp_path / "x.jsonl", "ab") as f:
        f.write(b'{"key": "b", "val')  # killed mid-write
    s2 = ResultStore(tmp_path, "x")
    assert "a" in s2 and "b" not in s2
    s2.put_many([("c", 3)])
    s3 = ResultStore(tmp_path, "x")
    assert s3.get("c") == 3 and s3.get("a") == 1 and "b" not in s3


def test_memory_store_writes_nothing(tmp_path):
    s = ResultStore(None, "x")
    s.put_many([("a", 1)])
    assert s.get("a") == 1 and s.path is None and not list(tmp_path.iterdir())


def test_item_key_is_stable_and_sensitive():
    assert item_key("ppl", {"a": 1, "b": 2}, [1, 2]) == item_key("ppl", {"b": 2, "a": 1}, [1, 2])
    assert item_key("ppl", [1, 2]) != item_key("ppl", [2, 1])
    assert item_key("ppl", [12], 3) != item_key("ppl", [1], 23)
