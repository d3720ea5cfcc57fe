"""CPU speed of this engine side by side with the real XARES-LLM reference (xiaomi-research/xares-llm).

Both sides get the same work: the same webdataset shards (``<key>.wav`` 16 kHz PCM + ``<key>.json``
with a ``label``), the same frozen encoder (a log-mel module written here, plugged into the reference
through its own encoder interface) and the same decoder folder (SmolLM2-135M's architecture with random
weights, and a tiny Llama), passed to the reference by local path instead of the hub name.

* The reference runs as itself, in its own virtual environment (``benchmarks/setup_reference.sh``),
  through its own CLI ``python -m xares_llm.run <encoder> <train.yaml> <eval.yaml> --args {...}`` with
  its defaults except ``max_steps``, ``logging_steps=1``, ``output_dir`` and ``decoder_model_name``
  (the local folder). Its stdout is stamped line
  by line on arrival: training steps/s come from the per-step log lines (first to last step, so model
  load, data-loader start-up and the first step are excluded); generation samples/s from the
  ``Starting evaluation`` line to the score line (its eval data loader, ``Trainer.predict`` with stock
  ``generate``, 150 new tokens, repetition penalty 1.05, and the metric).
* Ours runs in this process at its defaults (no thread override): the shards are read once, features
  extracted once by the same encoder (timed separately: the feature store's one-off cost), then
  ``evaluator.training.train`` (steps/s from its per-step log records, same method, ``log_every=1``)
  and ``evaluator.generation.generate`` (whole call timed, on the same test clips).

SmolLM2's random weights do not learn to emit EOS in these few steps, so both sides generate all 150
tokens; the tiny decoder does learn to stop at once within ~100 steps, so its generation row measures
one-token answers (per-batch overheads). The table shows the mean new tokens per sample on each side
as a check that the work was the same. ``--busy N`` keeps N extra
processes spinning on the CPU for the whole measurement ("a busy machine"); they stop when the
benchmark ends, or at a hard time limit.

    python benchmarks/setup_reference.sh /path/to/xares-llm           # once: builds /tmp/xares-ref-venv
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_reference.py --quick \\
        --reference-python /tmp/xares-ref-venv/bin/python --reference-src /tmp/xares-llm-src
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_reference.py --quick --busy 2   # env vars below

The reference is located by ``--reference-python`` / ``--reference-src`` (or ``XARES_REF_PYTHON`` /
``XARES_REF_SRC``); without them the script says so on one line and exits 2.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import importlib.util
import io
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# our side waits as `xares-eval` would (evaluator.cores.settle_openmp, read once when torch loads):
# passive beside busy processes (--busy N, started after the imports), the OpenMP default otherwise; the
# reference's process gets the environment it would have had without us (see run_reference)
_OUR_OMP = "OMP_WAIT_POLICY" not in os.environ
_argv = " ".join(sys.argv[1:]).replace("=", " ").split()
if "--busy" in _argv and _argv[_argv.index("--busy") + 1 :][:1] not in (["0"], []):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluator.data.shards import read_shard, write_shard  # noqa: E402
from evaluator.features import ArrayDataset  # noqa: E402
from evaluator.generation import DecodingOptions, generate  # noqa: E402
from evaluator.model import ModelConfig, build_model  # noqa: E402
from evaluator.smoke_decoder import build_smoke_decoder, build_smollm2_shaped  # noqa: E402
from evaluator.training import TrainConfig, train  # noqa: E402

SAMPLE_RATE = 16_000
PROMPT = "Classify the sound."
LABEL_KEY = "label"
TEXTS = ["a dog barks", "rain falls on the roof", "a cat meows", "the bell rings twice", "speech", "music"]
ENCODER_CLASS = "BenchLogMelEncoder"
EVAL_NAME = "eval_bench"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REF_STEP_LINE = re.compile(r"(^|[\s,])loss = .*grad_norm = ")  # LoguruMetricsCallback, one per logged step

# The encoder both sides use (benchmarks/bench_encoder.py, also bench_engine.py's), written into the work
# folder: the reference imports it by module path
# (its encoder interface: forward(audio, audio_attention_mask) -> (features [B, T, D], mask), output_dim),
# this process imports the same file to extract features once. Fixed seed: identical weights on both sides.
ENCODER_SOURCE = (Path(__file__).resolve().parent / "bench_encoder.py").read_text()

# Launches the reference's own CLI. On a CPU-only torch the PyPI torchaudio/torchcodec wheels cannot load
# their native libraries (built against CUDA torch), and xares_llm imports torchaudio at module level.
# Only then, and only in this process's memory (nothing on disk changes), it: stubs the module
# torchaudio._extension (the native-library loader) so the rest of the real torchaudio imports,
# real torchaudio.functional.resample included; and, if torchaudio.load still cannot decode (it goes
# through torchcodec), replaces torchaudio.load with a 16-bit PCM wav reader with the same contract
# (float32 [channels, time] in [-1, 1], sample rate). Every patch is announced on stdout.
LAUNCHER_SOURCE = '''\
import atexit, os, runpy, sys, tempfile, types, wave


def say(msg):
    print(f"[bench-launcher] {msg}", flush=True)


def load_pcm_wav(uri, *args, **kwargs):
    import numpy as np
    import torch
    with wave.open(os.fspath(uri), "rb") as w:
        width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise RuntimeError("the benchmark's torchaudio.load stand-in reads 16-bit PCM wav only")
    x = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).T.astype(np.float32) / 32768.0
    return torch.from_numpy(np.ascontiguousarray(x)), rate


def import_torchaudio():
    try:
        import torchaudio
        return torchaudio
    except (OSError, ImportError) as e:
        say(f"PATCH torchaudio native extension not loadable ({str(e)[:120]}); stubbing torchaudio._extension")
    for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
        del sys.modules[name]
    stub = types.ModuleType("torchaudio._extension")
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub._IS_ALIGN_AVAILABLE = False
    stub._load_lib = lambda name: False

    def fail_if_no_align(func):
        def fail(*a, **k):
            raise RuntimeError("torchaudio alignment needs the native extension")
        return fail

    stub.fail_if_no_align = fail_if_no_align
    sys.modules["torchaudio._extension"] = stub
    import torchaudio
    return torchaudio


def check_load(torchaudio):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe.wav")
        with wave.open(path, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(bytes(320))
        try:
            torchaudio.load(path)
        except Exception as e:
            say(f"PATCH torchaudio.load fails ({type(e).__name__}: {str(e)[:120]}); using a 16-bit PCM wav reader")
            torchaudio.load = load_pcm_wav


def count_new_tokens():
    """Read-only observer: new tokens per row of every generate call (inputs_embeds in: only new tokens out)."""
    from transformers.generation.utils import GenerationMixin
    original, rows = GenerationMixin.generate, []

    def generate(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seqs = getattr(out, "sequences", out)
        rows.extend([seqs.shape[-1]] * seqs.shape[0])
        return out

    GenerationMixin.generate = generate
    atexit.register(lambda: rows and say(f"generated {sum(rows) / len(rows):.1f} new tokens per row, {len(rows)} rows"))


ta = import_torchaudio()
check_load(ta)
import torch
say(f"torch {torch.__version__}, torchaudio {ta.__version__}, threads at start {torch.get_num_threads()}")
atexit.register(lambda: say(f"torch threads at exit {torch.get_num_threads()}"))
count_new_tokens()
sys.argv = ["xares_llm.run", *sys.argv[1:]]
runpy.run_module("xares_llm.run", run_name="__main__", alter_sys=True)
'''

# A busy-machine load: one pure-Python spin loop per process, ending at a deadline or when its parent
# is gone (so a killed benchmark leaves nothing behind).
BURNER_SOURCE = """\
import os, sys, time
deadline, parent = float(sys.argv[1]), int(sys.argv[2])
x = 0
while time.time() < deadline and os.getppid() == parent:
    for _ in range(200000):
        x = (x * 31 + 7) % 1000003
