"""The P2MP server (``mode server``): many clients on one UDP socket, like OpenVPN's ``multi.c``.

``multi`` runs it; ``pool`` hands out addresses, ``ratelimit`` bounds stateless replies,
``auth`` runs the client checks and scripts, ``ccd`` reads client-config-dir files and builds push lists.
"""
