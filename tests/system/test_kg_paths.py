import os

from moe_framework.kg.paths import same_file, store_companions, touches_store


def _store(tmp_path):
    d = tmp_path / "ckpt-1"
    d.mkdir()
    f = d / "kg.sqlite"
    f.write_bytes(b"x")
    return d, f


def test_same_file_sees_through_symlinked_directory(tmp_path):
    d, f = _store(tmp_path)
    os.symlink("ckpt-1", tmp_path / "latest")
    assert same_file(tmp_path / "latest" / "kg.sqlite", f)
    # a file that does not exist yet lands in the same place through the link
    assert same_file(tmp_path / "latest" / "new.sqlite", d / "new.sqlite")


def test_same_file_sees_symlinked_file_and_hard_link(tmp_path):
    _, f = _store(tmp_path)
    os.symlink(f, tmp_path / "soft")
    os.link(f, tmp_path / "hard")
    assert same_file(tmp_path / "soft", f)
    assert same_file(tmp_path / "hard", f)


def test_same_file_tells_different_files_apart(tmp_path):
    _, f = _store(tmp_path)
    other = tmp_path / "other.sqlite"
    other.write_bytes(b"x")
    assert not same_file(other, f)
    assert not same_file(tmp_path / "missing.sqlite", f)


def test_touches_store_covers_sqlite_companions(tmp_path):
    _, f = _store(tmp_path)
    os.symlink("ckpt-1", tmp_path / "latest")
    assert store_companions(f)[0] == os.fspath(f)
    for suffix in ("", "-wal", "-shm", "-journal", ".lock"):
        assert touches_store(str(tmp_path / "latest" / "kg.sqlite") + suffix, f)
    assert not touches_store(tmp_path / "latest" / "backup.sqlite", f)


def test_touches_store_sees_companions_of_a_symlinked_store_file(tmp_path):
    # SQLite resolves a symlinked store and keeps -wal/-shm beside the real file.
    _, f = _store(tmp_path)
    os.symlink(f, tmp_path / "s.sqlite")
    (tmp_path / "ckpt-1" / "kg.sqlite-wal").write_bytes(b"w")
    assert touches_store(str(f) + "-wal", tmp_path / "s.sqlite")
    assert touches_store(str(f) + "-shm", tmp_path / "s.sqlite")  # not created yet


def test_same_file_treats_a_path_under_a_regular_file_as_missing(tmp_path):
    _, f = _store(tmp_path)
    assert not same_file(str(f) + "/x", f)
