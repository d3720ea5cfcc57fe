"""Hostile test encoder: checks the image's ENV and ENTRYPOINT are ignored; answers normally when they are."""
import os
import sys

from _contract import answer

leaked = sorted(k for k in ("XARES_LEAK", "LD_PRELOAD", "PYTHONPATH") if k in os.environ)
if leaked:
    print(f"image ENV leaked into the container: {leaked}", file=sys.stderr)
    sys.exit(3)
if os.getuid() != 65534:
    print(f"running as uid {os.getuid()}, expected 65534", file=sys.stderr)
    sys.exit(4)
answer()
