"""Small decoders the project builds itself, because no Hugging Face hub is reachable offline.

* `build_smoke_decoder` makes a SMOKE-TEST decoder: a tiny Llama-architecture causal LM (same code path as
  SmolLM2) with a byte-level BPE tokenizer trained on the given texts, briefly pre-trained as a language
  model on ``text<eos>`` so that it learns to stop. It proves that the pipeline learns; its scores say
  nothing about an encoder's quality.
* `build_smollm2_shaped` makes a decoder with SmolLM2-135M's exact architecture and random weights, for
  benchmarks (speed only: it never emits EOS on purpose).

Both are written with ``save_pretrained`` and load by path exactly like a hub model::

    python -c "from pathlib import Path; from evaluator.smoke_decoder import build_smoke_decoder; \
        build_smoke_decoder(['a dog barks', 'rain falls'], Path('/tmp/smoke'))"
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evaluator.progress import progress as progress_of

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # same name as SmolLM2's bos/eos token
PAD_TOKEN = "<|pad|>"
SMOKE_VOCAB_SIZE = 512  # upper bound; byte-level BPE stops earlier when the texts run out of merges

# SmolLM2-135M's architecture (config.json of HuggingFaceTB/SmolLM2-135M).
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    vocab_size=49152,
)


def build_tokenizer(texts: Sequence[str], vocab_size: int = SMOKE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic: the trainer is not randomised).

    Like SmolLM2's tokenizer it adds no special tokens around a text; EOS is ``<|endoftext|>`` and is
    also the BOS token; padding uses a separate ``<|pad|>`` token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=EOS_TOKEN, padding_side="right",
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, **arch) -> LlamaConfig:
    return LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        **arch,
    )


def build_smoke_decoder(
    texts: Sequence[str],
    out_dir: Path,
    *,
    steps: int = 300,
    seed: int = 0,
    hidden_size: int = 96,
    num_layers: int = 2,
    batch_size: int = 16,
    threads: int | None = None,
    progress: bool = False,
) -> Path:
    """Build, pre-train and save the smoke-test decoder.

    The brief language-model pre-training on ``text<eos>`` matters: a random decoder never emits EOS,
    generates the maximum number of tokens and scores 0 on exact match however well the projector
    learned. Deterministic for a given (texts, steps, seed); a few seconds on 2 CPU cores.

    Args:
        texts: the texts the decoder will have to produce (e.g. the demo targets); duplicates are fine.
        out_dir: directory to write (``config.json``, weights, tokenizer files); created if missing.
        steps: language-model pre-training steps (AdamW, lr 3e-3).
        seed: seeds weights and batch order.
        hidden_size: model width (heads of 32 dims).
        num_layers: transformer layers.
        batch_size: texts per pre-training step.
        threads: torch threads while training (default: leave as is).

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
        ``AutoTokenizer.from_pretrained(out_dir)``.

    Raises:
        ValueError: ``texts`` has no non-empty text.
    """
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("build_smoke_decoder needs at least one non-empty text")
    out_dir = Path(out_dir)
    logger.info("building a SMOKE-TEST decoder (tiny, trained on %d texts) in %s", len(texts), out_dir)
    tokenizer = build_tokenizer(texts)
    heads = max(1, hidden_size // 32)
    config = _llama_config(
        tokenizer,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            _pretrain(model, tokenizer, texts, steps=steps, seed=seed, batch_size=batch_size, progress=progress)
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        "# Smoke-test decoder\n\nBuilt locally by `evaluator.smoke_decoder.build_smoke_decoder` "
        f"({num_layers} layers, hidden {hidden_size}, vocab {len(tokenizer)}, {steps} LM steps on "
        f"{len(texts)} texts). It only checks that the pipeline learns; it is NOT SmolLM2-135M and its "
        "scores are not challenge scores.\n"
    )
    return out_dir


def _pretrain(model, tokenizer, texts: list[str], *, steps: int, seed: int, batch_size: int,
              progress: bool = False) -> None:
    """Causal-LM training on packed rows ``<eos> text <eos> text <eos> ...`` (loss on every token).

    Packing with a leading EOS teaches both ends of an answer: which first token follows a separator (in
    the AudioLLM the prompt plays that part) and that EOS follows a complete text.
    """
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    row_len = max(32, 2 * max(len(ids) for ids in encoded) + 2)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    with progress_of("building the smoke decoder", total=steps, enabled=progress) as bar:
        for step in range(steps):
            _pretrain_step(model, optimizer, encoded, rng, eos, row_len, batch_size, step, steps)
            bar.advance(1)


def _pretrain_step(model, optimizer, encoded: list[list[int]], rng: random.Random, eos: int, row_len: int,
                   batch_size: int, step: int, steps: int) -> None:
    rows = []
    for _ in range(batch_size):
        row = [eos]
        while len(row) < row_len:
            row += encoded[rng.randrange(len(encoded))] + [eos]
        rows.append(row[:row_len])
    input_ids = torch.tensor(rows, dtype=torch.long)  # [B, row_len], no padding needed
    for group in optimizer.param_groups:  # short linear warm-up, then linear decay to 10 %
        group["lr"] = 3e-3 * min((step + 1) / 20, 1.0 - 0.9 * step / steps)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % 100 == 0 or step == steps - 1:
        logger.debug("smoke decoder LM step %d loss %.3f", step, loss.item())


def build_smollm2_shaped(out_dir: Path, *, seed: int = 0, texts: Sequence[str] | None = None) -> Path:
    """Save a decoder with SmolLM2-135M's architecture and random weights, for benchmarks.

    The tokenizer is a locally trained byte-level BPE padded out to SmolLM2's 49152-entry vocabulary so
    that embedding and LM-head costs match the real model. Random weights never emit EOS, which is the
    worst case the reference's generation loop meets (150 new tokens for every sample).

    Args:
        out_dir: directory to write; created if missing.
        seed: seeds the random weights.
        texts: texts to train the tokenizer on (a fixed pangram set by default).

    Returns:
        ``out_dir``, loadable by path like a hub model.
    """
    out_dir = Path(out_dir)
    texts = list(texts or ["the quick brown fox jumps over the lazy dog", "a dog barks", "rain falls"])
    tokenizer = build_tokenizer(texts)
    config = _llama_config(tokenizer, **SMOLLM2_135M)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
