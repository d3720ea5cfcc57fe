"""Generation: option checks, dataset order with keys, our KV loop agrees with stock generate, EOS stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluator.errors import ConfigError, DataError
from evaluator.features import ArrayDataset
from evaluator.generation import DecodingOptions, Generator, Prediction, generate
from evaluator.model import ModelConfig, build_model
from evaluator.smoke_decoder import build_smoke_decoder

D = 8
TEXTS = ["a dog barks", "rain falls on the roof", "a cat meows", "the bell rings twice"]


def Items(frames, seed=0) -> ArrayDataset:  # noqa: N802 - reads like the dataset it builds
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0, 1, (t, D)).astype(np.float16) for t in frames]
    return ArrayDataset("toy", "Describe the sound.", arrays, [("unused",)] * len(arrays))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """Random decoder weights: it (almost) never emits EOS, the reference's worst case."""
    path = build_smoke_decoder(TEXTS, tmp_path_factory.mktemp("rand"), steps=0, hidden_size=64)
    return build_model(ModelConfig(encoder_dim=D, decoder=str(path)))


@pytest.fixture(scope="module")
def lm_model(tmp_path_factory):
    """Pre-trained on the texts, so it answers a text and stops at EOS."""
    path = build_smoke_decoder(TEXTS, tmp_path_factory.mktemp("lm"), steps=150, hidden_size=64, threads=1)
    return build_model(ModelConfig(encoder_dim=D, decoder=str(path)))


class TestOptions:
    def test_defaults_are_the_protocol(self):
        o = DecodingOptions()
        assert (o.greedy, o.repetition_penalty, o.max_new_tokens) == (True, 1.05, 150)

    @pytest.mark.parametrize("bad", [
        dict(temperature=0.7),  # greedy ignores temperature
        dict(greedy=False),  # sampling needs a temperature
        dict(max_new_tokens=0), dict(batch_size=0), dict(repetition_penalty=0.0),
        dict(engine="beam"), dict(precision="bf16", merge_lora=False),
    ])
    def test_rejects_incompatible(self, bad):
        with pytest.raises(ConfigError):
            DecodingOptions(**bad)


