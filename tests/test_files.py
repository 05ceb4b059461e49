"""jscale.files: atomic writes, the torn-line-tolerant JSONL reader, the cache directory."""

import json

import pytest

from jscale import files


def test_atomic_write_replaces_whole_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "sub" / "a.json"
    files.atomic_write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        files.atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"x": 1}  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary left


def test_read_jsonl_drops_a_torn_last_line_and_refuses_corruption(tmp_path):
    path = tmp_path / "m.jsonl"
    assert files.read_jsonl(path) == []
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert files.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        files.read_jsonl(path)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "env"))
    assert files.cache_dir() == tmp_path / "env"
    assert files.cache_dir(tmp_path / "cfg") == tmp_path / "cfg"
    monkeypatch.delenv(files.CACHE_ENV)
    assert files.cache_dir().parts[-2:] == (".cache", "jscale")
