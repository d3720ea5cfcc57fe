"""The locally built decoders load by path like hub models; the smoke one learned to stop."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluator.smoke_decoder import SMOLLM2_135M, build_smoke_decoder, build_smollm2_shaped

TEXTS = ["a dog barks", "rain falls on the roof", "the bell rings twice"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return build_smoke_decoder(TEXTS * 2, tmp_path_factory.mktemp("smoke"), steps=150, hidden_size=64, threads=1)


def test_loads_by_path_like_a_hub_model(smoke):
    model = AutoModelForCausalLM.from_pretrained(smoke)
    tok = AutoTokenizer.from_pretrained(smoke)
    assert model.config.model_type == "llama"
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token_id not in (None, tok.eos_token_id)
    assert tok.decode(tok("rain falls on the roof", add_special_tokens=False)["input_ids"]) == "rain falls on the roof"
    assert "smoke-test" in (smoke / "README.md").read_text().lower()


def test_pretraining_taught_it_to_stop(smoke):
    model = AutoModelForCausalLM.from_pretrained(smoke).eval()
    tok = AutoTokenizer.from_pretrained(smoke)
    start = tok("rain", add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = torch.cat([torch.tensor([[tok.eos_token_id]]), start], dim=1)
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=30, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, start.shape[1]:].tolist()
    assert tok.eos_token_id in new and len(new) < 30
    assert tok.decode(out[0], skip_special_tokens=True) == "rain falls on the roof"


def test_deterministic(tmp_path):
    a = build_smoke_decoder(TEXTS, tmp_path / "a", steps=5, hidden_size=32, threads=1)
    b = build_smoke_decoder(TEXTS, tmp_path / "b", steps=5, hidden_size=32, threads=1)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_needs_texts(tmp_path):
    with pytest.raises(ValueError):
        build_smoke_decoder(["", "  "], tmp_path)


@pytest.mark.slow
def test_smollm2_shaped(tmp_path):
    path = build_smollm2_shaped(tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(path)
    for name, value in SMOLLM2_135M.items():
        if name == "rope_theta":  # transformers 5 keeps it under rope_parameters
            assert model.config.rope_parameters["rope_theta"] == value
        else:
            assert getattr(model.config, name) == value, name
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6  # SmolLM2-135M: 134.5 M
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|endoftext|>"
