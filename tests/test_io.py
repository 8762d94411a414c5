import json
import os

import pytest

from ironman_nb.io import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": "토니"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"x": "토니"}
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "good")

    class Boom:
        def __str__(self):
            raise RuntimeError("crash while serialising")

    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"bad": Boom()})
    assert target.read_text() == "good"
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_dir_keeps_the_earlier_folder_on_error(tmp_path):
    target = tmp_path / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise ValueError("verification failed")
    assert (target / "weights").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x.jsonl, line 3"):
        read_jsonl(path)
