"""Hostile test encoder: reads the request, then stops itself (SIGSTOP), so the container never exits."""
import json
import os
import signal

with open("/input/request.json") as f:
    json.load(f)
print("request read; freezing", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
