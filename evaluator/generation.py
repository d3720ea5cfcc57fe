"""Generate answers for a FeatureDataset with the trained model, fast.

XARES-LLM decodes greedily with repetition penalty 1.05 and at most 150 new tokens through the stock
Hugging Face ``generate``. This module keeps those settings and makes them cheap:

* the LoRA weights are folded into the decoder's own weights for as long as a `Generator` is open (one
  per run, not per task), and put back exactly afterwards from a host copy: no second decoder in memory;
* on a CPU, an incremental loop over a growing KV cache with left padding, which drops a row from the
  cache as soon as it emits EOS and stops when every row has (the stock loop keeps computing finished rows);
* on a GPU, large batches over a static KV cache whose decode step is captured once as a CUDA graph and
  replayed for every token (a batch-4 step is all kernel launches otherwise), checking for EOS every few
  steps instead of synchronising at each one;
* length-sorted batches inside a bounded buffer, predictions returned in dataset order with their keys.

``engine="hf"`` runs the stock ``generate`` instead (same settings), to cross-check and to benchmark::

    with Generator(model, DecodingOptions()) as gen:
        for task in tasks:
            preds = gen.generate(task)
    preds = generate(model, test_set)              # the same, for one dataset
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluator import compute
from evaluator.compute import COMPILE_MODES
from evaluator.data.specs import choose_prompt, prompt_draw
from evaluator.errors import ConfigError, DataError
from evaluator.model import AudioLLM, Batch, pack_inputs
from evaluator.progress import progress as progress_of

logger = logging.getLogger(__name__)

ENGINES = ("auto", "kv", "static", "hf")
PRECISIONS = ("fp32", "bf16")
CPU_BATCH, GPU_BATCH = 32, 256  # rows decoded together by default
EOS_CHECK_EVERY = 8  # static engine: decode steps between host checks for "every row has finished"


@dataclass(frozen=True)
class DecodingOptions:
    """Decoding settings; defaults are XARES-LLM's (greedy, penalty 1.05, 150 new tokens)."""

    greedy: bool = True  # False: sample (needs temperature > 0)
    temperature: float = 0.0  # sampling temperature; must stay 0 when greedy
    repetition_penalty: float = 1.05  # over the tokens generated so far (HF semantics); 1.0 = off
    max_new_tokens: int = 150
    batch_size: int | None = None  # rows decoded together; None: 32 on a CPU, 256 on a GPU (no effect on greedy answers)
    sort_batches: int = 16  # batches per length-sorted buffer (bounds memory, cuts padding)
    engine: str = "auto"  # auto (kv on a CPU, static on a GPU) | kv | static | hf (stock transformers generate)
    compile: str = "auto"  # static engine: capture the decode step as a graph: auto (CUDA only) | on | off
    compile_backend: str | None = None  # None: by device (compute.compiled); tests: aot_eager
    merge_lora: bool = True  # fold LoRA into the decoder's weights while decoding
    precision: str = "fp32"  # fp32 | bf16 (the decoder is cast to bfloat16 while decoding)
    seed: int = 0  # sampling only
    threads: int | None = None  # torch CPU threads while decoding; None: the cores this process may use

    def __post_init__(self):
        problems = []
        if self.greedy and self.temperature != 0.0:
            problems.append(f"greedy decoding ignores temperature={self.temperature}; set greedy=False to sample")
        if not self.greedy and self.temperature <= 0.0:
            problems.append("sampling (greedy=False) needs temperature > 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.max_new_tokens < 1 or (self.batch_size is not None and self.batch_size < 1) or self.sort_batches < 1:
            problems.append("max_new_tokens, batch_size and sort_batches must be >= 1")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES} (got {self.engine!r})")
        if self.compile not in COMPILE_MODES:
            problems.append(f"compile must be one of {COMPILE_MODES} (got {self.compile!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.precision == "bf16" and not self.merge_lora:
            problems.append("precision='bf16' casts the merged decoder; it needs merge_lora=True")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 or None (got {self.threads})")
        if problems:
            raise ConfigError("invalid decoding options: " + "; ".join(problems))


@dataclass(frozen=True)
class Prediction:
    key: str  # the sample's key in its dataset
    text: str  # decoded with special tokens skipped, stripped


class Generator:
    """The model set up for decoding (eval mode, LoRA merged, threads, graphs) for as long as it is open.

    Open one per run and decode every task through it: setting up and restoring cost a pass over the
    weights, and captured graphs are reused from task to task.
    """

    def __init__(self, model: AudioLLM, options: DecodingOptions = DecodingOptions()):
        self.model, self.options = model, options
        self.device = model.projector.weight.device
        engine = options.engine
        if engine == "auto":
            engine = "static" if self.device.type == "cuda" else "kv"
        self.engine = engine
        self.batch_size = options.batch_size or (GPU_BATCH if self.device.type == "cuda" else CPU_BATCH)
        self._stack = contextlib.ExitStack()
        self._steps: dict[int, tuple] = {}  # static engine: batch -> (cache, its length, decode step)
        self.decoder = None

    def __enter__(self) -> Generator:
        # fp32 decoding stays IEEE fp32 on a GPU too (no TF32): answers as close to the CPU's as a GPU gives
        self._stack.enter_context(compute.execution(self.device, deterministic=False, threads=self.options.threads,
                                                    tf32=self.options.precision == "bf16"))
        self._stack.enter_context(_eval_mode(self.model))
        self._stack.enter_context(compute.graph_cache())
        self.decoder = self._stack.enter_context(_prepared_decoder(self.model, self.options))
        self._stack.enter_context(torch.inference_mode())
        return self

    def __exit__(self, *exc) -> None:
        self._steps.clear()
        self._stack.close()

    def generate(self, dataset, progress: bool = True) -> list[Prediction]:
        """Decode one answer per item of ``dataset``.

        Args:
            dataset: a FeatureDataset (task, prompt, len, key(i), features(i), targets(i), sample_prompt(i));
                a prompt list gives each clip the prompt `prompt_draw` of its key picks.
            progress: show a progress bar.

        Returns:
            One Prediction per item, in dataset order.

        Raises:
            DataError: an item's features have the wrong shape or non-finite values.
        """
        if self.decoder is None:
            raise RuntimeError("Generator.generate outside its `with` block")
        model, n = self.model, len(dataset)
        texts: list[str | None] = [None] * n
        prompts = [model.prompt_ids(choose_prompt(dataset.prompt, dataset.sample_prompt(i),
                                                  draw=prompt_draw(dataset.key(i)))) for i in range(n)]
        buffer = self.batch_size * self.options.sort_batches
        with progress_of(f"generating {dataset.task}", total=n, unit="answers", enabled=progress) as bar:
            for start in range(0, n, buffer):
                idx = list(range(start, min(n, start + buffer)))
                feats = {i: _features(model, dataset, i) for i in idx}
                idx.sort(key=lambda i: -feats[i].shape[0])  # longest first: the slowest batch shows early
                for b in range(0, len(idx), self.batch_size):
                    rows = idx[b : b + self.batch_size]
                    batch = Batch(features=[feats[i] for i in rows], prompt_ids=[prompts[i] for i in rows])
                    for i, ids in zip(rows, self._decode(batch)):
                        texts[i] = model.decode(ids)
                    bar.advance(len(rows))
        return [Prediction(key=dataset.key(i), text=t) for i, t in enumerate(texts)]

    def _decode(self, batch: Batch) -> list[list[int]]:
        model, options, decoder = self.model, self.options, self.decoder
        if self.engine == "static":
            return self._decode_static(batch)
        x = model.embed(batch, padding_side="left")
        embeds = x.inputs_embeds.to(decoder.get_input_embeddings().weight.dtype)
        if self.engine == "hf":
            out = decoder.generate(
                inputs_embeds=embeds, attention_mask=x.attention_mask, max_new_tokens=options.max_new_tokens,
                do_sample=not options.greedy, temperature=options.temperature if not options.greedy else None,
                top_k=None, top_p=None, repetition_penalty=options.repetition_penalty,
                eos_token_id=model.eos_token_id, pad_token_id=model.pad_token_id,
            )
            return [_until_eos(row.tolist(), model.eos_token_id) for row in out]
        return _decode_kv(decoder, embeds, x.attention_mask, x.position_ids, options, model.eos_token_id)

    def _decode_static(self, batch: Batch) -> list[list[int]]:
        """Fixed shapes from end to end: the batch is filled up to `batch_size` rows (copies of its first,
        whose answers are dropped), the prompt is left-padded to a length bucket, and finished rows keep
        decoding (masked) until all have finished. One cache serves the whole run: it only grows (and the
        step is captured again) when a longer prompt than any before arrives, so a run captures a handful
        of graphs, not one per batch or task."""
        model, options = self.model, self.options
        real = len(batch.features)
        fill = self.batch_size - real
        padded = Batch(features=batch.features + [batch.features[0]] * fill,
                       prompt_ids=batch.prompt_ids + [batch.prompt_ids[0]] * fill)
        collated = model.collate(padded, "left", bucket=True)
        x = model.inputs(collated)
        embeds = x.inputs_embeds.to(self.decoder.get_input_embeddings().weight.dtype)
        cache, length, step = self._static_step(self.batch_size, embeds.shape[1] + options.max_new_tokens)
        ids = _decode_static(self.decoder, cache, length, step, embeds, x.attention_mask, x.position_ids, options,
                             model.eos_token_id)
        return ids[:real]

    def _static_step(self, batch: int, length: int):
        """The run's static cache (grown to hold ``length`` positions) and its (captured) decode step."""
        from transformers import StaticCache

        current = self._steps.get(batch)
        if current is None or current[1] < length:
            self._steps.clear()  # drop the smaller cache first: one for 256 rows can hold gigabytes
            cache = StaticCache(config=self.decoder.config, max_cache_len=length)
            decoder = self.decoder

            def step(token, position, cache_position, mask):
                out = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                              past_key_values=cache, cache_position=cache_position, use_cache=True)
                return out.logits[:, -1, :].float()

            if compute.use_compile(self.options.compile, self.device):
                # inductor's CUDA graphs (exact=False) write the static cache in place; the plain
                # `cudagraphs` backend would copy it as an input. fp32 stays IEEE fp32, fused differently.
                fast = compute.compiled(step, device=self.device, exact=False, backend=self.options.compile_backend,
                                        dynamic=False)
                step = compute.Fallback(fast, step, "generation")
            self._steps[batch] = (cache, length, step)
        return self._steps[batch]


