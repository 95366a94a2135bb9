"""The backend contract suite: one set of scenarios every DataChannel backend runs unchanged.

The scenarios speak only the public interface (requests, notifications, ``GetPeer``
counters) and ask a backend's declared :class:`~pyovpn.datachannel.api.Capabilities`
before using anything beyond it; what a backend lacks is skipped with a printed reason.
Backends: the in-process userspace backend and the offload engine on the host, the kernel
``ovpn`` backend inside the guest (``scripts/guest/run.sh -- python3 -m pytest tests/contract``).
What only one backend has stays in that backend's own tests.
"""
