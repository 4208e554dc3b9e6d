"""The kernel manager headless runs use: the kernel's ZMQ sockets encrypted with CurveZMQ keys the manager provisions.

jupyter_client leaves transport encryption off by default, so every ipykernel >= 7.4 started by papermill logs
"Kernel is running over TCP without encryption ..." on stderr, once per `kvbook run`. The sockets are on loopback,
but any local user could read them; with `transport_encryption = "auto"` the manager gives a kernel whose kernelspec
declares Curve support (ipykernel's does) its own server key, which both encrypts the traffic and silences the
warning for the right reason. Where pyzmq was built without Curve, it stays off (jupyter_client would refuse "auto").
"""

from __future__ import annotations

from typing import Any


def encrypted_kernel_manager_class() -> type[Any]:
    """An AsyncKernelManager that provisions CurveZMQ keys when pyzmq and the kernelspec support them."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class EncryptedKernelManager(AsyncKernelManager):
        @default("transport_encryption")
        def _transport_encryption_default(self) -> str:
            return "auto" if zmq.has("curve") else "disabled"

    return EncryptedKernelManager
