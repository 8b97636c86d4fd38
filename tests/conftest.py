import os

import pytest

from launch.spawn import scaled


def pytest_collection_modifyitems(config, items):
    # Every test's deadline (pytest-timeout: its own marker, else the ini's) is scaled like the
    # subprocess deadlines: a busy machine makes a test later, never a failure.
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0]) if marker is not None and marker.args else default
        if seconds:
            item.add_marker(pytest.mark.timeout(scaled(seconds)), append=False)  # read first
    if os.environ.get("QUINTET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with QUINTET_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