class TestGenerate:
    def test_dataset_order_and_keys(self, lm_model):
        items = Items([3, 9, 1, 7, 2, 8, 5])  # length sorting reorders these inside the engine
        preds = generate(lm_model, items, DecodingOptions(batch_size=2, max_new_tokens=12), progress=False)
        assert [p.key for p in preds] == [items.key(i) for i in range(len(items))]
        assert all(isinstance(p, Prediction) and p.text == p.text.strip() for p in preds)
        # each prediction is that item's own answer: decoding it alone gives the same text
        for i in (0, 3, 6):
            one = Items([len(items.arrays[i])])
            one.arrays = [items.arrays[i]]
            alone = generate(lm_model, one, DecodingOptions(batch_size=1, max_new_tokens=12), progress=False)
            assert alone[0].text == preds[i].text

    def test_prompt_lists_and_own_prompts_per_clip(self, lm_model):
        # a prompt list gives each clip the prompt its key draws (stable, whatever the batching); an
        # empty task prompt gives way to the clip's own prompt
        from evaluator.data import choose_prompt, prompt_draw

        base = Items([3, 5, 4, 6, 2, 7], seed=4)
        listed = ArrayDataset("toy", ("Describe the sound.", "What do you hear?"), base.arrays, base.labels)
        own = ArrayDataset("toy", "", base.arrays, base.labels, prompts=["What do you hear?", None] * 3)
        opts = DecodingOptions(batch_size=4, max_new_tokens=10)
        for ds in (listed, own):
            preds = generate(lm_model, ds, opts, progress=False)
            for i, p in enumerate(preds):
                prompt = choose_prompt(ds.prompt, ds.sample_prompt(i), draw=prompt_draw(ds.key(i)))
                one = ArrayDataset("toy", prompt, [base.arrays[i]], [("unused",)], keys=[ds.key(i)])
                assert generate(lm_model, one, opts, progress=False)[0].text == p.text
        assert len({choose_prompt(listed.prompt, None, draw=prompt_draw(listed.key(i))) for i in range(6)}) == 2

    @pytest.mark.parametrize("merge", [False, True])
    def test_kv_loop_matches_stock_generate(self, random_model, merge):
        items = Items([4, 6, 2, 5], seed=1)
        common = dict(batch_size=4, max_new_tokens=20, repetition_penalty=1.3, merge_lora=merge)
        ours = generate(random_model, items, DecodingOptions(engine="kv", **common), progress=False)
        stock = generate(random_model, items, DecodingOptions(engine="hf", **common), progress=False)
        assert [p.text for p in ours] == [p.text for p in stock]
        assert all(p.text for p in ours)

    def test_stops_at_eos_and_when_all_rows_finish(self, lm_model, monkeypatch):
        decoder_calls = []
        real = torch.nn.Module.__call__

        def counting(module, *args, **kwargs):
            if module.__class__.__name__ == "LlamaForCausalLM":
                decoder_calls.append(1)
            return real(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "__call__", counting)
        items = Items([3, 4, 5, 6])
        preds = generate(lm_model, items, DecodingOptions(batch_size=4, max_new_tokens=150), progress=False)
        n_tokens = [len(lm_model.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in preds]
        assert max(n_tokens) < 20  # answers are short texts, far from 150 tokens
        # one prefill + one call per new token of the longest answer (its EOS needs no further call)
        assert len(decoder_calls) <= 1 + max(n_tokens)

    def test_no_eos_runs_to_max_new_tokens(self, random_model):
        preds = generate(random_model, Items([3]), DecodingOptions(max_new_tokens=7, repetition_penalty=1.0),
                         progress=False)
        assert len(random_model.tokenizer(preds[0].text, add_special_tokens=False)["input_ids"]) >= 5

    def test_model_left_unchanged(self, lm_model):
        before = {k: v.clone() for k, v in lm_model.trainable_state().items()}
        lm_model.train()
        generate(lm_model, Items([3, 4]), DecodingOptions(max_new_tokens=5), progress=False)
        assert lm_model.training
        assert all(torch.equal(before[k], v) for k, v in lm_model.trainable_state().items())
        assert not any(getattr(m, "merged", False) for m in lm_model.decoder.modules())

    def test_bad_features(self, lm_model):
        items = Items([3, 4])
        items.arrays[1] = items.arrays[1][:, :3]
        with pytest.raises(DataError, match="shape"):
            generate(lm_model, items, DecodingOptions(max_new_tokens=5), progress=False)

    def test_empty_dataset(self, lm_model):
        assert generate(lm_model, Items([]), progress=False) == []

    def test_sampling_is_seeded(self, lm_model):
        o = DecodingOptions(greedy=False, temperature=1.5, max_new_tokens=8, seed=7)
        a = generate(lm_model, Items([3, 4, 5]), o, progress=False)
        b = generate(lm_model, Items([3, 4, 5]), o, progress=False)
        assert a == b


@pytest.fixture(scope="module")
def adapted_model(tmp_path_factory):
    """Random decoder with non-zero LoRA weights, so that merging them really changes the decoder."""
    path = build_smoke_decoder(TEXTS, tmp_path_factory.mktemp("adapted"), steps=0, hidden_size=64)
    model = build_model(ModelConfig(encoder_dim=D, decoder=str(path)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


class TestEngines:
    """The GPU's static-cache engine (fixed shapes, filled batches, graph-captured step) runs on the CPU
    too and must produce the very tokens of the KV loop."""

    @pytest.mark.parametrize("batch", [3, 4, 16])
    def test_static_engine_matches_kv(self, adapted_model, batch):
        items = Items([4, 30, 2, 5, 17, 9, 1], seed=2)  # 7 clips: the last batch is filled up with copies
        common = dict(max_new_tokens=24, repetition_penalty=1.3, batch_size=batch)
        kv = generate(adapted_model, items, DecodingOptions(engine="kv", **common), progress=False)
        static = generate(adapted_model, items, DecodingOptions(engine="static", **common), progress=False)
        assert [p.text for p in static] == [p.text for p in kv]

    def test_captured_decode_step_matches_kv(self, lm_model):
        """fullgraph capture of the decode step (the CUDA graph on a GPU) traces without a break."""
        items = Items([3, 8, 5, 2], seed=3)
        kv = generate(lm_model, items, DecodingOptions(engine="kv", max_new_tokens=16), progress=False)
        with Generator(lm_model, DecodingOptions(engine="static", compile="on", compile_backend="aot_eager",
                                                 batch_size=4, max_new_tokens=16)) as gen:
            static = gen.generate(items, progress=False)
            (_, _, step), = gen._steps.values()
        assert step.failed is None
        assert [p.text for p in static] == [p.text for p in kv]

    def test_one_cache_grows_across_tasks(self, adapted_model):
        """Short clips first, longer ones after: the run's single static cache grows once and answers stay
        those of the KV loop (its unused tail is masked)."""
        short, long = Items([3, 5, 2], seed=6), Items([90, 40, 70], seed=7)
        options = dict(max_new_tokens=12, repetition_penalty=1.3, batch_size=4)
        with Generator(adapted_model, DecodingOptions(engine="static", **options)) as gen:
            a = gen.generate(short, progress=False)
            first = gen._steps[4][1]
            b = gen.generate(long, progress=False)
            c = gen.generate(short, progress=False)  # served by the grown cache
            assert gen._steps[4][1] > first
        kv = DecodingOptions(engine="kv", **options)
        assert a == c == generate(adapted_model, short, kv, progress=False)
        assert b == generate(adapted_model, long, kv, progress=False)

    def test_cpu_defaults(self, lm_model):
        gen = Generator(lm_model)
        assert gen.engine == "kv" and gen.batch_size == 32

    @pytest.mark.parametrize("precision", ["fp32", "bf16"])
    def test_one_merge_per_run_and_the_decoder_restored_bit_for_bit(self, adapted_model, precision, monkeypatch):
        before = {k: v.clone() for k, v in adapted_model.decoder.state_dict().items()}
        merges = []
        cls = type(adapted_model.decoder.base_model)  # peft forwards merge_adapter to its LoraModel
        real = cls.merge_adapter
        monkeypatch.setattr(cls, "merge_adapter", lambda self, *a, **k: (merges.append(1), real(self, *a, **k))[1])
        tasks = [Items([3, 6], seed=4), Items([5, 2, 7], seed=5)]
        options = DecodingOptions(max_new_tokens=10, precision=precision)
        with Generator(adapted_model, options) as gen:
            assert gen.decoder is adapted_model.decoder  # merged in place: no second decoder
            together = [gen.generate(t, progress=False) for t in tasks]
        assert len(merges) == 1
        after = adapted_model.decoder.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
        assert not any(getattr(m, "merged", False) for m in adapted_model.decoder.modules())
        alone = [generate(adapted_model, t, options, progress=False) for t in tasks]
        assert together == alone
        if precision == "fp32":  # merged weights decode like the adapter branch does
            unmerged = [generate(adapted_model, t, DecodingOptions(max_new_tokens=10, merge_lora=False),
                                 progress=False) for t in tasks]
            assert [[p.text for p in ps] for ps in unmerged] == [[p.text for p in ps] for ps in together]

    def test_generate_outside_the_block_is_a_bug(self, lm_model):
        with pytest.raises(RuntimeError, match="outside"):
            Generator(lm_model).generate(Items([3]), progress=False)