"""


@dataclass
class Side:
    """Figures of one side for one decoder."""

    train_steps_per_s: float = float("nan")
    gen_samples_per_s: float = float("nan")
    gen_tokens: float = float("nan")  # mean new tokens generated per sample (the work check)
    train_load: float = float("nan")  # cores used by other processes while training was timed
    gen_load: float = float("nan")  # the same while generation was timed
    notes: list[str] = field(default_factory=list)


# --- machine load --------------------------------------------------------------------------------
class ForeignLoad:
    """Cores kept busy by other processes (not this one nor its children), sampled every second.

    The figures are only as "idle" or "busy" as the machine really was: this says how much other work
    (another user's tests, a build) shared the CPU during each timed phase. Needs psutil; else a no-op.
    """

    def __init__(self, interval: float = 1.0):
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil, self.interval = psutil, interval
        self.samples: list[tuple[float, float]] = []  # (perf_counter, others' cores over the last interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def _ours(self) -> float:
        me = self.psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                c = proc.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
            except self.psutil.Error:  # exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        last = (time.perf_counter(), self._busy(), self._ours())
        while not self._stop.wait(self.interval):
            now = (time.perf_counter(), self._busy(), self._ours())
            cores = ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
            self.samples.append((now[0], max(0.0, cores)))
            last = now

    def between(self, t0: float, t1: float) -> float:
        """Mean cores used by others from t0 to t1 (perf_counter); NaN without psutil or samples."""
        if self.psutil is None:
            return float("nan")
        chosen = [c for t, c in self.samples if t0 <= t <= t1 + self.interval]
        return statistics.fmean(chosen) if chosen else float("nan")

    def wait_quiet(self, max_s: float, threshold: float = 0.25) -> None:
        """Wait up to max_s for 3 s in a row with others under ``threshold`` cores (for idle figures)."""
        if self.psutil is None or max_s <= 0:
            return
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_s:
            recent = [c for t, c in self.samples if t > time.perf_counter() - 3.5]
            if len(recent) >= 3 and max(recent) < threshold:
                return
            time.sleep(self.interval)
        print(f"  the machine did not go quiet within {max_s:.0f} s; measuring anyway", file=sys.stderr)

    def stop(self) -> None:
        if self.psutil is not None:
            self._stop.set()


# --- the shared work -----------------------------------------------------------------------------
def pcm_wav(wave_f32: np.ndarray) -> bytes:
    """16-bit PCM mono wav at 16 kHz: needs no resampling and decodes without FFmpeg on either side."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(wave_f32, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def make_shards(folder: Path, split: str, n: int, seed: int, per_shard: int = 16) -> list[Path]:
    """Write ``n`` 1-5 s clips with short labels as ``<split>_NNNN.tar.gz`` shards."""
    rng = np.random.default_rng(seed)
    members: list[tuple[str, bytes]] = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 5.0))
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        sig = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.normal(size=t.shape)
        key = f"{split}{i:05d}"
        members += [(f"{key}.wav", pcm_wav(sig.astype(np.float32))),
                    (f"{key}.json", json.dumps({LABEL_KEY: TEXTS[i % len(TEXTS)]}).encode())]
    paths = []
    for s, start in enumerate(range(0, len(members), 2 * per_shard)):
        paths.append(write_shard(folder / f"{split}_{s:04d}.tar.gz", members[start : start + 2 * per_shard]))
    return paths


