"""The asyncio edge shared by the P2P connection and the P2MP server.

Stop reasons, transport sockets, the tunnel device set-up, and the seam to the host (tests fake it).
"""
