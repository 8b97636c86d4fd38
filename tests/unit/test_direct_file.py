"""direct_file.py: aligned regions written with O_DIRECT — or buffered where the file system
refuses it, at open or at the first write — give exactly the bytes appended, the last region's
padding cut."""
import errno
import os

import pytest
import torch

from runtime.checkpoint import direct_file
from runtime.checkpoint.direct_file import ALIGN, DirectFile
from runtime.checkpoint.pool import HostPool


def _refuse_direct(monkeypatch, where):
    """Make O_DIRECT fail with EINVAL as file systems without it do."""
    real_open, real_write = os.open, os.write

    def fake_open(path, flags, mode=0o777):
        if where == "open" and flags & direct_file._DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def fake_write(fd, data):
        if where == "write" and direct_file.fcntl.fcntl(fd, direct_file.fcntl.F_GETFL) & direct_file._DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)


@pytest.mark.parametrize("refused", [None, "open", "write"])
def test_regions_land_byte_for_byte(tmp_path, monkeypatch, refused):
    if refused:
        _refuse_direct(monkeypatch, refused)
    pool = HostPool(4 * ALIGN, align=ALIGN)
    data = torch.randint(0, 256, (2 * ALIGN + 123,), dtype=torch.uint8)
    f = DirectFile(tmp_path / "f.bin")
    for start, n in ((0, ALIGN), (ALIGN, ALIGN), (2 * ALIGN, 123)):
        at = pool.alloc(n)
        pool.view(at, n).copy_(data[start:start + n])
        f.write(memoryview(pool.view(at, n + -n % ALIGN).numpy()), n)
        pool.free(at)
    f.close()
    f.close()  # idempotent
    assert (tmp_path / "f.bin").read_bytes() == bytes(data.numpy())
    if refused:
        assert not f.direct


def test_only_the_last_region_may_be_short(tmp_path):
    f = DirectFile(tmp_path / "f.bin")
    if not f.direct:
        pytest.skip("this file system refuses O_DIRECT")
    buf = HostPool(2 * ALIGN, align=ALIGN).view(0, 2 * ALIGN).numpy()
    f.write(memoryview(buf), 10)
    with pytest.raises(ValueError, match="after the last one"):
        f.write(memoryview(buf), 10)
    f.close()
