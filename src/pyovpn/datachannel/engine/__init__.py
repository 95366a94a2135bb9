"""pyovpn's userspace offload engine: the data channel in separate worker processes.

The control plane drives it through :class:`pyovpn.datachannel.engine.proxy.EngineDataChannel`
with exactly the command set of :mod:`pyovpn.datachannel.api` (the kernel ``ovpn`` driver's),
sent over a local unix socket; the transport socket and the TUN travel as SCM_RIGHTS file
descriptors, the way the kernel receives the socket in ``OVPN_CMD_PEER_NEW``.

Processes (``python -m pyovpn.datachannel.engine``):

* the **controller** (:mod:`.controller`) executes commands, keeps the authoritative state
  (interface, peers, key slots) and turns worker events into notifications;
* **workers** (:mod:`.worker`, forked by the controller) move packets in tight epoll loops:
  the TUN reader/transmit side of the peers on one, their socket/receive side on another.
  P2P has one peer; a P2MP server has many, routed by destination address (see
  :mod:`.controller`).

Data path offloads (:mod:`.gso`): a TUN with ``IFF_VNET_HDR`` and TSO/USO/checksum offloads
delivers 64 KiB super-packets that are segmented in userspace (vectorised with numpy) into
ordinary ≤ MTU OpenVPN DATA_V2 packets, encrypted in place and sent with UDP GSO; received
UDP GRO batches are decrypted and in-order TCP segments are coalesced into one GSO write to
the TUN. Every packet on the wire is a normal OpenVPN data packet.
"""
