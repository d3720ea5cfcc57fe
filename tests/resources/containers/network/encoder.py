"""Hostile test encoder: opens network sockets; answers normally only if one connects."""
import socket
import sys

from _contract import answer

last = None
for host, port in [("1.1.1.1", 53), ("8.8.8.8", 443), ("10.0.0.1", 80), ("172.17.0.1", 2375)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(f"connected to {host}:{port}", file=sys.stderr)
        answer()
        sys.exit(0)
    except OSError as e:
        last = e
raise last
