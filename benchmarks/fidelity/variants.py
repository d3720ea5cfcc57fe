"""Points 5, 8 and 9 of docs/fidelity.md measured on the reference itself: its score with and without the behaviour.

Each of the three differences we keep is isolated inside the real XARES-LLM (its venv, its CLI, the data,
decoder and YAMLs of ``run.py``'s work folder), by running it twice: as it is, and with one behaviour
switched to ours through the encoder module it imports (``fidelity_variants.py``, written beside
``encoders.py``'s copy; nothing of the reference is modified on disk):

* **9, encoder mode.** The reference's Trainer puts the encoder in training mode. Two encoders that
  care: ``MelFineDropoutEncoder`` (dropout 0.1 on its features, like wav2vec2's hidden dropout) and
  ``MelFineBatchNormEncoder`` (a BatchNorm over its features, running statistics from 0/1). Variant
  ``eval``: the same class whose ``train()`` keeps it in eval mode, which is what our export does.
* **8, positions.** The reference passes no ``position_ids`` in training, so a row's text positions
  start after the batch's longest clip. Variant ``contiguous``: the model's ``forward`` is given
  ``position_ids = cumsum(mask) - 1``, contiguous over each row's real positions, as our packed rows.
* **5, long clips.** The train YAML gets ``crop_audio_length: --crop-seconds`` (shorter than the
  synthetic clips, 1-2 s, so that most are cropped); as is, the reference crops the audio before the
  encoder. Variant ``frames``: no audio crop, the encoder runs on the whole clip and a random window of
  ``--crop-seconds`` of its *frames* is kept in training, as our stored-feature crop does. Encoders: the
  frame-local ``MelFineEncoder`` and ``MelFineCMVNEncoder`` (per-clip mean/variance normalisation: global
  context, so the two crops give other features).

Run ``run.py`` first (it builds the data, the decoder and the configs, and its reference runs are the
"as is" baseline of point 8). Then::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fidelity/variants.py --work /tmp/fidelity \\
        --reference-python /tmp/xares-ref-venv/bin/python --reference-src /tmp/xares-llm-src --seeds 42,43

Writes ``<work>/variants.json`` and ``<work>/variants.md``: per point, encoder and task the score as is,
with the variant, the difference, and the reference's own seed spread from ``run.py`` for scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS_SOURCE = '''\
"""Variants of the fidelity encoders, for benchmarks/fidelity/variants.py (imported by the reference)."""
import os

import torch

import fidelity_encoders as base
from fidelity_encoders import MelCoarseEncoder, MelFineEncoder  # noqa: F401 - the "as is" classes


class _EvalForced:
    """Stays in eval mode whatever the Trainer asks: what our ONNX export runs."""

    def train(self, mode=True):
        return super().train(False)


class MelFineDropoutEncoder(base.MelFineEncoder):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = super().forward(audio, audio_attention_mask)
        return self.drop(feats), mask


class MelFineBatchNormEncoder(base.MelFineEncoder):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = torch.nn.BatchNorm1d(self.output_dim, affine=False)

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = super().forward(audio, audio_attention_mask)
        return self.norm(feats.transpose(1, 2)).transpose(1, 2), mask


class MelFineDropoutEncoderEval(_EvalForced, MelFineDropoutEncoder):
    pass


class MelFineBatchNormEncoderEval(_EvalForced, MelFineBatchNormEncoder):
    pass


class MelFineCMVNEncoder(base.MelFineEncoder):
    """Per-clip mean and variance normalisation over the clip's valid frames: global context."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = super().forward(audio, audio_attention_mask)
        m = mask.unsqueeze(-1).to(feats.dtype)
        n = m.sum(1, keepdim=True).clamp(min=1)
        mean = (feats * m).sum(1, keepdim=True) / n
        var = (((feats - mean) * m) ** 2).sum(1, keepdim=True) / n
        return (feats - mean) / torch.sqrt(var + 1e-5) * m, mask


class _FrameCrop:
    """In training, keep a random window of XARES_FID_CROP_SECONDS of each clip's frames (our crop)."""

    def forward(self, audio, audio_attention_mask=None):
        feats, mask = super().forward(audio, audio_attention_mask)
        if not self.training:
            return feats, mask
        frames_per_s = feats.shape[1] / max(1, audio.shape[-1]) * 16000
        keep = max(1, int(float(os.environ["XARES_FID_CROP_SECONDS"]) * frames_per_s))
        rows, masks = [], []
        for f, m in zip(feats, mask):
            n = int(m.sum())
            start = int(torch.randint(0, n - keep + 1, (1,))) if n > keep else 0
            rows.append(f[start : start + min(n, keep)])
        width = max(r.shape[0] for r in rows)
        out = feats.new_zeros(len(rows), width, feats.shape[2])
        new_mask = mask.new_zeros(len(rows), width)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
            new_mask[i, : r.shape[0]] = 1
        return out, new_mask