class PackedGenerator(Generator):
    """Decodes for several jobs of a pack at once: rows of different jobs share a batch and the frozen
    decoder, each row through its own job's projector and (unmerged) LoRA weights.

    Greedy answers are those of each job's solo `Generator` up to float rounding: the solo run folds
    LoRA into the weights, a pack adds it beside them, so a near-tie can go the other way::

        with PackedGenerator(pack, [job_a, job_b], DecodingOptions()) as gen:
            preds_a, preds_b = gen.generate_many([test_a, test_b])
    """

    def __init__(self, pack, jobs, options: DecodingOptions = DecodingOptions()):
        if options.engine == "hf" or not options.merge_lora:
            raise ConfigError("a pack decodes with its own engines (kv, static), LoRA beside the weights")
        # graphs are not captured over the per-row LoRA routing: each step runs eagerly
        super().__init__(jobs[0], dataclasses.replace(options, compile="off"))
        self.pack, self.jobs = pack, list(jobs)

    def __enter__(self) -> PackedGenerator:
        self._stack.enter_context(compute.execution(self.device, deterministic=False, threads=self.options.threads,
                                                    tf32=self.options.precision == "bf16"))
        self._stack.enter_context(_eval_mode(self.pack.decoder))
        if self.options.precision == "bf16":
            self._stack.enter_context(_cast(self.pack.decoder, torch.bfloat16))
        self.decoder = self.pack.decoder
        self.route = self.pack.eval_route(self.jobs)
        self._stack.callback(self.pack.use, None)
        self.pack.use(self.route)
        self._stack.enter_context(torch.inference_mode())
        return self

    def generate_many(self, datasets, progress: bool = True) -> list[list[Prediction] | None]:
        """One answer per item of each job's dataset (None: nothing to decode for that job).

        Raises:
            DataError: an item's features have the wrong shape or non-finite values.
        """
        if self.decoder is None:
            raise RuntimeError("PackedGenerator.generate_many outside its `with` block")
        items = [(k, i) for k, ds in enumerate(datasets) if ds is not None for i in range(len(ds))]
        prompts = {(k, i): self.jobs[k].prompt_ids(choose_prompt(datasets[k].prompt, datasets[k].sample_prompt(i),
                                                                 draw=prompt_draw(datasets[k].key(i))))
                   for k, i in items}
        texts: dict[tuple[int, int], str] = {}
        buffer = self.batch_size * self.options.sort_batches
        label = next(ds.task for ds in datasets if ds is not None) if items else ""
        with progress_of(f"generating {label}", total=len(items), unit="answers", enabled=progress) as bar:
            for start in range(0, len(items), buffer):
                chunk = items[start : start + buffer]
                feats = {(k, i): _features(self.jobs[k], datasets[k], i) for k, i in chunk}
                chunk.sort(key=lambda ki: -feats[ki].shape[0])
                for b in range(0, len(chunk), self.batch_size):
                    rows = chunk[b : b + self.batch_size]
                    for ki, ids in zip(rows, self._decode_rows(rows, feats, prompts)):
                        texts[ki] = self.jobs[ki[0]].decode(ids)
                    bar.advance(len(rows))
        return [None if ds is None else [Prediction(key=ds.key(i), text=texts[k, i]) for i in range(len(ds))]
                for k, ds in enumerate(datasets)]

    def _decode_rows(self, rows, feats, prompts) -> list[list[int]]:
        """Decode rows (job, item) of any jobs: each job's rows collated and embedded its own way, then
        left-padded to one length; the route maps each row to its job's LoRA."""
        static = self.engine == "static"
        real = len(rows)
        if static:  # fixed shapes: fill up with copies of the first row, answers dropped
            rows = list(rows) + [rows[0]] * (self.batch_size - real)
        order = sorted(range(len(rows)), key=lambda r: rows[r][0])  # rows grouped by job
        parts, row_job = [], []
        for k in sorted({rows[r][0] for r in order}):
            mine = [rows[r] for r in order if rows[r][0] == k]
            batch = Batch(features=[feats[ki] for ki in mine], prompt_ids=[prompts[ki] for ki in mine])
            job = self.jobs[k]
            parts.append(pack_inputs(job.projector, self.decoder.get_input_embeddings(),
                                     job.collate(batch, "left", bucket=static)))
            row_job += [k] * len(mine)
        length = max(x.inputs_embeds.shape[1] for x in parts)
        embeds = torch.cat([nn.functional.pad(x.inputs_embeds, (0, 0, length - x.inputs_embeds.shape[1], 0))
                            for x in parts])
        mask = torch.cat([nn.functional.pad(x.attention_mask, (length - x.attention_mask.shape[1], 0)) for x in parts])
        positions = torch.cat([nn.functional.pad(x.position_ids, (length - x.position_ids.shape[1], 0)) for x in parts])
        embeds = embeds.to(self.decoder.get_input_embeddings().weight.dtype)
        self.route.row_job = torch.tensor(row_job, dtype=torch.long, device=self.device)
        eos = self.jobs[0].eos_token_id
        if static:
            cache, total, step = self._static_step(self.batch_size, length + self.options.max_new_tokens)
            ids = _decode_static(self.decoder, cache, total, step, embeds, mask, positions, self.options, eos)
        else:
            ids = _decode_kv(self.decoder, embeds, mask, positions, self.options, eos, on_select=self.route.select)
        by_row = dict(zip(order, ids))
        return [by_row[r] for r in range(real)]


