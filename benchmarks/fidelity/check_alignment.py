"""Check sample alignment and decoding against the real reference, run in its own venv.

1. ``ref_index``: does each of our test samples land on the row XARES-LLM gives it?

Writes a few shards (clips of varied length, one to three captions each, some corrupt), computes our
``evaluator.data.reference_order.reference_eval_order`` for them, then runs the reference's own evaluation
loader (``AudioTextTokenWebdataset(training=False, sort_by_length=256)``, what ``evaluate_mlp`` builds) in
its virtual environment and records the (member key, text) of every sample in the order it yields them.
The check passes when every (clip, text) of ours sits at its ``ref_index`` row.

2. Text: the same token ids (answers of a random decoder: odd tokens, special tokens, byte fragments, EOS
and padding) decoded by the reference's ``TokenDecoder`` (transformers 4.x) and by our ``AudioLLM.decode``
(transformers 5.x) with the same tokenizer folder; and the target/prompt ids both build for the same texts.

Nothing of the reference is copied: it runs as installed in its venv (``benchmarks/setup_reference.sh``).

    .venv/bin/python benchmarks/fidelity/check_alignment.py --reference-python /tmp/xares-ref-venv/bin/python \\
        --reference-src /tmp/xares-llm-src
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_reference import LAUNCHER_SOURCE, add_reference_args, portable_decoder, reference_found  # noqa: E402

from evaluator.data import iter_clips, load_xares_yaml, write_shard  # noqa: E402
from evaluator.data.reference_order import EvalSample, reference_eval_order  # noqa: E402
from evaluator.smoke_decoder import build_smoke_decoder  # noqa: E402

PROMPT = "Describe the sound."
WORDS = ["a dog barks", "rain falls", "a bell rings", "wind blows", "a cat meows", "cars pass by"]

# Runs in the reference's venv: its loader, our collate function only to read out key and text.
CHILD = LAUNCHER_SOURCE.split("ta = import_torchaudio()")[0] + '''
ta = import_torchaudio()
check_load(ta)
import json, sys
from transformers import AutoTokenizer
from xares_llm.audiowebdataset import AudioTextDataType, AudioTextTokenWebdataset
cfg = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(cfg["decoder"])
data = AudioTextDataType(data=cfg["shards"], prompt=cfg["prompt"], key=cfg["key"], name="eval_check")
loader = AudioTextTokenWebdataset(data_urls=data, tokenizer=tok, training=False, batch_size=4,
                                  sort_by_length=256, num_workers=0)
rows = []
for batch in loader.create_dataloader(collate_fn=lambda samples: [(s["filename"], s["text"]) for s in samples]):
    rows.extend(batch)
print("ROWS " + json.dumps(rows))
# decoding: the reference's TokenDecoder over padded id rows (-100 where Trainer.predict pads)
import numpy as np
from transformers import EvalPrediction
from xares_llm.metrics import TokenDecoder
ids = cfg["ids"]
width = max(len(r) for r in ids)
pred = np.full((len(ids), width), -100, dtype=np.int64)
for i, r in enumerate(ids):
    pred[i, : len(r)] = r
decoded, _ = TokenDecoder(tok).decode_predictions(EvalPrediction(predictions=pred, label_ids=pred.copy()))
print("DECODED " + json.dumps(decoded))
# training inputs: prompt ids and target ids + EOS as its pipeline builds them
print("TOKENS " + json.dumps([[tok(p)["input_ids"], tok(t + tok.eos_token)["input_ids"]] for p, t in cfg["texts"]]))
'''


def wav(seconds: float, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def make_shards(folder: Path, shards: int, per_shard: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            k = f"clip{s:02d}_{i:03d}"
            texts = [str(rng.choice(WORDS)) + f" {j}" for j in range(int(rng.integers(1, 4)))]
            if rng.random() < 0.1:
                texts.append("!!! ??? ...")  # corrupt: dropped by both
            seconds = float(rng.choice([0.5, 1.0, 1.5, 2.0, 2.5]))  # ties on purpose: stability matters
            members += [(f"{k}.wav", wav(seconds, rng)), (f"{k}.json", json.dumps({"captions": texts}).encode())]
        paths.append(write_shard(folder / f"check_{s:03d}.tar", members))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_reference_args(ap)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--per-shard", type=int, default=70)  # 5 x 70 clips x ~2 texts: several 256-sample buffers
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not reference_found(args, "check_alignment"):
        return 2
    with tempfile.TemporaryDirectory(prefix="xares-order-") as tmp:
        work = Path(tmp)
        paths = make_shards(work / "data", args.shards, args.per_shard, args.seed)
        decoder = portable_decoder(build_smoke_decoder(WORDS, work / "decoder", steps=0, hidden_size=32))
        eval_yaml = work / "eval.yaml"
        eval_yaml.write_text(json.dumps({"eval_check": {"data": {"data": [str(p) for p in paths], "key": "captions",
                                                                  "prompt": PROMPT}, "metric": "Accuracy"}}))
        task = load_xares_yaml(None, eval_yaml).task("check")
        clips = list(iter_clips(task, "test", download=False))
        from transformers import AutoTokenizer

        prompt_tokens = len(AutoTokenizer.from_pretrained(str(decoder))(PROMPT)["input_ids"])
        ours = reference_eval_order(task, [EvalSample(c.key.rsplit("/", 1)[0], len(c.targets), prompt_tokens,
                                                      len(c.audio) / 16000) for c in clips])
        from evaluator.model import ModelConfig, build_model

        model = build_model(ModelConfig(encoder_dim=4, decoder=str(decoder)))
        rng = np.random.default_rng(args.seed)
        vocab = len(model.tokenizer)
        ids = [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(200)]
        ids += [[model.eos_token_id] * 3, model.target_ids("a dog barks") + [model.eos_token_id] * 4, []]
        texts = [(PROMPT, w) for w in WORDS] + [("", "Ünïcode – text, with punctuation!"), ("Say it.", "")]
        cfg = {"decoder": str(decoder), "shards": [str(p) for p in paths], "prompt": PROMPT, "key": "captions",
               "ids": ids, "texts": texts}
        (work / "child.py").write_text(CHILD)
        env = dict(os.environ, PYTHONPATH=str(Path(args.reference_src) / "src"), HF_HUB_OFFLINE="1",
                   XARES_DATA_HOME=str(work / "cache"))
        out = subprocess.run([args.reference_python, str(work / "child.py"), json.dumps(cfg)], env=env,
                             capture_output=True, text=True, timeout=600)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")), None)
        if out.returncode != 0 or line is None:
            print(f"check_alignment: the reference's loader failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
            return 1
        ref = [tuple(r) for r in json.loads(line[5:])]
        decoded = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("DECODED "))[8:])
        tokens = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("TOKENS "))[7:])
        # ours stops at the first EOS (generation does); the reference's rows end there too (padding)
        ours_text = [model.decode(r[: r.index(model.eos_token_id)] if model.eos_token_id in r else r) for r in ids]
        ref_text = decoded
        # a random row may hold EOS mid-way: the reference then decodes what follows (generation never would)
        comparable = [i for i, r in enumerate(ids) if model.eos_token_id not in r[:-1] or r[-1] == model.eos_token_id]
        text_diff = [(ids[i], ours_text[i], ref_text[i]) for i in comparable if ours_text[i] != ref_text[i]]
        token_diff = [(p, t) for (p, t), (rp, rt) in zip(texts, tokens)
                      if model.prompt_ids(p) != rp or model.target_ids(t) != rt]
    n = sum(len(c.targets) for c in clips)
    wrong = [(c.key, t, r, ref[r] if r < len(ref) else None)
             for c, rows in zip(clips, ours) for t, r in zip(c.targets, rows)
             if r >= len(ref) or ref[r] != (c.key.rsplit("/", 1)[1], t)]
    print(f"check_alignment: {len(clips)} clips, {n} samples (ours), {len(ref)} rows (reference); "
          f"{n - len(wrong)} at their ref_index row, {len(wrong)} misplaced")
    for w in wrong[:10]:
        print(f"  misplaced: {w}")
    print(f"check_alignment: decoding {len(comparable)} id rows: {len(comparable) - len(text_diff)} identical, "
          f"{len(text_diff)} differ; prompt/target ids for {len(texts)} texts: {len(texts) - len(token_diff)} identical")
    for d in (text_diff + token_diff)[:10]:
        print(f"  differs: {d}")
    return 0 if not wrong and n == len(ref) and not text_diff and not token_diff else 1


if __name__ == "__main__":
    sys.exit(main())
