"""The lazy engine's host pool: a ring of fixed size, freed oldest first, back-pressure when full."""
import threading
import time

import pytest

from runtime.checkpoint.pool import HostPool


def test_regions_wrap_around_and_reuse_the_same_bytes():
    pool = HostPool(100)
    a, b = pool.alloc(40), pool.alloc(40)
    assert (a, b) == (0, 40)
    pool.free(a)
    c = pool.alloc(30)  # 20 bytes left at the end: wraps to the freed start
    assert c == 0
    pool.free(b)
    pool.free(c)
    assert pool.alloc(100) == 0  # empty again: the whole buffer
    assert pool.buffer.numel() == 100


def test_a_full_pool_blocks_until_the_writer_frees():
    pool = HostPool(64)
    first = pool.alloc(48)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.alloc(32)))
    t.start()
    time.sleep(0.1)
    assert got == [] and pool.waits == 1, "the allocation should wait for space"
    pool.free(first)
    t.join(5)
    assert got == [0]


def test_bad_use_is_refused():
    pool = HostPool(10)
    with pytest.raises(ValueError, match="does not fit a pool of 10"):
        pool.alloc(11)
    a = pool.alloc(4)
    pool.alloc(4)
    with pytest.raises(RuntimeError, match="oldest first"):
        pool.free(a + 4)
    with pytest.raises(TimeoutError):
        pool.alloc(8, timeout=0.05)


def test_aligned_regions_start_at_aligned_addresses():
    pool = HostPool(3 * 4096 + 100, align=4096)
    assert pool.capacity == 3 * 4096 and pool.buffer.data_ptr() % 4096 == 0
    a, b = pool.alloc(10), pool.alloc(4097)
    assert (a, b) == (0, 4096)  # 10 bytes take a whole block; 4097 take two
    with pytest.raises(TimeoutError):
        pool.alloc(1, timeout=0.05)
    pool.free(a)
    assert pool.alloc(4096) == 0