class MelFineEncoderFrames(_FrameCrop, base.MelFineEncoder):
    pass


class MelFineCMVNEncoderFrames(_FrameCrop, MelFineCMVNEncoder):
    pass


def _contiguous_positions():
    """Give the reference's training forward position ids that skip padding, as our packed rows have."""
    from xares_llm.modeling_audiollm import modeling_xaresllm as m

    if getattr(m.XaresLLMModel.forward, "_contiguous", False):
        return

    def forward(self, audio, audio_attention_mask, input_ids, attention_mask, labels, **kwargs):
        embeds, mask, labels = self._prepare_multimodal_inputs(audio, audio_attention_mask, input_ids,
                                                               attention_mask, labels)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.decoder(input_ids=None, inputs_embeds=embeds, labels=labels, attention_mask=mask,
                            position_ids=positions)

    forward._contiguous = True
    m.XaresLLMModel.forward = forward
    print("[bench-launcher] PATCH XaresLLMModel.forward passes contiguous position_ids (variant)", flush=True)


class MelFineEncoderContiguous(base.MelFineEncoder):
    def __init__(self, **kwargs):
        _contiguous_positions()
        super().__init__(**kwargs)


class MelCoarseEncoderContiguous(base.MelCoarseEncoder):
    def __init__(self, **kwargs):
        _contiguous_positions()
        super().__init__(**kwargs)
