"""Hostile test encoder: prints a gigabyte to stdout, then fails."""
import json, os, sys
import numpy as np

D, HOP = 8, 320  # tests declare output_dim 8, frame_hop_ms 20


def answer(features=lambda item: np.full((-(-item["num_samples"] // HOP), D), 0.5, np.float32)):
    """Write a contract-abiding answer (used when the attack did not stop us)."""
    items = json.load(open("/input/request.json"))["items"]
    out = []
    for item in items:
        f = features(item)
        np.save(f"/output/{item['id']}.npy", f)
        out.append({"id": item["id"], "status": "ok", "features": f"{item['id']}.npy",
                    "shape": list(f.shape), "dtype": str(f.dtype)})
    json.dump({"schema_version": 1, "items": out}, open("/output/response.json", "w"))
    return items, out

line = b"x" * ((1 << 20) - 1) + b"\n"
for _ in range(1024):
    sys.stdout.buffer.write(line)
sys.stdout.flush()
import time
time.sleep(0.5)  # the failure comes after the chatter (the two streams are copied independently)
print("chatty encoder gave up after 1 GiB of output", file=sys.stderr)
sys.exit(1)
