"""pyovpn: an OpenVPN-compatible VPN whose data channel is offloaded.

Python runs the control plane (TLS, authentication, key negotiation, push/pull);
packets are moved by a data-channel backend: the Linux ``ovpn`` driver or
pyovpn's own userspace data plane, both behind :mod:`pyovpn.datachannel.api`.
"""

__version__ = "0.1.0"
