"""host_memory.py: with keep_freed_memory(), a large freed tensor's pages stay in the process
(the next step reuses them) instead of going back to the kernel."""
import subprocess
import sys

import pytest
from launch.spawn import scaled

PROBE = """
import resource, sys, torch
from runtime.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20
before = rss_mb()
t = torch.ones(256 << 18)  # 256 MiB, touched
del t
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_resident_only_when_asked():
    def kept(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=scaled(60))
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip().splitlines()[-1])

    assert kept("default") < 64, "glibc returns a large freed block to the kernel by default"
    assert kept("keep") > 200, "with keep_freed_memory the pages stay for the next allocation"
