"""A Whisper-large-v3-shaped ``encoder.py`` (635 M parameters, random weights) through build, validate, extract.

Issue 9: weights over protobuf's 2 GB limit must go through ``xares-submit build`` (external data beside
model.onnx), and float16 weights on request. This writes a self-contained ``encoder.py`` (transformers'
``WhisperEncoder`` built from a ``WhisperConfig`` in code, log-mel in plain torch), then runs each step
as its own process and records wall time and peak memory:

1. build (export, torch-vs-ONNX check, probe, pack): ``evaluator.submission.build.build`` in a child
   process, with the sandbox memory of the manifest's ``resources.memory_mb`` (the ``xares-submit build``
   CLI probes under the default 4096 MB, which a 2.5 GB model does not fit);
2. ``xares-submit validate`` (safe unpack, checksums, the probe again);
3. ``xares-eval extract`` of a few demo clips (``demo-a``'s keywords test shard).

Peak memory is sampled every 0.2 s over the step's whole process tree (the CLI and the sandboxed
onnxruntime worker together), next to the largest single process (``RUSAGE_CHILDREN``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_large_encoder.py --dtype both --out /work/bench9  # ~40 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_large_encoder.py --small --dtype float16   # 2 min check

Prints one JSON object per step and a table at the end; writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LARGE = {"d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120}  # Whisper large-v3's encoder
SMALL = {"d_model": 64, "layers": 2, "heads": 4, "ffn": 128}  # the same code, seconds to build

ENCODER_PY = '''"""A Whisper-large-v3-shaped encoder with random weights (written by benchmarks/bench_large_encoder.py).

Every clip is zeroed past its own length and padded to 30 s before the log-mel, exactly as Whisper's
feature extractor does, so padding in a batch cannot change a clip's frames; the 1,500 encoder frames
are trimmed to the audio (one per 20 ms) with a frame mask for each clip's own length.
"""

import torch
from transformers import WhisperConfig
from transformers.audio_utils import mel_filter_bank
from transformers.models.whisper.modeling_whisper import WhisperEncoder

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160  # 25 ms windows, 100 mel frames/s
CHUNK = 30 * SAMPLE_RATE  # samples in Whisper's 30-second input
FRAME_SAMPLES = 2 * HOP  # one encoder frame per 20 ms (conv2 has stride 2)
D_MODEL, LAYERS, HEADS, FFN, MELS = {d_model}, {layers}, {heads}, {ffn}, 128


class WhisperLargeEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = WhisperConfig(
            d_model=D_MODEL,
            encoder_layers=LAYERS,
            encoder_attention_heads=HEADS,
            encoder_ffn_dim=FFN,
            num_mel_bins=MELS,
            max_source_positions=1500,
            attn_implementation="sdpa",
        )
        self.encoder = WhisperEncoder(config).eval()
        self.output_dim = D_MODEL
        filters = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2, num_mel_filters=MELS, min_frequency=0.0, max_frequency=8000.0,
            sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
        )  # [F, M]
        self.register_buffer("mel_filters", torch.from_numpy(filters).float().T.contiguous())  # [M, F]
        self.register_buffer("window", torch.hann_window(N_FFT))

    def log_mel(self, audio):  # [B, CHUNK] -> [B, M, 3000], Whisper's normalisation
        spec = torch.stft(audio, N_FFT, HOP, window=self.window, return_complex=True)[..., :-1]
        mel = self.mel_filters @ spec.abs() ** 2
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0

    def forward(self, audio, audio_attention_mask):
        batch, samples = audio.shape
        audio = audio * audio_attention_mask.to(audio.dtype)
        audio = torch.cat([audio, audio.new_zeros(batch, CHUNK)], dim=1)[:, :CHUNK]  # pad to 30 s
        feats = self.encoder(self.log_mel(audio)).last_hidden_state  # [B, 1500, D]
        frames = (samples + FRAME_SAMPLES - 1) // FRAME_SAMPLES
        feats = feats[:, :frames]  # [B, T, D]
        lengths = audio_attention_mask.sum(-1)
        per_clip = torch.div(lengths + FRAME_SAMPLES - 1, FRAME_SAMPLES, rounding_mode="floor")
        mask = torch.arange(feats.shape[1])[None, :] < per_clip[:, None]
        return feats, mask.long()
'''


def write_folder(folder: Path, shape: dict, dtype: str, memory_mb: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder.py").write_text(ENCODER_PY.format(**shape))
    manifest = {
        "schema_version": 2,
        "name": folder.name,
        "team": "bench",
        "weights_dtype": dtype,
        "resources": {"gpu": False, "memory_mb": memory_mb},
        "description": "Whisper-large-v3-shaped encoder, random weights (issue 9 benchmark)",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def run_step(name: str, cmd: list[str], log: Path) -> dict:
    """Run one step as a child process; wall time, peak tree RSS (sampled), largest process RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    wall = time.perf_counter() - start
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "step": name,
        "rc": rc,
        "wall_s": round(wall, 1),
        "peak_tree_rss_gib": round(peak[0] / 2**30, 2),
        # RUSAGE_CHILDREN keeps the largest process so far; it is this step's only when it grew
        "largest_process_rss_gib": round(largest / 2**30, 2) if largest > before * 1024 else None,
        "log": str(log),
    }
    print(json.dumps(result), flush=True)
    if rc != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
    return result


