"""The transport of each process group, chosen by the NIC classes of its members (Holmes).

A group inside one class uses that class's transport: for NCCL its network module (`IB` for
InfiniBand and RoCE, `Socket` for Ethernet) and its settings (HCA list, RoCE GID index); for gloo
the class's interface when the cluster names one. A group whose members span classes cannot use
RDMA (it does not cross NIC types), so it uses sockets: `NCCL_NET=Socket`, `NCCL_IB_DISABLE=1`.

NCCL takes the network module per communicator (`ncclConfig_t.netName`, torch's
`ProcessGroupNCCL.Options().config.net_name`); the other NCCL variables and gloo's
`GLOO_SOCKET_IFNAME` are read from the environment when the communicator or the gloo context is
made, so they are set around the group's creation and restored after (`transport_env`), and a
warm-up collective makes NCCL build the communicator while they are in force.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

MIXED = "mixed"


@dataclass(frozen=True)
class Transport:
    """What one group is created with."""

    nic: str  # the members' class, or "mixed"
    nccl_net: str  # IB | Socket
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()) if k != "NCCL_NET")
        return f"{self.nic}: NCCL_NET={self.nccl_net}" + (f" {extra}" if extra else "")


def group_transport(member_classes: list[str], classes, backend: str) -> Transport:
    """The transport of a group whose members have NIC classes `member_classes`.

    `classes` maps a class name to its config (`nccl_net`, `nccl_env`, `gloo_ifname`)."""
    kinds = sorted(set(member_classes))
    if len(kinds) > 1:
        env = {"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1"} if backend == "nccl" else {}
        return Transport(MIXED, "Socket", env)
    nic = kinds[0]
    spec = classes.get(nic) if hasattr(classes, "get") else None
    if spec is None:
        known = ", ".join(sorted(classes)) if classes else "none"
        raise ValueError(f"NIC class {nic!r} is not described in cluster.classes (known: {known})")
    if backend == "nccl":
        env = {"NCCL_NET": spec.nccl_net, **dict(spec.nccl_env)}
        if spec.nccl_net == "Socket":
            env["NCCL_IB_DISABLE"] = "1"
    else:
        env = {"GLOO_SOCKET_IFNAME": spec.gloo_ifname} if spec.gloo_ifname else {}
    return Transport(nic, spec.nccl_net, env)


@contextmanager
def transport_env(transport: Transport | None):
    """Set the transport's variables for the duration of a group's creation, then restore."""
    if transport is None or not transport.env:
        yield
        return
    saved = {k: os.environ.get(k) for k in transport.env}
    os.environ.update(transport.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
