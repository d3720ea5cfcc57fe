"""Hostile test encoder: prints a gigabyte to stdout, then fails."""
import sys
import time

line = b"x" * ((1 << 20) - 1) + b"\n"
for _ in range(1024):
    sys.stdout.buffer.write(line)
sys.stdout.flush()
time.sleep(0.5)  # the failure comes after the chatter (the two streams are copied independently)
print("chatty encoder gave up after 1 GiB of output", file=sys.stderr)
sys.exit(1)
