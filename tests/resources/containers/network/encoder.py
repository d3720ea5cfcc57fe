"""Hostile test encoder: opens network sockets; answers normally only if one connects."""
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

import socket
last = None
for host, port in [("1.1.1.1", 53), ("8.8.8.8", 443), ("10.0.0.1", 80), ("172.17.0.1", 2375)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print(f"connected to {host}:{port}", file=sys.stderr)
        answer()
        sys.exit(0)
    except OSError as e:
        last = e
raise last
