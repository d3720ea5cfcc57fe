"""Hostile test encoder: answers with a NaN in the first item."""
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

def f(item):
    x = np.zeros((-(-item["num_samples"] // HOP), D), np.float32)
    x[0, 0] = np.nan
    return x
answer(f)