def write_configs(work: Path, train_shards: list[Path], test_shards: list[Path], args) -> tuple[Path, Path]:
    """The reference's custom-data YAMLs (its README's format); JSON is valid YAML."""
    train_cfg = {"train_data": {"Bench": {"prompt": PROMPT, "data": [str(p) for p in train_shards],
                                          "key": LABEL_KEY}},
                 "num_training_workers": args.ref_train_workers}
    eval_cfg = {EVAL_NAME: {"data": {"data": [str(p) for p in test_shards], "key": LABEL_KEY, "prompt": PROMPT},
                            "batch_size": args.ref_eval_batch, "num_workers": args.ref_eval_workers,
                            "metric": "Accuracy"}}
    (work / "bench_train.yaml").write_text(json.dumps(train_cfg, indent=1))
    (work / "bench_eval.yaml").write_text(json.dumps(eval_cfg, indent=1))
    return work / "bench_train.yaml", work / "bench_eval.yaml"


def portable_decoder(folder: Path) -> Path:
    """Let the reference's pinned transformers 4.x read a folder saved by 5.x (both sides then load it).

    Adds the 4.x spellings next to the 5.x ones: ``tokenizer_class`` PreTrainedTokenizerFast (5.x wrote
    TokenizersBackend, unknown to 4.x) and a top-level ``rope_theta`` (5.x nests it in rope_parameters;
    4.x would silently fall back to 10000). Weights and vocabulary are untouched.
    """
    tok, cfg = folder / "tokenizer_config.json", folder / "config.json"
    t = json.loads(tok.read_text())
    t["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.write_text(json.dumps(t, indent=2))
    c = json.loads(cfg.read_text())
    if "rope_theta" not in c and "rope_theta" in (c.get("rope_parameters") or {}):
        c["rope_theta"] = c["rope_parameters"]["rope_theta"]
    cfg.write_text(json.dumps(c, indent=2))
    return folder


def load_encoder(path: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("bench_encoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, ENCODER_CLASS)().eval()


def read_clips(shards: list[Path]) -> list:
    return [clip for p in shards for clip in read_shard(p, keys=(LABEL_KEY,))]


def rate_between(stamps: list[float]) -> float:
    """Events per second from the first to the last stamp (the first event's own time excluded)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) >= 2 and stamps[-1] > stamps[0] \
        else float("nan")


# --- the reference -------------------------------------------------------------------------------
def run_reference(name: str, decoder: Path, work: Path, cfgs: tuple[Path, Path], steps: int, n_test: int,
                  args, load: ForeignLoad) -> Side:
    """Run xares_llm.run in the reference's venv; stamp its stdout lines to time steps and evaluation."""
    out = work / f"ref-{name}"
    overrides = {"max_steps": steps, "logging_steps": 1, "output_dir": str(out), "decoder_model_name": str(decoder)}
    cmd = [args.reference_python, str(work / "ref_launcher.py"), f"bench_encoder.{ENCODER_CLASS}",
           str(cfgs[0]), str(cfgs[1]), "--args", json.dumps(overrides)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(args.reference_src) / "src"), str(work / "enc")]),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               XARES_DATA_HOME=str(work / "xares_data"), NO_COLOR="1")
    if _OUR_OMP:
        env.pop("OMP_WAIT_POLICY", None)
    log_path = work / f"ref-{name}.log"
    side, step_stamps, eval_start, eval_end, gen_tokens = Side(), [], None, None, float("nan")
    t0 = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for raw in proc.stdout:
            now = time.perf_counter()
            line = ANSI.sub("", raw.rstrip("\n"))
            log.write(f"{now - t0:9.3f} {line}\n")
            if REF_STEP_LINE.search(line):
                step_stamps.append(now)
            elif "Starting evaluation" in line:
                eval_start = now
            elif eval_start is not None and eval_end is None and f"{EVAL_NAME}: [" in line:
                eval_end = now
            if m := re.match(r"\[bench-launcher\] generated ([\d.]+) new tokens per row", line):
                gen_tokens = float(m.group(1))
            elif line.startswith("[bench-launcher]"):
                side.notes.append(line.removeprefix("[bench-launcher] "))
                print(f"  [{name}] reference: {line.removeprefix('[bench-launcher] ')}", file=sys.stderr)
    if proc.returncode != 0 or eval_end is None:
        tail = log_path.read_text().splitlines()[-25:]
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail))
    if len(step_stamps) != steps:
        side.notes.append(f"saw {len(step_stamps)} step log lines for {steps} steps")
    side.train_steps_per_s = rate_between(step_stamps)
    side.gen_samples_per_s = n_test / (eval_end - eval_start)
    side.gen_tokens = gen_tokens
    side.train_load = load.between(step_stamps[0], step_stamps[-1]) if step_stamps else float("nan")
    side.gen_load = load.between(eval_start, eval_end)
    preds = sorted(out.rglob(f"predictions_{EVAL_NAME}.csv"))
    if preds:
        with open(preds[0], newline="") as fh:
            side.notes.append(f"{sum(1 for _ in csv.DictReader(fh))} predictions written")
    side.notes.append(f"reference wall time {time.perf_counter() - t0:.0f} s (load, {steps} steps, eval)")
    return side


