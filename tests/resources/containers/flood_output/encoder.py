"""Hostile test encoder: fills /output with one growing file (up to 4 GiB); answers normally if nothing stops it."""
import os

from _contract import answer

block = b"\0" * (1 << 20)
with open("/output/flood.bin", "wb") as f:
    f.writelines(block for _ in range(4096))
os.remove("/output/flood.bin")
answer()
