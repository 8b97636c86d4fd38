"""docker/Dockerfile: every path it copies exists, its entrypoint is docker/entrypoint.sh, and that
script runs the documented `torchrun ... -m launch.train <overrides>`; the image is built where a
Docker engine answers."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.spawn import scaled

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker/Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_copied_path_exists():
    copies = [args.split()[:-1] for word, args in instructions() if word == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    missing = [src for sources in copies for src in sources if not (REPO / src).exists()]
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_entrypoint_is_the_script_and_runs_the_documented_command(tmp_path):
    entry = [args for word, args in instructions() if word == "ENTRYPOINT"]
    assert entry == ['["/opt/quintet/docker/entrypoint.sh"]']
    script = REPO / "docker/entrypoint.sh"
    assert os.access(script, os.X_OK), "docker/entrypoint.sh is not executable"
    # Run it with a torchrun that only prints its arguments: one node, then a rendezvous.
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    one = subprocess.run([str(script), "parallel.tp=2", "train.steps=5"], env={**env, "NPROC_PER_NODE": "2"},
                         capture_output=True, text=True, timeout=scaled(60), check=True).stdout.strip()
    assert one == "--standalone --nproc-per-node=2 -m launch.train parallel.tp=2 train.steps=5"
    many = subprocess.run([str(script), "parallel.dp=4"], capture_output=True, text=True, timeout=scaled(60), check=True,
                          env={**env, "NPROC_PER_NODE": "2", "NNODES": "2", "RDZV_ENDPOINT": "node0:29500"}).stdout
    assert many.split() == ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
                            "--rdzv-id=quintet", "-m", "launch.train", "parallel.dp=4"]
    # docs/multi-node.md's Docker section shows the same command line.
    documented = (REPO / "docs/multi-node.md").read_text()
    assert "`torchrun --standalone --nproc-per-node <GPUs> -m launch.train <overrides>`" in documented


def _docker_engine() -> str | None:
    if not shutil.which("docker"):
        return "no docker command on this machine"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=scaled(30)).returncode:
        return "docker is installed but no Docker engine answers"
    return None


NO_ENGINE = _docker_engine()


@pytest.mark.skipif(NO_ENGINE is not None, reason=NO_ENGINE or "")
@pytest.mark.timeout(1800)
def test_image_builds():
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", "quintet:test", str(REPO)], check=True,
                   timeout=scaled(1800))
