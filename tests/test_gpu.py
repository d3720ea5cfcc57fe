"""The decoder on a CUDA device: reproducibility, agreement with the CPU, graph capture, moving checkpoints.

Skipped where torch sees no GPU (conftest); `benchmarks/gpu/check.sh` runs them on a lent GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluator.features import ArrayDataset
from evaluator.generation import DecodingOptions, Generator, generate
from evaluator.model import ModelConfig, build_model
from evaluator.smoke_decoder import build_smoke_decoder
from evaluator.training import TrainConfig, train

pytestmark = pytest.mark.requires_gpu

D = 24
CLASSES = ("a dog barks", "rain falls on the roof", "a cat meows", "the bell rings twice")
FAST = dict(warmup_steps=5, learning_rate=1e-3, sort_buffer=32, log_every=10)


def toy(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    arrays = [(np.eye(D)[c] * 3 + rng.normal(0, 1, (int(rng.integers(5, 60)), D))).astype(np.float16) for c in y]
    return ArrayDataset("toy", "Classify the sound.", arrays, [(CLASSES[c],) for c in y])


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return build_smoke_decoder(list(CLASSES) * 4, tmp_path_factory.mktemp("dec"), steps=150, hidden_size=64,
                               threads=1)


def _model(decoder_dir, dropout: float = 0.1, dtype: str = "float32"):
    return build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir), lora_dropout=dropout, dtype=dtype))


def _state(model):
    return {k: v.cpu() for k, v in model.trainable_state().items()}


class TestTraining:
    @pytest.mark.parametrize("compile_mode", ["off", "on"])
    def test_fp32_reruns_are_bit_identical(self, decoder_dir, tmp_path, compile_mode):
        cfg = TrainConfig(max_steps=30, device="cuda", compile=compile_mode, **FAST)
        runs = []
        for k in range(2):
            model = _model(decoder_dir)
            result = train(model, [toy(64, 0)], [1], cfg, tmp_path / f"{k}", progress=False)
            runs.append((result.losses, _state(model)))
        assert runs[0][0] == runs[1][0]
        assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])

    def test_gpu_agrees_with_cpu(self, decoder_dir, tmp_path):
        """Without dropout (whose masks come from another generator on each device) the trajectories
        differ only by GPU arithmetic."""
        losses = {}
        for device in ("cpu", "cuda"):
            result = train(_model(decoder_dir, dropout=0.0), [toy(64, 0)], [1],
                           TrainConfig(max_steps=30, device=device, **FAST), tmp_path / device, progress=False)
            losses[device] = result.losses
        np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=2e-3)

    def test_captured_graphs_equal_eager(self, decoder_dir, tmp_path):
        losses = {}
        for mode in ("off", "on"):
            result = train(_model(decoder_dir, dropout=0.0), [toy(64, 0)], [1],
                           TrainConfig(max_steps=30, device="cuda", compile=mode, **FAST), tmp_path / mode,
                           progress=False)
            losses[mode] = result.losses
        np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-4)

    def test_bf16_mode_learns_like_fp32(self, decoder_dir, tmp_path):
        final = {}
        for precision in ("fp32", "bf16"):
            dtype = "bfloat16" if precision == "bf16" else "float32"
            result = train(_model(decoder_dir, dtype=dtype), [toy(128, 0)], [1],
                           TrainConfig(max_steps=120, device="cuda", precision=precision, **FAST),
                           tmp_path / precision, progress=False)
            assert all(np.isfinite(result.losses))
            final[precision] = np.mean(result.losses[-20:])
        assert abs(final["bf16"] - final["fp32"]) < 0.1 + 0.2 * final["fp32"]

    @pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
    def test_a_checkpoint_moves_between_devices(self, decoder_dir, tmp_path, first, second):
        cfg = dict(max_steps=12, checkpoint_every=5, **FAST)
        part = train(_model(decoder_dir), [toy(48, 0)], [1], TrainConfig(device=first, **cfg), tmp_path,
                     progress=False, stop_at_step=8)
        assert part.steps == 8
        model = _model(decoder_dir)
        resumed = train(model, [toy(48, 0)], [1], TrainConfig(device=second, **cfg), tmp_path, progress=False)
        assert resumed.resumed_from == 5 and resumed.steps == 12 and resumed.losses[:5] == part.losses[:5]
        assert model.projector.weight.device.type == second
        assert all(np.isfinite(resumed.losses))


class TestPack:
    """Packs on a GPU: each job's dropout masks come from its own copy of the CUDA generator's state."""

    def test_packed_equals_solo_in_eager_fp32(self, decoder_dir, tmp_path):
        from evaluator.generation import PackedGenerator
        from evaluator.pack import DecoderPack
        from evaluator.training import PackedJob, train_packed

        cfgs = [TrainConfig(max_steps=40, device="cuda", compile="off", seed=s, **FAST) for s in (1, 2)]
        solo = [train(_model(decoder_dir), [toy(64, k)], [1], cfg, tmp_path / f"solo{k}", progress=False).losses
                for k, cfg in enumerate(cfgs)]
        pack = DecoderPack(ModelConfig(encoder_dim=1, decoder=str(decoder_dir)))
        jobs = [PackedJob(f"j{k}", pack.add_job(ModelConfig(encoder_dim=D, decoder=str(decoder_dir)), seed=cfg.seed),
                          [toy(64, k)], [1], cfg, tmp_path / f"packed{k}") for k, cfg in enumerate(cfgs)]
        out = train_packed(pack, jobs, progress=False)
        for alone, together in zip(solo, out):
            np.testing.assert_allclose(together.result.losses, alone, rtol=1e-4)
        with PackedGenerator(pack, [j.model for j in jobs], DecodingOptions(max_new_tokens=12)) as gen:
            answers = gen.generate_many([toy(40, 7), toy(40, 8)], progress=False)
        assert all(len(a) == 40 for a in answers)


class TestGeneration:
    @pytest.fixture(scope="class")
    def trained(self, decoder_dir, tmp_path_factory):
        model = _model(decoder_dir)
        train(model, [toy(200, 0)], [1], TrainConfig(max_steps=150, device="cuda", **FAST),
              tmp_path_factory.mktemp("t"), progress=False)
        return model

    def test_static_graph_engine_answers_like_the_cpu(self, trained):
        test = toy(40, 99)
        on_gpu = generate(trained, test, DecodingOptions(max_new_tokens=20), progress=False)  # static + graphs
        trained.to("cpu")
        try:
            on_cpu = generate(trained, test, DecodingOptions(max_new_tokens=20), progress=False)  # kv loop
        finally:
            trained.to("cuda")
        same = np.mean([a.text == b.text for a, b in zip(on_gpu, on_cpu)])
        assert same >= 0.95, same  # near-ties may flip under GPU arithmetic
        accuracy = np.mean([p.text == CLASSES[int(np.argmax(test.arrays[i].astype(np.float32).mean(0)[:4]))]
                            for i, p in enumerate(on_gpu)])
        assert accuracy > 0.5, accuracy

    def test_the_decode_step_is_captured(self, trained):
        with Generator(trained, DecodingOptions(max_new_tokens=12)) as gen:
            assert gen.engine == "static" and gen.batch_size == 256
            gen.generate(toy(8, 5), progress=False)
            (_, _, step), = gen._steps.values()
        assert step.failed is None, step.failed

    def test_engines_agree_on_the_gpu(self, trained):
        test = toy(24, 7)
        answers = {engine: [p.text for p in generate(trained, test, DecodingOptions(engine=engine, compile="off",
                                                                                     max_new_tokens=20),
                                                     progress=False)]
                   for engine in ("kv", "static")}
        assert answers["kv"] == answers["static"]
