"""Files written by atomic_write_bytes get the mode a plain open() would give them."""

import builtins
import os
import stat

import pytest

from e2kd import _atomic
from e2kd._atomic import atomic_write_bytes

pytestmark = pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes only")


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_file_mode_follows_umask(tmp_path, umask, mask, mode):
    umask(mask)
    target = tmp_path / "sub" / "results.json"
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    assert stat.S_IMODE(target.stat().st_mode) == mode
    # a file written with open() under the same umask gets the same mode
    plain = tmp_path / "plain.json"
    plain.write_bytes(b"{}")
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_umask_read_without_proc(monkeypatch, umask):
    umask(0o027)
    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file) == "/proc/self/status":
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert _atomic._current_umask() == 0o027
    # reading it left the umask as it was
    assert os.umask(0o027) == 0o027


def test_check_writable_folder_leaves_nothing_behind(tmp_path):
    from e2kd._atomic import check_writable_folder

    check_writable_folder(tmp_path / "a" / "b", "output_dir", "fix it")
    assert list(tmp_path.iterdir()) == []  # neither the missing folders nor the probe file
    (tmp_path / "f").write_text("data")
    with pytest.raises(ValueError) as info:
        check_writable_folder(tmp_path / "f", "output_dir", "set output_dir to a folder")
    assert str(info.value) == f"output_dir {str(tmp_path / 'f')!r} is a file, not a folder; set output_dir to a folder"
    with pytest.raises(ValueError, match=r"in its path is a file, not a folder; fix it$"):
        check_writable_folder(tmp_path / "f" / "g", "output_dir", "fix it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
