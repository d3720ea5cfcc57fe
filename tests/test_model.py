"""Model: trainable set, row layout (labels, masks, positions), trainable-only checkpoints, load errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from evaluator.errors import ModelError
from evaluator.model import IGNORE_INDEX, Batch, ModelConfig, bucket_length, build_model, load_model
from evaluator.smoke_decoder import build_smoke_decoder

D = 12


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    # no pre-training needed here: random weights from a config + a locally trained tokenizer
    return build_smoke_decoder(["a dog barks", "rain falls", "hello world"], tmp_path_factory.mktemp("dec"),
                               steps=0, hidden_size=64)


@pytest.fixture()
def model(decoder_dir):
    return build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir)))


def _batch(model, frames=(5, 2), texts=("a dog barks", "rain")):
    g = torch.Generator().manual_seed(0)
    return Batch(features=[torch.randn(t, D, generator=g) for t in frames],
                 prompt_ids=[model.prompt_ids("Classify the sound.")] * len(frames),
                 target_ids=[model.target_ids(t) for t in texts])


def test_text_is_tokenized_as_the_reference_does(model):
    # XARES-LLM: prompt = tokenizer(prompt); target = tokenizer(text + eos_token), default special tokens
    tok = model.tokenizer
    for text in ("a dog barks", "", "rain falls on the roof", "7"):
        assert model.target_ids(text) == tok(text + tok.eos_token)["input_ids"]
        assert model.target_ids(text)[-1] == model.eos_token_id
        assert model.decode(model.target_ids(text)) == text.strip()  # EOS is skipped when decoding
    assert model.prompt_ids("Classify the sound.") == tok("Classify the sound.")["input_ids"]


class TestTrainable:
    def test_only_projector_and_lora_train(self, model):
        names = model.trainable_names()
        assert {"projector.weight", "projector.bias"} <= set(names)
        assert all(n.startswith("projector.") or ".lora_A." in n or ".lora_B." in n for n in names)
        # LoRA on all linear layers of every block (q,k,v,o,gate,up,down), A and B each
        n_blocks = model.decoder.get_base_model().config.num_hidden_layers
        assert sum(".lora_" in n for n in names) == n_blocks * 7 * 2
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert any("embed_tokens" in n for n in frozen) and not any("lora_" in n for n in frozen)

    def test_lora_settings_are_the_protocol(self, model):
        cfg = model.decoder.peft_config["default"]
        assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (8, 32, 0.1, "none")

    def test_same_seed_same_init(self, decoder_dir):
        a = build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir)), seed=3).trainable_state()
        b = build_model(ModelConfig(encoder_dim=D, decoder=str(decoder_dir)), seed=3).trainable_state()
        assert all(torch.equal(a[k], b[k]) for k in a)


class TestLayout:
    def test_labels_mask_audio_and_prompt(self, model):
        batch = _batch(model)
        x = model.embed(batch, padding_side="right")
        prompt = len(batch.prompt_ids[0])
        for row, (t, target) in enumerate(zip((5, 2), batch.target_ids)):
            labels = x.labels[row].tolist()
            assert labels[: t + prompt] == [IGNORE_INDEX] * (t + prompt)
            assert labels[t + prompt : t + prompt + len(target)] == target
            assert target[-1] == model.eos_token_id
            assert all(v == IGNORE_INDEX for v in labels[t + prompt + len(target):])

    @pytest.mark.parametrize("side", ["left", "right"])
    def test_audio_mask_in_front_of_text_mask(self, model, side):
        batch = _batch(model)
        x = model.embed(batch, padding_side=side)
        width = x.attention_mask.shape[1]
        for row, t in enumerate((5, 2)):
            n_text = len(batch.prompt_ids[row]) + len(batch.target_ids[row])
            real = torch.cat([torch.ones(t), torch.ones(n_text)]).long()  # audio frame mask + text mask
            pad = torch.zeros(width - len(real), dtype=torch.long)
            expected = torch.cat([real, pad] if side == "right" else [pad, real])
            assert torch.equal(x.attention_mask[row], expected)
            assert x.position_ids[row][x.attention_mask[row].bool()].tolist() == list(range(len(real)))
        # the audio frames sit right before the prompt embedding, whatever the padding
        first = model.projector(batch.features[1])
        start = 0 if side == "right" else width - (2 + len(batch.prompt_ids[1]) + len(batch.target_ids[1]))
        assert torch.allclose(x.inputs_embeds[1, start : start + 2], first)

    def test_padding_does_not_change_a_row(self, model):
        model.eval()
        batch = _batch(model)
        alone = Batch(batch.features[1:], batch.prompt_ids[1:], batch.target_ids[1:])
        with torch.no_grad():
            assert torch.allclose(model(alone), _row_loss(model, batch, 1), atol=1e-5)

    def test_loss_is_finite_and_differentiable(self, model):
        model.train()
        loss = model(_batch(model))
        loss.backward()
        assert torch.isfinite(loss) and model.projector.weight.grad.abs().sum() > 0


    def test_loss_is_the_mean_over_targets_of_the_full_lm_head(self, model):
        """Our loss runs the LM head on target positions only; the stock way runs it everywhere."""
        model.eval()
        batch = _batch(model, frames=(5, 2, 9), texts=("a dog barks", "rain", "a cat meows"))
        x = model.embed(batch, padding_side="right")
        with torch.no_grad():
            logits = model.decoder(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                                   position_ids=x.position_ids).logits[:, :-1]
            stock = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.labels[:, 1:].flatten(),
                                                      ignore_index=IGNORE_INDEX)
            assert torch.allclose(model(batch), stock, atol=1e-5)

    @pytest.mark.parametrize("frames", [(5, 2), (70, 3, 12, 40)])
    def test_length_buckets_pad_without_changing_the_loss(self, model, frames):
        texts = ("a dog barks", "rain", "a cat", "the bell")[: len(frames)]
        batch = _batch(model, frames=frames, texts=texts)
        plain, bucketed = model.collate(batch), model.collate(batch, bucket=True)
        length = plain.source.shape[1]
        assert bucketed.source.shape[1] == bucket_length(length) >= length
        assert len(bucketed.target_pos) % 16 == 0 and len(bucketed.target_pos) >= len(plain.target_pos)
        model.eval()  # dropout off: it draws per position, so padding would change its masks
        grads = []
        for c in (plain, bucketed):
            model.zero_grad()
            loss = model.loss(c)
            loss.backward()
            grads.append((loss.detach(), model.projector.weight.grad.clone()))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)

    def test_bucket_sizes(self):
        assert [bucket_length(n) for n in (1, 64, 65, 200, 2048, 2049, 3000)] == [64, 64, 128, 256, 2048, 2560, 3072]


def _row_loss(model, batch, row):
    x = model.embed(batch, padding_side="right")
    logits = model.decoder(inputs_embeds=x.inputs_embeds, attention_mask=x.attention_mask,
                           position_ids=x.position_ids).logits[row, :-1]
    return torch.nn.functional.cross_entropy(logits, x.labels[row, 1:], ignore_index=IGNORE_INDEX)


class TestCheckpoint:
    def test_round_trip_holds_only_projector_and_lora(self, model, tmp_path):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        path = tmp_path / "w.safetensors"
        model.save_trainable(path)
        with safe_open(str(path), framework="pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        assert keys == set(model.trainable_names())
        assert json.loads(meta["model_config"])["encoder_dim"] == D
        n_saved = sum(model.trainable_state()[k].numel() for k in keys)
        assert n_saved < 0.5 * sum(p.numel() for p in model.parameters())
        again = load_model(path)
        assert again.config == model.config
        for k, v in model.trainable_state().items():
            assert torch.equal(again.trainable_state()[k], v)
        model.eval(), again.eval()
        with torch.no_grad():
            assert torch.equal(model(_batch(model)), again(_batch(again)))

    def test_refuses_other_model(self, model, decoder_dir, tmp_path):
        path = tmp_path / "w.safetensors"
        model.save_trainable(path)
        other = build_model(ModelConfig(encoder_dim=D + 1, decoder=str(decoder_dir)))
        with pytest.raises(ModelError, match="made for"):
            other.load_trainable(path)

    def test_corrupt_file(self, model, tmp_path):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ModelError, match="cannot read"):
            model.load_trainable(bad)


class TestLoading:
    def test_missing_hub_model_says_how_to_fix(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        with pytest.raises(ModelError, match=r"SmolLM2-135M.*(--decoder PATH)"):
            build_model(ModelConfig(encoder_dim=D))

    def test_hub_name_loads_from_the_local_cache_without_network(self, decoder_dir, monkeypatch, tmp_path):
        """The real loading path, by name: a hub cache laid out as `hf download` leaves it."""
        import shutil

        from evaluator.hub import check_decoder

        snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abcd"
        shutil.copytree(decoder_dir, snapshot)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a cached model needs no network at all
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # and any attempt would fail loudly
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
        check_decoder("HuggingFaceTB/SmolLM2-135M")
        model = build_model(ModelConfig(encoder_dim=D))  # the default decoder name
        assert model.config.decoder == "HuggingFaceTB/SmolLM2-135M" and model.trainable_names()

    def test_uncached_hub_name_with_no_hub_fails_fast(self, monkeypatch, tmp_path):
        import time

        from evaluator.hub import check_decoder

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
        start = time.monotonic()
        with pytest.raises(ModelError, match="not in the local Hugging Face cache and .* unreachable"):
            check_decoder("HuggingFaceTB/SmolLM2-135M")
        assert time.monotonic() - start < 5  # no half-minute of retries

    def test_missing_directory(self, tmp_path):
        from evaluator.errors import ConfigError

        with pytest.raises(ConfigError, match="does not exist"):  # the option is wrong: exit 2
            build_model(ModelConfig(encoder_dim=D, decoder=str(tmp_path / "nope")))

    def test_bad_config(self):
        with pytest.raises(ModelError):
            ModelConfig(encoder_dim=0)
        with pytest.raises(ModelError):
            ModelConfig(encoder_dim=4, dtype="float8")

    def test_features_are_cast_from_float16(self, model):
        batch = _batch(model)
        batch.features = [torch.from_numpy(np.asarray(f.numpy(), dtype=np.float16)) for f in batch.features]
        assert torch.isfinite(model(batch))