def demo_shard(out: Path) -> Path:
    """demo-a's keywords test shard (generated once with espeak-ng and sox)."""
    from evaluator.data import generate_demo

    shard = out / "data" / "demo-a" / "keywords" / "test" / "test_000000.tar.gz"
    if not shard.is_file():
        generate_demo("demo-a", out / "data" / "demo-a")
    return shard


def bench(out: Path, dtype: str, shape: dict, clips: int, memory_mb: int) -> dict:
    folder = out / f"whisper_large_{dtype}"
    tar = out / f"whisper_large_{dtype}.tar"
    write_folder(folder, shape, dtype, memory_mb)
    cmd = [sys.executable, __file__, "--build-child", str(folder), str(tar), str(memory_mb)]
    steps = [run_step("build", cmd, out / f"{dtype}-build.log")]
    if steps[-1]["rc"] == 0:
        steps.append(
            run_step(
                "validate", [str(BIN / "xares-submit"), "validate", str(tar)], out / f"{dtype}-validate.log"
            )
        )
        cmd = [
            str(BIN / "xares-eval"),
            "extract",
            str(tar),
            "--data",
            str(demo_shard(out)),
            "--out",
            str(out / "features"),
            "--limit",
            str(clips),
            "--memory-mb",
            str(memory_mb),
        ]
        steps.append(run_step(f"extract ({clips} clips)", cmd, out / f"{dtype}-extract.log"))
    sizes = {}
    if tar.is_file():
        import tarfile

        with tarfile.open(tar) as t:
            sizes = {m.name: m.size for m in t.getmembers() if not m.name.startswith("source/")}
            report = json.load(t.extractfile("build_report.json"))
        sizes["build_report"] = {
            k: report.get(k)
            for k in (
                "exporter",
                "onnx_vs_torch",
                "weights_dtype",
                "weights_bytes",
                "external_data",
                "float16_rounding",
                "source_files",
            )
        }
        sizes["tar_bytes"] = tar.stat().st_size
    return {"weights_dtype": dtype, "shape": shape, "steps": steps, "package": sizes}


def build_child(folder: Path, tar: Path, memory_mb: int) -> None:
    """The build step, as ``xares-submit build`` runs it, with the sandbox memory the manifest asks for."""
    from evaluator.sandbox.base import Limits
    from evaluator.submission.build import BuildOptions, build

    start = time.perf_counter()
    result = build(
        folder,
        tar,
        BuildOptions(limits=Limits(memory_mb=memory_mb)),
        step=lambda line: print(f"[{time.perf_counter() - start:6.0f} s] {line}", flush=True),
    )
    for note in result.notes:
        print(f"  - {note}")
    print(f"[{time.perf_counter() - start:6.0f} s] wrote {tar} ({result.size / 2**30:.2f} GiB)")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--build-child":
        return build_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/xares-bench-large"), help="work folder")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "both"], default="both", help="weights dtype"
    )
    parser.add_argument("--small", action="store_true", help="a 2-layer, 64-wide model (checks the pipeline)")
    parser.add_argument("--clips", type=int, default=4, help="demo clips to extract")
    parser.add_argument("--memory-mb", type=int, default=12288, help="the manifest's resources.memory_mb")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SMALL if args.small else LARGE
    dtypes = ["float32", "float16"] if args.dtype == "both" else [args.dtype]
    results = [bench(args.out, d, shape, args.clips, args.memory_mb) for d in dtypes]
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| weights | step | wall | peak RSS, process tree | largest process |")
    print("|---|---|---|---|---|")
    for r in results:
        for s in r["steps"]:
            print(
                f"| {r['weights_dtype']} | {s['step']}{'' if s['rc'] == 0 else ' (FAILED)'} | {s['wall_s']:.0f} s | "
                f"{s['peak_tree_rss_gib']:.2f} GiB | {s['largest_process_rss_gib'] or '-'} GiB |"
            )
    for r in results:
        pkg = {k: v for k, v in r["package"].items() if k != "build_report"}
        print(r["weights_dtype"], json.dumps(pkg), json.dumps(r["package"].get("build_report", {})))


if __name__ == "__main__":
    main()
