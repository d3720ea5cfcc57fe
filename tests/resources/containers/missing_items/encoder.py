"""Hostile test encoder: answers for all but the last item."""
import json
import os

from _contract import answer

items, out = answer()
os.remove(f"/output/{items[-1]['id']}.npy")
with open("/output/response.json", "w") as f:
    json.dump({"schema_version": 1, "items": out[:-1]}, f)
