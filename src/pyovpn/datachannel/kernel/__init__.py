"""The kernel data channel: pyovpn's backend on Linux's ``ovpn`` DCO driver (mainline
since 6.16), laid out like the driver's own sources, one file per concern.

* :mod:`.uapi` - the driver's user API: family, command and attribute ids, the pyroute2
  message classes;
* :mod:`.genl` - generic netlink to the family: the backend's channel on the event loop,
  pyroute2's synchronous socket for probes, kernel errors in words;
* :mod:`.rtnl` - the ``ovpn`` link over rtnetlink, and removing a stale one;
* :mod:`.transport` - reading and writing the handed-over transport sockets;
* :mod:`.backend` - :class:`KernelDataChannel`, the
  :class:`~pyovpn.datachannel.api.DataChannel` built from the above.

Netlink plumbing is chosen to work with pyroute2 0.7.x as well as 0.9.x.
"""

from pyovpn.datachannel.kernel.backend import KernelDataChannel

__all__ = ["KernelDataChannel"]
