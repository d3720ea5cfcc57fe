"""Generate answers for a FeatureDataset with the trained model, fast.

XARES-LLM decodes greedily with repetition penalty 1.05 and at most 150 new tokens through the stock
Hugging Face ``generate``. This module keeps those settings and makes them cheap:

* the LoRA weights are folded into an inference copy of the decoder (no adapter branch per layer);
* an incremental loop over a KV cache with left padding, which drops a row from the cache as soon as it
  emits EOS and stops when every row has (the stock loop keeps computing finished rows);
* length-sorted batches inside a bounded buffer, predictions returned in dataset order with their keys.

``engine="hf"`` runs the stock ``generate`` instead (same settings), to cross-check and to benchmark::

    preds = generate(model, test_set, DecodingOptions(batch_size=32))
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from evaluator.errors import ConfigError, DataError
from evaluator.model import AudioLLM, Batch

logger = logging.getLogger(__name__)

ENGINES = ("kv", "hf")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DecodingOptions:
    """Decoding settings; defaults are XARES-LLM's (greedy, penalty 1.05, 150 new tokens)."""

    greedy: bool = True  # False: sample (needs temperature > 0)
    temperature: float = 0.0  # sampling temperature; must stay 0 when greedy
    repetition_penalty: float = 1.05  # over the tokens generated so far (HF semantics); 1.0 = off
    max_new_tokens: int = 150
    batch_size: int = 32  # rows decoded together; does not change greedy results beyond float noise
    sort_batches: int = 16  # batches per length-sorted buffer (bounds memory, cuts padding)
    engine: str = "kv"  # kv: our cached loop | hf: stock transformers generate (the reference's loop)
    merge_lora: bool = True  # fold LoRA into an inference copy of the decoder
    precision: str = "fp32"  # fp32 | bf16 (inference copy in bfloat16: faster on CPUs with bf16 units)
    seed: int = 0  # sampling only
    threads: int | None = None  # torch CPU threads while decoding; None: leave as is

    def __post_init__(self):
        problems = []
        if self.greedy and self.temperature != 0.0:
            problems.append(f"greedy decoding ignores temperature={self.temperature}; set greedy=False to sample")
        if not self.greedy and self.temperature <= 0.0:
            problems.append("sampling (greedy=False) needs temperature > 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.sort_batches < 1:
            problems.append("max_new_tokens, batch_size and sort_batches must be >= 1")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES} (got {self.engine!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.precision == "bf16" and not self.merge_lora:
            problems.append("precision='bf16' casts the merged inference copy; it needs merge_lora=True")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 or None (got {self.threads})")
        if problems:
            raise ConfigError("invalid decoding options: " + "; ".join(problems))


@dataclass(frozen=True)
class Prediction:
    key: str  # the sample's key in its dataset
    text: str  # decoded with special tokens skipped, stripped


def generate(model: AudioLLM, dataset, options: DecodingOptions = DecodingOptions(), progress: bool = True) -> list[Prediction]:
    """Decode one answer per item of ``dataset``.

    Args:
        model: trained `AudioLLM` (left unchanged).
        dataset: a FeatureDataset (task, prompt, len, key(i), features(i), targets(i)).
        options: decoding settings.
        progress: show a progress bar.

    Returns:
        One Prediction per item, in dataset order.

    Raises:
        DataError: an item's features have the wrong shape or non-finite values.
    """
    n = len(dataset)
    texts: list[str | None] = [None] * n
    prompt = model.prompt_ids(dataset.prompt)
    buffer = options.batch_size * options.sort_batches
    with _inference(model, options) as decoder, _progress_bar(progress, n, dataset.task) as tick:
        for start in range(0, n, buffer):
            idx = list(range(start, min(n, start + buffer)))
            feats = {i: _features(model, dataset, i) for i in idx}
            idx.sort(key=lambda i: -feats[i].shape[0])  # longest first: the slowest batch shows early
            for b in range(0, len(idx), options.batch_size):
                rows = idx[b : b + options.batch_size]
                batch = Batch(features=[feats[i] for i in rows], prompt_ids=[prompt] * len(rows))
                for i, ids in zip(rows, _decode(model, decoder, batch, options)):
                    texts[i] = model.decode(ids)
                tick(len(rows))
    return [Prediction(key=dataset.key(i), text=t) for i, t in enumerate(texts)]


def _features(model: AudioLLM, dataset, i: int) -> torch.Tensor:
    feats = np.asarray(dataset.features(i), dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != model.config.encoder_dim:
        raise DataError(f"task {dataset.task}, item {dataset.key(i)}: features have shape {feats.shape}, "
                        f"expected [T>0, {model.config.encoder_dim}]")
    if not np.isfinite(feats).all():
        raise DataError(f"task {dataset.task}, item {dataset.key(i)}: features contain NaN or Inf")
    return torch.from_numpy(feats)


@contextlib.contextmanager
def _inference(model: AudioLLM, options: DecodingOptions):
    """Eval mode, no autograd, threads; yields the decoder to run (a merged copy when asked)."""
    threads = torch.get_num_threads()
    was_training = model.training
    if options.threads:
        torch.set_num_threads(options.threads)
    model.eval()
    try:
        with torch.inference_mode():
            if options.merge_lora:
                decoder = copy.deepcopy(model.decoder).merge_and_unload()  # exact for the model: a copy
                if options.precision == "bf16":
                    decoder = decoder.to(torch.bfloat16)
            else:
                decoder = model.decoder
            yield decoder
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def _decode(model: AudioLLM, decoder, batch: Batch, options: DecodingOptions) -> list[list[int]]:
    x = model.embed(batch, padding_side="left")
    embeds = x.inputs_embeds.to(decoder.get_input_embeddings().weight.dtype)
    if options.engine == "hf":
        out = decoder.generate(
            inputs_embeds=embeds, attention_mask=x.attention_mask, max_new_tokens=options.max_new_tokens,
            do_sample=not options.greedy, temperature=options.temperature if not options.greedy else None,
            top_k=None, top_p=None, repetition_penalty=options.repetition_penalty,
            eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
        )
        return [_until_eos(row.tolist(), model.eos_token_id) for row in out]
    return _decode_kv(decoder, embeds, x.attention_mask, x.position_ids, options, model.eos_token_id)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _decode_kv(decoder, embeds, mask, positions, options: DecodingOptions, eos: int) -> list[list[int]]:
    """Greedy/sampled decoding over a KV cache; finished rows leave the cache at once."""
    from transformers import DynamicCache

    n, device = embeds.shape[0], embeds.device
    out_ids: list[list[int]] = [[] for _ in range(n)]
    alive = torch.arange(n, device=device)  # batch row -> original row
    generated = torch.empty(n, 0, dtype=torch.long, device=device)  # [b, t] tokens so far, for the penalty
    next_pos = positions[:, -1] + 1  # [b]
    cache = DynamicCache(config=decoder.config)
    gen = torch.Generator(device=device).manual_seed(options.seed) if not options.greedy else None
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
    for _ in range(options.max_new_tokens):
        logits = out.logits[:, -1, :].float()  # [b, V]
        if options.repetition_penalty != 1.0 and generated.shape[1]:
            seen = logits.gather(1, generated)
            seen = torch.where(seen < 0, seen * options.repetition_penalty, seen / options.repetition_penalty)
            logits.scatter_(1, generated, seen)
        if options.greedy:
            token = logits.argmax(-1)  # [b]
        else:
            probs = torch.softmax(logits / options.temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        finished = token == eos
        for row, tok, done in zip(alive.tolist(), token.tolist(), finished.tolist()):
            if not done:
                out_ids[row].append(tok)
        if finished.all():
            break
        if finished.any():  # drop finished rows from every tensor and the cache
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, token, mask = alive[keep], token[keep], mask[keep]
            generated, next_pos = generated[keep], next_pos[keep]
        generated = torch.cat([generated, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                      past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return out_ids


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, task: str):
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        t = bar.add_task(f"generating {task}", total=total)
        yield lambda k: bar.advance(t, k)

