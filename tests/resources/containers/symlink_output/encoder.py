"""Hostile test encoder: answers, but one features file is a symlink to /etc/passwd."""
import os

from _contract import answer

items, out = answer()
os.remove(f"/output/{items[0]['id']}.npy")
os.symlink("/etc/passwd", f"/output/{items[0]['id']}.npy")