'''

# point -> [(label, encoder class as is, variant class, yaml setting)]
POINTS = {
    "9 encoder mode": [("dropout", "MelFineDropoutEncoder", "MelFineDropoutEncoderEval", None),
                       ("batchnorm", "MelFineBatchNormEncoder", "MelFineBatchNormEncoderEval", None)],
    "8 positions": [("mel-fine", "MelFineEncoder", "MelFineEncoderContiguous", None),
                    ("mel-coarse", "MelCoarseEncoder", "MelCoarseEncoderContiguous", None)],
    "5 long clips": [("mel-fine", "MelFineEncoder", "MelFineEncoderFrames", "crop"),
                     ("mel-cmvn", "MelFineCMVNEncoder", "MelFineCMVNEncoderFrames", "crop")],
}


def load_run_module():
    spec = importlib.util.spec_from_file_location("fidelity_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))  # benchmarks/: bench_reference
    from bench_reference import add_reference_args, reference_found

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="run.py's --out folder (data, decoder, configs)")
    add_reference_args(p)
    p.add_argument("--seeds", default="42", help="training seeds, comma list")
    p.add_argument("--points", default="9,8,5", help="which points (comma list of 5, 8, 9)")
    p.add_argument("--crop-seconds", type=float, default=1.0, help="point 5: the training crop (clips are 1-2 s)")
    p.add_argument("--jobs", type=int, default=2, help="reference runs in parallel")
    args = p.parse_args(argv)
    if not reference_found(args, "variants"):
        return 2
    fid = load_run_module()  # also puts benchmarks/ on sys.path
    work = args.work.resolve()
    cfgs = (work / "configs" / fid.TRAIN_YAML, work / "configs" / fid.EVAL_YAML)
    decoder = work / "decoder"
    if not cfgs[0].is_file() or not (decoder / "config.json").is_file():
        print(f"variants: {work} has no configs/decoder; run benchmarks/fidelity/run.py --out {work} first")
        return 2
    train_doc = json.loads(cfgs[0].read_text())
    steps = int(train_doc["max_steps"])
    # point 5's configs: the same YAML (same file name: the reference names its output folder after it)
    crop_dir, frames_dir = work / "configs-crop", work / "configs-frames"
    for d, crop in ((crop_dir, args.crop_seconds), (frames_dir, 1000.0)):
        d.mkdir(exist_ok=True)
        (d / fid.TRAIN_YAML).write_text(json.dumps({**train_doc, "crop_audio_length": crop}, indent=1))
    (work / "enc" / "fidelity_variants.py").write_text(VARIANTS_SOURCE)
    fid.ENCODER_MODULE = "fidelity_variants"  # run_reference names the class as <module>.<class>
    os.environ["XARES_FID_CROP_SECONDS"] = str(args.crop_seconds)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = {w.strip() for w in args.points.split(",")}
    jobs = []
    for point, rows in POINTS.items():
        if point.split()[0] not in wanted:
            continue
        for label, as_is, variant, setting in rows:
            for s in seeds:
                a_cfg = (crop_dir / fid.TRAIN_YAML, cfgs[1]) if setting else cfgs
                v_cfg = (frames_dir / fid.TRAIN_YAML, cfgs[1]) if setting else cfgs
                jobs.append((point, label, "as is", as_is, s, a_cfg))
                jobs.append((point, label, "variant", variant, s, v_cfg))
    ref_args = argparse.Namespace(reference_python=args.reference_python, reference_src=args.reference_src)
    root = work / "variants"
    results: dict = {}
    t0 = time.perf_counter()

    def one(job):
        point, label, kind, cls, s, c = job
        tag = "crop" if c[0].parent != cfgs[0].parent else "base"
        run_dir = (tag == "base" and _run_py_dir(work, cls, s, fid, cfgs, decoder, steps)) or \
            root / f"{steps}" / f"{cls}-{tag}-seed{s}"
        try:
            return job, fid.run_reference(ref_args, work, cls, s, c, decoder, steps, run_dir)
        except Exception as e:  # noqa: BLE001 - one failed run is reported, the rest goes on
            print(f"variants: {point} {label} {kind} seed {s} failed: {str(e)[:2000]}", flush=True)
            return job, None

    print(f"variants: {len(jobs)} reference runs, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (point, label, kind, cls, s, _), res in pool.map(one, jobs):
            if res is not None:
                results.setdefault(point, {}).setdefault(label, {}).setdefault(kind, {})[s] = {
                    k: v["score"] for k, v in res.items() if not k.startswith("_")}
    spread = _seed_spread(work)
    lines = [f"# Points 5, 8, 9 on the reference itself ({steps} steps, seeds {args.seeds}, "
             f"{time.perf_counter() - t0:.0f} s)", "",
             "| point | encoder | task | as is | variant (ours) | variant - as is | reference seed spread (run.py) |",
             "|---|---|---|---|---|---|---|"]
    for point, by_label in results.items():
        for label, kinds in by_label.items():
            if "as is" not in kinds or "variant" not in kinds:
                continue
            common = sorted(set(kinds["as is"]) & set(kinds["variant"]))
            tasks = sorted(kinds["as is"][common[0]]) if common else []
            for t in tasks:
                a = statistics.mean(kinds["as is"][s][t] for s in common)
                v = statistics.mean(kinds["variant"][s][t] for s in common)
                sp = spread.get(t)
                lines.append(f"| {point} | {label} | {t} | {a:.3f} | {v:.3f} | {v - a:+.3f} | "
                             f"{'' if sp is None else f'{sp:.3f}'} |")
    (work / "variants.json").write_text(json.dumps({"args": vars(args) | {"work": str(work)}, "results": {
        p: {lab: {k: {str(s): sc for s, sc in d.items()} for k, d in kinds.items()} for lab, kinds in by.items()}
        for p, by in results.items()}, "seed_spread": spread}, indent=1, default=str))
    (work / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _run_py_dir(work: Path, cls: str, seed: int, fid, cfgs, decoder: Path, steps: int) -> Path | None:
    """run.py's finished reference run of this class and seed with the same configs, if there is one."""
    root = work / "reference" / fid.reference_key(cfgs, decoder, steps)
    for score in root.glob(f"*-seed{seed}/{Path(fid.TRAIN_YAML).stem}/{cls}/score_eval_pitch.yaml"):
        if all((score.parent / f"score_eval_{t}.yaml").is_file() for t in fid.TASKS):
            return score.parents[2]
    return None


def _seed_spread(work: Path) -> dict:
    """The reference's max - min over seeds per task, averaged over encoders, from run.py's fidelity.json."""
    path = work / "fidelity.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    per_task: dict[str, list[float]] = {}
    for row in doc.get("rows", []):
        ref = row.get("reference") or {}
        if ref.get("range") is not None:
            per_task.setdefault(row["task"], []).append(ref["range"])
    return {t: statistics.mean(v) for t, v in per_task.items()}


if __name__ == "__main__":
    sys.exit(main())