def generate(model: AudioLLM, dataset, options: DecodingOptions = DecodingOptions(), progress: bool = True) -> list[Prediction]:
    """Decode one answer per item of ``dataset`` (a one-dataset `Generator`).

    Args:
        model: trained `AudioLLM` (left as it was).
        dataset: a FeatureDataset (task, prompt, len, key(i), features(i), targets(i), sample_prompt(i)).
        options: decoding settings.
        progress: show a progress bar.

    Returns:
        One Prediction per item, in dataset order.

    Raises:
        DataError: an item's features have the wrong shape or non-finite values.
    """
    if len(dataset) == 0:
        return []
    with Generator(model, options) as gen:
        return gen.generate(dataset, progress=progress)


def _features(model: AudioLLM, dataset, i: int) -> torch.Tensor:
    feats = np.array(dataset.features(i), dtype=np.float32)  # a copy: torch wants writable memory
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != model.config.encoder_dim:
        raise DataError(f"task {dataset.task}, item {dataset.key(i)}: features have shape {feats.shape}, "
                        f"expected [T>0, {model.config.encoder_dim}]")
    if not np.isfinite(feats).all():
        raise DataError(f"task {dataset.task}, item {dataset.key(i)}: features contain NaN or Inf")
    return torch.from_numpy(feats)


