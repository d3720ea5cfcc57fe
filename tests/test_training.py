"""Training: schedule, config checks, sampler, loss goes down, a killed run resumes bit for bit,
and a trained tiny model beats chance on a generated task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluator.errors import ConfigError, DataError
from evaluator.features import ArrayDataset
from evaluator.generation import DecodingOptions, generate
from evaluator.model import ModelConfig, build_model
from evaluator.smoke_decoder import build_smoke_decoder
from evaluator.training import BatchSampler, TrainConfig, learning_rate, train

D = 16
CLASSES = ("a dog barks", "rain falls on the roof", "a cat meows")


class ToyTask(ArrayDataset):
    """Features carry the class id (one-hot * 3) under unit noise; the target is the class text."""

    def __init__(self, n: int, seed: int, task: str = "toy", prompt: str = "Classify the sound."):
        rng = np.random.default_rng(seed)
        self.y = rng.integers(0, 3, n)
        arrays = [(np.eye(D)[c] * 3 + rng.normal(0, 1, (int(rng.integers(3, 12)), D))).astype(np.float16)
                  for c in self.y]
        super().__init__(task, prompt, arrays, [(CLASSES[c],) for c in self.y])


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return build_smoke_decoder(list(CLASSES) * 4, tmp_path_factory.mktemp("dec"), steps=150, hidden_size=64, threads=1)


def _model(decoder_dir):
    return build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir)))


# one thread: the test machine is shared, and oversubscribed OpenMP threads slow down 10x
FAST = dict(warmup_steps=5, learning_rate=1e-3, sort_buffer=16, threads=1, log_every=10)


class TestSchedule:
    def test_phases(self):
        cfg = TrainConfig(max_steps=1000, warmup_steps=200, learning_rate=1e-4)
        assert learning_rate(0, cfg) == 0.0  # HF Trainer: the first step runs at lr 0
        assert learning_rate(100, cfg) == pytest.approx(5e-5)
        assert learning_rate(200, cfg) == pytest.approx(1e-4)
        assert learning_rate(600, cfg) == pytest.approx(5e-5)
        assert learning_rate(1000, cfg) == 0.0

    def test_defaults_are_the_protocol(self):
        cfg = TrainConfig()
        assert (cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay, cfg.max_grad_norm, cfg.batch_size,
                cfg.seed, cfg.precision) == (1e-4, 200, 0.01, 1.0, 4, 42, "fp32")

    @pytest.mark.parametrize("bad", [dict(max_steps=0), dict(precision="fp16"), dict(batch_size=8, sort_buffer=4),
                                     dict(threads=0), dict(crop_frames=0), dict(learning_rate=-1.0),
                                     dict(crop_seconds=0.0)])
    def test_rejects_bad_config(self, bad):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


class TestSampler:
    def test_mixes_by_weight_and_resumes(self, decoder_dir):
        model = _model(decoder_dir)
        a, b = ToyTask(40, 0, task="a"), ToyTask(40, 1, task="b", prompt="Other prompt.")
        cfg = TrainConfig(batch_size=4, sort_buffer=32, crop_frames=6)
        sampler = BatchSampler(model, [a, b], [1, 3], cfg)
        first = [next(sampler) for _ in range(30)]
        prompts = [p for batch in first for p in batch.prompt_ids]
        share_b = sum(p == model.prompt_ids(b.prompt) for p in prompts) / len(prompts)
        assert 0.6 < share_b < 0.9  # weight 3 of 4
        assert max(f.shape[0] for batch in first for f in batch.features) <= 6  # cropped
        # a fresh sampler with the saved state continues with exactly the same batches
        again = BatchSampler(model, [a, b], [1, 3], cfg)
        replay = BatchSampler(model, [a, b], [1, 3], cfg)
        for _ in range(13):
            next(replay)
        again.load_state_dict(replay.state_dict())
        for want in first[13:]:
            got = next(again)
            assert got.target_ids == want.target_ids
            assert all(torch.equal(x, y) for x, y in zip(got.features, want.features))

    def test_the_unit_mixed_is_one_text_not_one_clip(self, decoder_dir):
        # XARES-LLM mixes (clip, text) samples by prob: a task whose clips carry three captions gets its
        # weight's share of samples, not three times it, and every caption is trained on
        model = _model(decoder_dir)
        captions = ArrayDataset("cap", "Caption it.", [np.ones((4, D), np.float32)] * 20,
                                [(f"c{i} one", f"c{i} two", f"c{i} three") for i in range(20)])
        single = ToyTask(20, 0, task="single")
        sampler = BatchSampler(model, [captions, single], [1, 1], TrainConfig(batch_size=4, sort_buffer=32))
        rows = [(p, t) for b in (next(sampler) for _ in range(200)) for p, t in zip(b.prompt_ids, b.target_ids)]
        share = sum(p == model.prompt_ids("Caption it.") for p, _ in rows) / len(rows)
        assert 0.45 < share < 0.55  # per clip it would be 3/4
        texts = {model.tokenizer.decode(t[:-1]) for p, t in rows if p == model.prompt_ids("Caption it.")}
        assert texts == {f"c{i} {w}" for i in range(20) for w in ("one", "two", "three")}

    def test_prompt_lists_and_per_sample_prompts(self, decoder_dir):
        model = _model(decoder_dir)
        drawn = ArrayDataset("listed", ("Classify the sound.", "What is it?"), [np.ones((4, D), np.float32)] * 8,
                             [(CLASSES[0],)] * 8)
        own = ArrayDataset("own", "", [np.ones((4, D), np.float32)] * 8, [(CLASSES[1],)] * 8,
                           prompts=["Name the sound."] * 4 + [None] * 4)
        sampler = BatchSampler(model, [drawn, own], [1, 1], TrainConfig(batch_size=4, sort_buffer=32))
        prompts = [tuple(p) for b in (next(sampler) for _ in range(40)) for p in b.prompt_ids]
        want = {tuple(model.prompt_ids(p)) for p in ("Classify the sound.", "What is it?", "Name the sound.", "")}
        assert set(prompts) == want  # both list prompts drawn, the clip's own prompt, and "" without one

    def test_windowed_fixed_frames_crop_whole_windows_closest_to_the_audio_crop(self, decoder_dir):
        # a fixed-frame encoder gives 4 frames per equal window; the reference crops 30 s of audio
        class Timed(ArrayDataset):
            def seconds(self, i):
                return [30.01, 90.5, 45.0, 20.0][i]

        model = _model(decoder_dir)
        frames = [8, 16, 8, 4]  # windows: 2 x 15 s, 4 x 22.6 s, 2 x 22.5 s, 1 x 20 s
        ds = Timed("fixed", "p", [np.full((n, D), i, np.float32) for i, n in enumerate(frames)], [("a",)] * 4)
        cfg = TrainConfig(batch_size=4, sort_buffer=64, crop_frames=4, crop_align=4, crop_seconds=30.0)
        kept = {}
        sampler = BatchSampler(model, [ds], [1], cfg)
        for b in (next(sampler) for _ in range(16)):
            for f in b.features:
                kept.setdefault(int(f[0, 0]), set()).add(f.shape[0])
        # 30.01 s: both windows (30 s, not 15); 90.5 s: one (22.6 s); 45 s: one (22.5 s); 20 s: its only one
        assert kept == {0: {8}, 1: {4}, 2: {4}, 3: {4}}
        assert TrainConfig(crop_seconds=None).identity() == TrainConfig().identity()  # old keys unchanged

    def test_an_empty_target_trains_to_stop(self, decoder_dir):
        # an empty label is a sample in XARES-LLM: its target is EOS alone
        model = _model(decoder_dir)
        ds = ArrayDataset("e", "Say nothing.", [np.ones((4, D), np.float32)] * 4, [("",)] * 4)
        batch = next(BatchSampler(model, [ds], [1], TrainConfig(batch_size=4, sort_buffer=4)))
        assert batch.target_ids == [[model.eos_token_id]] * 4

    def test_batches_follow_the_reference_length_key(self, decoder_dir):
        # XARES-LLM sorts buffers by text tokens + audio seconds (not frames): same texts, so seconds decide
        model = _model(decoder_dir)
        durations = [0.5, 3.0, 1.0, 2.5, 0.2, 2.0, 1.5, 2.8]
        arrays = [np.full((10 - i, D), i, np.float32) for i in range(8)]  # frame counts run the other way
        ds = ArrayDataset("t", "p", arrays, [(CLASSES[0],)] * 8, durations=durations)
        sampler = BatchSampler(model, [ds], [1], TrainConfig(batch_size=4, sort_buffer=8))
        batches = [sorted(int(f[0, 0]) for f in next(sampler).features) for _ in range(2)]
        assert sorted(batches) == [[0, 2, 4, 6], [1, 3, 5, 7]]  # the 4 shortest and the 4 longest in seconds
        # and texts of one length go together when they differ
        mixed = ToyTask(64, 2)
        sampler = BatchSampler(model, [mixed], [1], TrainConfig(batch_size=4, sort_buffer=64))
        keys = [[len(p) + len(t) for p, t in zip(b.prompt_ids, b.target_ids)] for b in (next(sampler) for _ in range(16))]
        assert np.mean([max(k) - min(k) for k in keys]) <= 1.0

    def test_bad_inputs(self, decoder_dir):
        with pytest.raises(ValueError, match="one entry per clip"):
            ArrayDataset("t", "p", [np.ones((2, D), np.float32)], [("a",)], durations=[1.0, 2.0])
        model = _model(decoder_dir)
        with pytest.raises(ConfigError):
            BatchSampler(model, [ToyTask(4, 0)], [0], TrainConfig())
        wrong = ToyTask(8, 0)
        wrong.arrays = [x[:, :5] for x in wrong.arrays]
        with pytest.raises(DataError, match="shape"):
            next(BatchSampler(model, [wrong], [1], TrainConfig(sort_buffer=4)))
        nan = ToyTask(8, 0)
        nan.arrays[0][0, 0] = np.nan
        nan.arrays = [nan.arrays[0]] * 8
        with pytest.raises(DataError, match="NaN"):
            next(BatchSampler(model, [nan], [1], TrainConfig(sort_buffer=4)))


class TestTrain:
    def test_loss_decreases(self, decoder_dir, tmp_path):
        result = train(_model(decoder_dir), [ToyTask(64, 0)], [1.0], TrainConfig(max_steps=120, **FAST),
                       tmp_path, progress=False)
        assert result.steps == 120 and result.weights.exists()
        # the pre-trained decoder already knows the texts: what is left to learn is the class (~ln 3 / 4 tokens)
        assert np.mean(result.losses[-10:]) < 0.6 * np.mean(result.losses[:10])

    def test_killed_run_resumes_bit_for_bit(self, decoder_dir, tmp_path):
        cfg = TrainConfig(max_steps=12, checkpoint_every=5, **FAST)
        data = [ToyTask(48, 0), ToyTask(48, 1, task="b")]
        whole = _model(decoder_dir)
        full = train(whole, data, [1, 2], cfg, tmp_path / "whole", progress=False)

        run = tmp_path / "killed"
        part = train(_model(decoder_dir), data, [1, 2], cfg, run, progress=False, stop_at_step=8)
        assert part.steps == 8 and not part.weights.exists()  # "killed" after step 8, last checkpoint at 5
        (run / ".tmp-checkpoint-00000010").mkdir()  # a checkpoint cut short by the kill
        resumed_model = _model(decoder_dir)  # a new process: fresh model
        resumed = train(resumed_model, data, [1, 2], cfg, run, progress=False)
        assert resumed.resumed_from == 5 and resumed.steps == 12
        assert resumed.losses == full.losses
        a, b = whole.trainable_state(), resumed_model.trainable_state()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not (run / ".tmp-checkpoint-00000010").exists()

    def test_finished_run_is_reused_and_other_config_refused(self, decoder_dir, tmp_path):
        cfg = TrainConfig(max_steps=3, **FAST)
        train(_model(decoder_dir), [ToyTask(16, 0)], [1], cfg, tmp_path, progress=False)
        again = train(_model(decoder_dir), [ToyTask(16, 0)], [1], cfg, tmp_path, progress=False)
        assert again.resumed_from == 3 and again.steps == 3
        with pytest.raises(ConfigError, match="another training"):
            train(_model(decoder_dir), [ToyTask(16, 0)], [1], TrainConfig(max_steps=4, **FAST), tmp_path,
                  progress=False)

    def test_bf16_mode_trains(self, decoder_dir, tmp_path):
        result = train(_model(decoder_dir), [ToyTask(32, 0)], [1], TrainConfig(max_steps=20, precision="bf16", **FAST),
                       tmp_path, progress=False)
        assert all(np.isfinite(result.losses)) and np.mean(result.losses[-5:]) < np.mean(result.losses[:5])

    @pytest.mark.slow
    def test_trained_model_beats_chance(self, decoder_dir, tmp_path):
        model = _model(decoder_dir)
        train(model, [ToyTask(200, 0)], [1], TrainConfig(max_steps=200, **FAST), tmp_path, progress=False)
        test = ToyTask(60, 99)
        predictions = generate(model, test, DecodingOptions(max_new_tokens=20), progress=False)
        accuracy = np.mean([p.text == CLASSES[y] for p, y in zip(predictions, test.y)])
        assert accuracy > 0.8, accuracy  # chance is 1/3


def _no_dropout(decoder_dir):
    """LoRA dropout off: the only randomness left is the initialisation, so paths can be compared."""
    return build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir), lora_dropout=0.0))


class TestFastPaths:
    """The GPU's fast paths (graph capture over length buckets, fused AdamW, batches made ahead in a
    thread, losses read back every N steps) run on the CPU too, and must give what the plain path gives."""

    def test_captured_bucketed_training_equals_eager(self, decoder_dir, tmp_path):
        cfg = dict(max_steps=10, **FAST)
        data = [ToyTask(48, 0)]
        plain, fast = _no_dropout(decoder_dir), _no_dropout(decoder_dir)
        a = train(plain, data, [1], TrainConfig(compile="off", **cfg), tmp_path / "plain", progress=False)
        b = train(fast, data, [1], TrainConfig(compile="on", compile_backend="eager", **cfg), tmp_path / "fast",
                  progress=False)
        np.testing.assert_allclose(b.losses, a.losses, rtol=1e-5)
        sa, sb = plain.trainable_state(), fast.trainable_state()
        assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)

    def test_the_body_traces_as_one_graph_over_every_bucket(self, decoder_dir):
        """fullgraph=True: a graph break (a host sync or data-dependent branch) would raise here, which on a
        GPU would mean no CUDA graph. aot_eager also traces the backward, as the GPU's capture does; after
        the second length the trace turns symbolic, and later buckets need no new trace."""
        from torch._dynamo.utils import counters

        from evaluator import compute
        from evaluator.model import Batch

        model = _no_dropout(decoder_dir)
        model.train()
        body = compute.compiled(model.body, device=torch.device("cpu"), exact=True, backend="aot_eager")
        fb = compute.Fallback(body, model.body, "test")
        rng = np.random.default_rng(0)
        counters.clear()
        for frames in ((5, 9, 3, 7), (70, 60, 3, 7), (120, 9, 3, 100), (200, 9, 3, 7)):
            batch = Batch([torch.from_numpy(rng.normal(size=(t, D)).astype(np.float32)) for t in frames],
                          [model.prompt_ids("Classify.")] * 4, [model.target_ids(c) for c in CLASSES + ("rain",)])
            c = model.collate(batch, bucket=True)
            assert c.source.shape[1] in (64, 128, 192, 256) and len(c.target_pos) % 16 == 0
            loss = model.loss(c, fb)
            loss.backward()
            assert fb.failed is None and torch.isfinite(loss)
            torch.testing.assert_close(loss, model.loss(model.collate(batch)), rtol=1e-5, atol=1e-6)
        assert counters["stats"]["unique_graphs"] <= 2  # one static trace, one symbolic: no trace per bucket

    def test_fused_adamw_matches_the_default(self):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, **kw) for ps, kw in ((params, {}), (twins, {"fused": True}))]
        for step in range(20):
            grads = [torch.randn_like(p) for p in params]
            for ps, opt in zip((params, twins), opts):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params, twins))

    def test_batches_made_ahead_are_the_same_batches(self, decoder_dir):
        from evaluator.training import _batches

        model = _model(decoder_dir)
        cfg = TrainConfig(batch_size=4, sort_buffer=16)
        got = {}
        for prefetch in (False, True):
            sampler = BatchSampler(model, [ToyTask(40, 0), ToyTask(40, 1, task="b")], [1, 2], cfg)
            with _batches(model, sampler, torch.device("cpu"), bucket=False, prefetch=prefetch) as stream:
                got[prefetch] = [next(stream) for _ in range(12)]
        for (c1, s1), (c2, s2) in zip(got[False], got[True]):
            assert s1 == s2 and torch.equal(c1.source, c2.source) and torch.equal(c1.features, c2.features)
            assert torch.equal(c1.target_ids, c2.target_ids)

    def test_errors_made_ahead_come_out_in_order(self):
        from evaluator.training import _Prefetch

        items = iter([1, 2, 3])

        def produce():
            value = next(items, None)
            if value is None:
                raise DataError("no more")
            return value

        ahead = _Prefetch(produce, depth=2)
        try:
            assert [next(ahead) for _ in range(3)] == [1, 2, 3]
            with pytest.raises(DataError, match="no more"):
                next(ahead)
        finally:
            ahead.close()
        assert not ahead._thread.is_alive()

    def test_a_non_finite_loss_stops_before_its_checkpoint(self, decoder_dir, tmp_path, monkeypatch):
        from evaluator.model import AudioLLM

        real, calls = AudioLLM.loss, []

        def poisoned(self, c, body=None):
            calls.append(1)
            loss = real(self, c, body)
            return loss * float("nan") if len(calls) == 3 else loss

        monkeypatch.setattr(AudioLLM, "loss", poisoned)
        with pytest.raises(DataError, match="training loss is nan at step 2"):
            train(_model(decoder_dir), [ToyTask(16, 0)], [1], TrainConfig(max_steps=6, checkpoint_every=1, **FAST),
                  tmp_path, progress=False)
        assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000001", "checkpoint-00000002"]

    def test_losses_are_read_back_in_blocks(self):
        from evaluator.training import _read_losses

        assert _read_losses([torch.tensor(1.5), torch.tensor(2.0)], first_step=10) == [1.5, 2.0]
        assert _read_losses([], first_step=0) == []
        with pytest.raises(DataError, match="inf at step 11"):
            _read_losses([torch.tensor(1.0), torch.tensor(float("inf"))], first_step=10)

    def test_checkpoints_hold_only_host_tensors(self, decoder_dir, tmp_path):
        train(_model(decoder_dir), [ToyTask(16, 0)], [1], TrainConfig(max_steps=3, **FAST), tmp_path, progress=False)
        (ckpt,) = tmp_path.glob("checkpoint-*")
        state = torch.load(ckpt / "state.pt", weights_only=True)

        def devices(obj):
            if isinstance(obj, torch.Tensor):
                yield obj.device.type
            elif isinstance(obj, dict):
                for v in obj.values():
                    yield from devices(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    yield from devices(v)

        assert set(devices(state)) == {"cpu"}

    def test_device_and_capture_do_not_change_the_key(self):
        base = TrainConfig().identity()
        assert TrainConfig(device="cpu", compile="on", threads=1).identity() == base
        assert TrainConfig(precision="bf16").identity() != base


def test_a_captured_graph_failing_in_backward_falls_back_to_eager(decoder_dir, tmp_path):
    """A capture that breaks only when gradients flow back (seen with some torch/driver pairs) must not
    end the run: the step is redone eagerly and training goes on with the same mathematics."""
    from evaluator import compute

    class BackwardBreaks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("CUDA graph replay failed in backward")

    model = _no_dropout(decoder_dir)
    body = compute.Fallback(lambda *a: BackwardBreaks.apply(model.body(*a)), model.body, "training")
    from evaluator.training import _forward_backward

    collated = model.collate(next(BatchSampler(model, [ToyTask(16, 0)], [1], TrainConfig(sort_buffer=4))))
    loss = _forward_backward(model, collated, body, torch.autocast("cpu", enabled=False))
    assert body.failed == "RuntimeError: CUDA graph replay failed in backward"
    assert torch.isfinite(loss) and model.projector.weight.grad is not None
