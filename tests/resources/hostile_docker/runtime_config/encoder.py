"""Hostile test encoder: stays long enough for a healthcheck to run, reports who and where it is, answers."""
import json
import os
import time

from _contract import answer

time.sleep(2.5)  # the image's healthcheck fires every second
print("CONFIG " + json.dumps({"uid": os.getuid(), "cwd": os.getcwd()}), flush=True)
answer()