# --- this engine ---------------------------------------------------------------------------------
class _StepStamps(logging.Handler):
    """Stamps evaluator.training's per-step log records (log_every=1) on arrival."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stamps: list[float] = []

    def emit(self, record):
        if re.match(r"step \d+/\d+", record.getMessage()):
            self.stamps.append(time.perf_counter())


def run_ours(name: str, decoder: Path, work: Path, encoder, train_clips, test_clips, steps: int,
             load: ForeignLoad, threads: int | None = None) -> Side:
    """Features once (timed apart), then train() and generate() at this engine's defaults.

    ``threads`` None keeps our default (all cores); a number is a diagnostic override for both calls.
    """
    side = Side()
    t = time.perf_counter()
    with torch.no_grad():
        def feats(clips):
            return [encoder(torch.from_numpy(c.audio)[None], None)[0][0].numpy().astype(np.float16) for c in clips]
        train_set = ArrayDataset("bench", PROMPT, feats(train_clips), [c.targets for c in train_clips])
        test_set = ArrayDataset("bench", PROMPT, feats(test_clips), [c.targets for c in test_clips])
    seconds = time.perf_counter() - t
    side.notes.append(f"features extracted once: {len(train_clips) + len(test_clips)} clips in {seconds:.1f} s "
                      f"(not in the timings, as the feature store does)")
    model = build_model(ModelConfig(encoder_dim=encoder.output_dim, decoder=str(decoder)))
    handler, train_log = _StepStamps(), logging.getLogger("evaluator.training")
    level, propagate = train_log.level, train_log.propagate
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False  # stamped here, not printed
    try:
        result = train(model, [train_set], [1.0], TrainConfig(max_steps=steps, log_every=1, threads=threads), work / f"ours-{name}",
                       progress=False)
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(level)
        train_log.propagate = propagate
    side.train_steps_per_s = rate_between(handler.stamps)
    (work / f"ours-{name}-step-seconds.txt").write_text(" ".join(f"{d:.3f}" for d in np.diff(handler.stamps)) + "\n")
    side.train_load = load.between(handler.stamps[0], handler.stamps[-1]) if handler.stamps else float("nan")
    if len(handler.stamps) != steps:  # the log format changed: fall back to the whole call
        side.notes.append(f"saw {len(handler.stamps)} step records; training timed as the whole train() call")
        side.train_steps_per_s = result.steps / result.seconds
    lengths, decode = [], model.decode  # counts the tokens of every answer (a wrapper on this instance only)
    model.decode = lambda ids: (lengths.append(len(ids)), decode(ids))[1]
    t = time.perf_counter()
    generate(model, test_set, DecodingOptions(threads=threads), progress=False)
    side.gen_samples_per_s = len(test_set) / (time.perf_counter() - t)
    side.gen_load = load.between(t, time.perf_counter())
    model.decode = decode
    side.gen_tokens = statistics.fmean(lengths) if lengths else float("nan")
    side.notes.append(f"torch threads {torch.get_num_threads()} ({threads or 'default'}), generation batch "
                      f"{DecodingOptions().batch_size or 'auto'}")
    return side


# --- busy machine --------------------------------------------------------------------------------
def start_burners(n: int, limit_s: float) -> list[subprocess.Popen]:
    """N spinning processes; stopped at exit (atexit + caller's finally) or by themselves at the limit."""
    deadline = time.time() + limit_s
    procs = [subprocess.Popen([sys.executable, "-c", BURNER_SOURCE, str(deadline), str(os.getpid())])
             for _ in range(n)]
    atexit.register(stop_burners, procs)
    return procs


def stop_burners(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


# --- main ----------------------------------------------------------------------------------------
def reference_commit(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown commit"
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"


def fmt(x: float, spec: str = ".3g") -> str:
    return "n/a" if not np.isfinite(x) else format(x, spec)


def add_reference_args(parser: argparse.ArgumentParser) -> None:
    """--reference-python and --reference-src, as every benchmark that runs the reference takes them."""
    parser.add_argument("--reference-python", default=os.environ.get("XARES_REF_PYTHON"),
                        help="python of the reference's venv (env XARES_REF_PYTHON), e.g. /tmp/xares-ref-venv/bin/python")
    parser.add_argument("--reference-src", default=os.environ.get("XARES_REF_SRC"),
                        help="checkout of xiaomi-research/xares-llm (env XARES_REF_SRC), e.g. /tmp/xares-llm-src")


def reference_found(args: argparse.Namespace, tool: str) -> bool:
    """Whether --reference-python/--reference-src name a usable reference; says why on one line if not."""
    py, src = args.reference_python, args.reference_src
    if py and Path(py).is_file() and src and (Path(src) / "src/xares_llm/run.py").is_file():
        return True
    print(f"{tool}: reference not found (--reference-python {py!r}, --reference-src {src!r}); "
          "build it with benchmarks/setup_reference.sh", file=sys.stderr)
    return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_reference_args(p)
    p.add_argument("--decoders", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    p.add_argument("--quick", action="store_true",
                   help="32/128 steps (smollm2/tiny), 64 training and 32 test clips: ~8 minutes on 2 idle cores")
    p.add_argument("--train-steps", type=int, default=64,
                   help="training steps per side, smollm2 (a multiple of 32: whole 128-example sort buffers)")
    p.add_argument("--tiny-train-steps", type=int, default=256, help="training steps per side, tiny")
    p.add_argument("--train-clips", type=int, default=128, help="training clips (1-5 s each)")
    p.add_argument("--test-clips", type=int, default=64,
                   help="clips generated for, per side, smollm2 (a multiple of 32: our CPU batch)")
    p.add_argument("--tiny-test-clips", type=int, default=128, help="clips generated for, per side, tiny")
    p.add_argument("--ref-eval-batch", type=int, default=4,
                   help="the reference's eval batch_size (its README's custom-data example and most tasks: 4)")
    p.add_argument("--ref-eval-workers", type=int, default=0, help="the reference's eval num_workers")
    p.add_argument("--ref-train-workers", type=int, default=4,
                   help="the reference's num_training_workers (its README example and most shipped configs: 4)")
    p.add_argument("--busy", type=int, default=0, help="CPU-burning background processes during the run")
    p.add_argument("--busy-limit", type=float, default=3600, help="hard time limit of the burners, seconds")
    p.add_argument("--wait-idle", type=float, default=0,
                   help="before each side, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--ours-threads", type=int, help="diagnostic: override our torch threads (default: ours)")
    p.add_argument("--keep", type=Path, help="work folder to keep (shards, YAMLs, logs); default: a temp dir")
    if p.parse_known_args(argv)[0].quick:  # --quick sizes; options given explicitly still win
        p.set_defaults(train_steps=32, tiny_train_steps=128, train_clips=64, test_clips=32, tiny_test_clips=32)
    args = p.parse_args(argv)
    if not reference_found(args, "bench_reference"):
        return 2
    logging.basicConfig(level=logging.WARNING)
    load = ForeignLoad()
    burners = start_burners(args.busy, args.busy_limit) if args.busy else []
    t_start = time.perf_counter()
    rows, notes = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep or Path(tmp)
            (work / "enc").mkdir(parents=True, exist_ok=True)
            (work / "enc" / "bench_encoder.py").write_text(ENCODER_SOURCE)
            (work / "ref_launcher.py").write_text(LAUNCHER_SOURCE)
            encoder = load_encoder(work / "enc" / "bench_encoder.py")
            train_shards = make_shards(work / "shards", "train", args.train_clips, seed=0)
            train_clips = read_clips(train_shards)
            for name in args.decoders.split(","):
                if name == "tiny":
                    decoder = build_smoke_decoder(TEXTS, work / "tiny", steps=0, hidden_size=96, threads=1)
                    steps, m = args.tiny_train_steps, args.tiny_test_clips
                elif name == "smollm2":
                    decoder = build_smollm2_shaped(work / "smollm2")
                    steps, m = args.train_steps, args.test_clips
                else:
                    p.error(f"unknown decoder {name!r}")
                decoder = portable_decoder(decoder)
                test_shards = make_shards(work / f"test-{name}", "test", m, seed=1)
                test_clips = read_clips(test_shards)
                (work / f"cfg-{name}").mkdir(exist_ok=True)
                cfgs = write_configs(work / f"cfg-{name}", train_shards, test_shards, args)

                print(f"[{name}] reference: {steps} steps, {m} clips ...", file=sys.stderr, flush=True)
                load.wait_quiet(args.wait_idle)
                ref = run_reference(name, decoder, work, cfgs, steps, m, args, load)
                print(f"[{name}] ours: {steps} steps, {m} clips ...", file=sys.stderr, flush=True)
                load.wait_quiet(args.wait_idle)
                ours = run_ours(name, decoder, work, encoder, train_clips, test_clips, steps, load,
                                args.ours_threads)
                for side, who in ((ref, "reference"), (ours, "ours")):
                    notes += [f"{name}, {who}: {n}" for n in side.notes if not n.startswith("PATCH")]
                    notes += [f"reference: {n}" for n in side.notes if n.startswith("PATCH") and
                              f"reference: {n}" not in notes]
                rows.append((name, f"training, {steps} steps, batch 4", ref.train_steps_per_s,
                             ours.train_steps_per_s, "steps/s", "", (ref.train_load, ours.train_load)))
                rows.append((name, f"generation, {m} clips, batch {args.ref_eval_batch} vs "
                             f"{DecodingOptions().batch_size or 'auto'}", ref.gen_samples_per_s,
                             ours.gen_samples_per_s, "samples/s", f"{fmt(ref.gen_tokens, '.0f')} / "
                             f"{fmt(ours.gen_tokens, '.0f')}", (ref.gen_load, ours.gen_load)))
    finally:
        stop_burners(burners)
        load.stop()

    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}; busy: {args.busy} spinning processes; "
          f"reference: xares-llm {reference_commit(Path(args.reference_src))} through its CLI (1 torch thread by its default); "
          f"ours: defaults (fp32, {args.ours_threads or 'all'} cores); {time.perf_counter() - t_start:.0f} s in all\n")
    print("| decoder | measure | reference | ours | ratio | new tokens/sample ref / ours | other load (cores) ref / ours |")
    print("|---|---|---|---|---|---|---|")
    for name, what, ref, ours, unit, tokens, (load_r, load_o) in rows:
        print(f"| {name} | {what} | {fmt(ref)} {unit} | {fmt(ours)} {unit} | {fmt(ours / ref, '.2f')}x | {tokens} "
              f"| {fmt(load_r, '.2f')} / {fmt(load_o, '.2f')} |")
    print()
    for n in notes:
        print(f"- {n}")
    return 0 if all(np.isfinite([r[2] for r in rows] + [r[3] for r in rows])) else 1


if __name__ == "__main__":
    sys.exit(main())