@contextlib.contextmanager
def _eval_mode(model: AudioLLM):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _prepared_decoder(model: AudioLLM, options: DecodingOptions):
    """The decoder to run: LoRA merged into its weights (and cast to bf16) in place, restored exactly after.

    Merging and casting in place avoids a second copy of the decoder on the device; a host copy of the
    weights puts back the very same bits afterwards (un-merging by subtraction would leave rounding).
    """
    decoder = model.decoder
    if not options.merge_lora:
        yield decoder
        return
    with _restored(decoder):
        with torch.no_grad():
            decoder.merge_adapter()
            if options.precision == "bf16":
                decoder.to(torch.bfloat16)
        try:
            yield decoder
        finally:
            with torch.no_grad():
                decoder.unmerge_adapter()  # resets peft's merged flags; the weights come from the backup


@contextlib.contextmanager
def _cast(decoder, dtype: torch.dtype):
    """The decoder's weights in ``dtype`` for a while, the very same bits put back afterwards."""
    with _restored(decoder):
        with torch.no_grad():
            decoder.to(dtype)
        yield decoder


@contextlib.contextmanager
def _restored(decoder):
    """Whatever happens to the decoder's weights and buffers inside (a merge, a cast), the very same bits
    (and dtypes) come back afterwards, from a host copy, into the same parameters and buffers."""
    def tensors():
        return dict(decoder.named_parameters()) | dict(decoder.named_buffers())

    with torch.no_grad():
        backup = {name: t.detach().to("cpu", copy=True) for name, t in tensors().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, t in tensors().items():
                if t.dtype != backup[name].dtype:
                    t.data = t.data.to(backup[name].dtype)
                t.copy_(backup[name])


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _decode_kv(decoder, embeds, mask, positions, options: DecodingOptions, eos: int,
               on_select=None) -> list[list[int]]:
    """Greedy/sampled decoding over a KV cache; finished rows leave the cache at once (``on_select(keep)``
    hears which rows stay, for a pack's row-to-job map)."""
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
            if on_select is not None:
                on_select(keep)
            alive, token, mask = alive[keep], token[keep], mask[keep]
            generated, next_pos = generated[keep], next_pos[keep]
        generated = torch.cat([generated, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                      past_key_values=cache, use_cache=True)
        next_pos = next_pos + 1
    return out_ids


def _decode_static(decoder, cache, length: int, step, embeds, mask, positions, options: DecodingOptions,
                   eos: int) -> list[list[int]]:
    """Greedy/sampled decoding over a static cache of ``length`` positions: every tensor keeps its shape
    from the first token to the last, so ``step`` can be a replayed graph. Same tokens as `_decode_kv`
    (tested): the unused tail of the cache is masked out."""
    n, prompt_len, device = embeds.shape[0], embeds.shape[1], embeds.device
    assert prompt_len + options.max_new_tokens <= length
    cache.reset()
    full_mask = torch.zeros(n, length, dtype=mask.dtype, device=device)
    full_mask[:, :prompt_len] = mask
    out = decoder(inputs_embeds=embeds, attention_mask=full_mask[:, :prompt_len], position_ids=positions,
                  past_key_values=cache, cache_position=torch.arange(prompt_len, device=device), use_cache=True,
                  logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    seen = torch.zeros_like(logits, dtype=torch.bool)  # [b, V] tokens generated so far, for the penalty
    tokens = torch.full((n, options.max_new_tokens), eos, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    gen = torch.Generator(device=device).manual_seed(options.seed) if not options.greedy else None
    for t in range(options.max_new_tokens):
        if options.repetition_penalty != 1.0 and t:
            penalised = torch.where(logits < 0, logits * options.repetition_penalty, logits / options.repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        if options.greedy:
            token = logits.argmax(-1)  # [b]
        else:
            token = torch.multinomial(torch.softmax(logits / options.temperature, dim=-1), 1, generator=gen).squeeze(1)
        token = torch.where(finished, eos, token)
        tokens[:, t] = token
        finished |= token == eos
        if t + 1 == options.max_new_tokens or ((t + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all())):
            break
        seen.scatter_(1, token[:, None], True)
        full_mask[:, prompt_len + t] = 1
        logits = step(token, next_pos, torch.tensor([prompt_len + t], device=device), full_mask)
        next_pos = next_pos + 1
    return [_until_eos(row, eos) for row in tokens.tolist()]
