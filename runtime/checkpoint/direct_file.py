"""An append-only data file written with O_DIRECT where the file system allows it.

A buffered write copies every byte into the page cache before the device sees it. On a trainer
that keeps the CPU busy that copy is most of what a background checkpoint costs (on the
reference VM, 640 MB: 0.75 s of CPU buffered, 0.02 s direct), so the lazy writer hands the
device its host-pool regions directly. O_DIRECT needs block-aligned addresses, lengths and file
offsets: the pool's regions are aligned (pool.py), every region but a file's last is a whole
number of blocks, and the last one is written padded to a block and the file truncated to its
true length afterwards. Where O_DIRECT is refused (tmpfs, some overlay file systems), at open or
at the first write, the file falls back to ordinary buffered writes.
"""
from __future__ import annotations

import errno
import fcntl
import os

ALIGN = 4096  # a multiple of every common logical block size
_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectFile:
    def __init__(self, path):
        self.path, self.size = path, 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = bool(_DIRECT)
        try:
            self.fd = os.open(path, flags | _DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, flags, 0o644), False

    def write(self, region: memoryview, n: int) -> None:
        """Append the first `n` bytes of `region`; `region` extends to a block boundary past `n`
        (the pool's rounding), and only the file's last region may have `n` off a boundary."""
        if self.direct and self.size % ALIGN:
            raise ValueError(f"{self.path}: a region after the last one ({self.size} bytes written)")
        if self.direct:
            try:
                self._write_all(region[:n + -n % ALIGN])
                self.size += n
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered()  # the file system accepted the flag but not the writes
        self._write_all(region[:n])
        self.size += n

    def _write_all(self, data: memoryview) -> None:
        os.lseek(self.fd, self.size, os.SEEK_SET)
        while data:
            data = data[os.write(self.fd, data):]

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Cut the padding of the last region and close (the caller fsyncs after its index);
        a second call does nothing."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
