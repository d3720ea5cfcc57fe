"""Hostile test encoder: forks until refused; answers normally only if 2000 forks succeed."""
import os
import time

from _contract import answer

for _ in range(2000):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
answer()
