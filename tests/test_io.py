import json
import os
import stat

import pytest

from ironman_nb.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    disk_space_problem,
    free_disk_bytes,
    is_disk_full,
    read_jsonl,
)


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


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=lambda mask: f"umask-{mask:03o}")
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    """Not mkstemp's 0600 / mkdtemp's 0700: a merged model written by root must be readable by a serving container
    running as another user, as any file written under umask 022 is."""
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "run_config.json", "{}")
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_bytes(b"{}")
            # safetensors' save_file writes 0600 whatever the umask
            from safetensors.torch import save_file
            import torch

            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run_config.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o777 & ~umask
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "merged" / name).stat().st_mode) == 0o666 & ~umask, name
    assert [p.name for p in (tmp_path / "merged").iterdir() if "probe" in p.name] == []


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x.jsonl, line 3"):
        read_jsonl(path)


def test_json_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    """Windows editors save UTF-8 with a BOM: notebook 01 read such sheets, notebook 05 refused such prompts."""
    from ironman_nb.io import read_json

    path = tmp_path / "prompts.jsonl"
    path.write_bytes('\ufeff{"prompt": "안녕?"}\r\n{"prompt": "누구야?"}\r\n'.encode("utf-8"))
    assert read_jsonl(path) == [{"prompt": "안녕?"}, {"prompt": "누구야?"}]
    path = tmp_path / "state.json"
    path.write_bytes('\ufeff{"a": 1}'.encode("utf-8"))
    assert read_json(path) == {"a": 1}


def test_disk_space_is_measured_where_the_folder_will_be(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: asked.append(path) or real(path)._replace(free=3 * 2**30))
    assert free_disk_bytes(tmp_path / "run" / "merged") == 3 * 2**30
    assert asked == [tmp_path]  # the nearest folder that exists
    assert disk_space_problem(tmp_path / "merged", 2 * 2**30, "the merged model") is None
    problem = disk_space_problem(tmp_path / "merged", 15 * 2**30, "the merged model")
    assert problem.startswith(f"the merged model needs about 15.0 GB on the disk of {tmp_path / 'merged'}, "
                              "which has 3.0 GB free")


def test_disk_full_is_recognised_in_both_shapes_it_arrives_in():
    import errno

    assert is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    # safetensors raises its own error type carrying only the OS message.
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
