"""Hostile test encoder: never returns."""
import time

print("going to sleep", flush=True)
time.sleep(10**6)
