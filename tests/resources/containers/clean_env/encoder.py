"""Hostile test encoder: checks the image's ENV and ENTRYPOINT are ignored; answers normally when they are."""
import json
import os
import sys

import numpy as np

D, HOP = 8, 320  # tests declare output_dim 8, frame_hop_ms 20


def frames(item):
    return -(-item["num_samples"] // HOP)


def answer(features=lambda item: np.full((frames(item), D), 0.5, np.float32)):
    """Write a contract-abiding answer (used when the attack did not stop us)."""
    with open("/input/request.json") as f:
        items = json.load(f)["items"]
    out = []
    for item in items:
        x = features(item)
        np.save(f"/output/{item['id']}.npy", x)
        out.append({"id": item["id"], "status": "ok", "features": f"{item['id']}.npy",
                    "shape": list(x.shape), "dtype": str(x.dtype)})
    with open("/output/response.json", "w") as f:
        json.dump({"schema_version": 1, "items": out}, f)
    return items, out

leaked = sorted(k for k in ("XARES_LEAK", "LD_PRELOAD", "PYTHONPATH") if k in os.environ)
if leaked:
    print(f"image ENV leaked into the container: {leaked}", file=sys.stderr)
    sys.exit(3)
if os.getuid() != 65534:
    print(f"running as uid {os.getuid()}, expected 65534", file=sys.stderr)
    sys.exit(4)
answer()
