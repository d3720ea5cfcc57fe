"""CPU thread settings under load: training steps/s of the engine per thread count and OpenMP wait policy,
on an idle machine and with N spinning processes beside it (a shared machine).

Each setting runs in a fresh process, because OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads::

    python benchmarks/bench_threads.py --decoder smollm2 --steps 4 --busy 2
    python benchmarks/bench_threads.py --decoder tiny --steps 60

It prints a markdown table: load, threads, wait policy, steps/s, and the ratio to one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from evaluator.features import ArrayDataset
from evaluator.model import ModelConfig, build_model
from evaluator.training import TrainConfig, train
decoder, steps, threads, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
rng = np.random.default_rng(0)
arrays = [rng.normal(size=(int(rng.integers(25, 125)), 768)).astype(np.float16) for _ in range(64)]
data = ArrayDataset("bench", "Classify the sound.", arrays, [("a dog barks",), ("rain falls",)] * 32)
model = build_model(ModelConfig(encoder_dim=768, decoder=decoder))
cfg = dict(sort_buffer=32, checkpoint_every=10**9, device="cpu", threads=None if threads == "default" else int(threads))
train(model, [data], [1], TrainConfig(max_steps=2, **cfg), work / "warm", progress=False)  # first-call costs
result = train(model, [data], [1], TrainConfig(max_steps=steps, **cfg), work / "timed", progress=False)
print(json.dumps({"steps_per_s": steps / result.seconds, "torch_threads": torch.get_num_threads()}))
"""

BURN = "import time\nend = time.time() + {limit}\nwhile time.time() < end:\n    pass\n"


def build_decoder(kind: str, folder: Path) -> Path:
    from evaluator.smoke_decoder import build_smoke_decoder, build_smollm2_shaped

    if kind == "smollm2":
        return build_smollm2_shaped(folder)
    return build_smoke_decoder(["a dog barks", "rain falls"], folder, steps=0, hidden_size=96, threads=1)


def measure(decoder: Path, steps: int, threads: str, policy: str, work: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin="):  # GNU OpenMP: spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", WORKER, str(decoder), str(steps), threads, str(work)],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoder", choices=["tiny", "smollm2"], default="smollm2")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per setting")
    p.add_argument("--busy", type=int, default=2, help="spinning processes for the busy half (0: idle only)")
    p.add_argument("--settings", default="1:default,default:active,default:passive",
                   help="comma list of THREADS:WAIT (THREADS a number or 'default' = the engine's choice; WAIT "
                        "default | active | passive | spin=N for GOMP_SPINCOUNT=N)")
    args = p.parse_args(argv)
    settings = [tuple(s.split(":")) for s in args.settings.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        decoder = build_decoder(args.decoder, work / "decoder")
        for load in ([0, args.busy] if args.busy else [0]):
            burners = [subprocess.Popen([sys.executable, "-c", BURN.format(limit=3600)]) for _ in range(load)]
            try:
                time.sleep(1 if load else 0)
                for k, (threads, policy) in enumerate(settings):
                    rate = measure(decoder, args.steps, threads, policy, work / f"{load}-{k}")
                    rows.append((load, threads, policy, rate))
                    print(f"  busy {load}: threads {threads}, waiting {policy}: {rate:.3g} steps/s",
                          file=sys.stderr, flush=True)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
    print(f"\n{args.decoder} decoder, training steps/s on {os.cpu_count()} cores "
          f"(usable: {len(os.sched_getaffinity(0))})\n")
    print("| spinning processes beside | threads | OpenMP waiting | steps/s | vs 1 thread |")
    print("|---|---|---|---|---|")
    for load, threads, policy, rate in rows:
        base = next((r for ld, t, _, r in rows if ld == load and t == "1"), rate)
        print(f"| {load} | {threads} | {policy} | {rate:.3g} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
