"""Score generated text against targets the way XARES-LLM does.

Higher is better. Accuracy, mAP, iWER and iCER lie in [0, 1]; FENSE and DATE are left as mecat returns
them (a mean of cosine similarities can dip below 0, and the reference does not clamp it). The
registry ``METRICS`` is a plain dict;
``score(name, predictions, references, **kwargs)`` is the one entry point::

    from evaluator.metrics import score
    score("Accuracy", ["Dog barking"], [["dog barking", "dog"]])           # -> 0.5 (one sample per reference)
    score("mAP", ["dog;cat"], ["dog;bird"], num_classes=41)
    scorer = load_caption_scorer(MetricModels.from_env())                   # once per run
    score("FENSE", preds, refs, scorer=scorer)

Several references per sample. XARES-LLM turns every target of a clip into its own evaluation sample
(same audio, same greedy prediction), so every metric here, Accuracy included, is computed over
(prediction, reference) *pairs*: a clip with two references counts twice, and a prediction matching
one of them scores 1 of 2. That reproduces the reference's numbers.

FENSE and DATE use the ``mecat`` package (what the reference calls) with models read from local paths
only: nothing is ever downloaded. See `MetricModels`.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import string
import tempfile
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluator.errors import ConfigError, DataError, ModelError
from evaluator.fileio import sha256_file

logger = logging.getLogger(__name__)

# --- normalisation ---------------------------------------------------------------------------------

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")
LABEL_SEPARATOR = ";"  # multi-label targets and predictions for mAP


def normalize(text: str, *, keep_punctuation: bool = False) -> str:
    """XARES-LLM's text normalisation: NFKC, lower case, '-' -> ' ', drop punctuation, squeeze spaces.

    Args:
        text: raw prediction or target.
        keep_punctuation: keep ``string.punctuation`` (mAP needs its ';' separators).

    Returns:
        The normalised string.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("-", " ")
    if not keep_punctuation:
        text = text.translate(_DROP_PUNCTUATION)
    return _WHITESPACE.sub(" ", text).strip()


# --- input checks ----------------------------------------------------------------------------------

Reference = str | Sequence[str]


def _as_reference_lists(references: Sequence[Reference]) -> list[list[str]]:
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"reference {i} must be a string or a non-empty list of strings, got {ref!r}")
        out.append(refs)
    return out


def _check_inputs(name: str, predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"{name}: predictions and references must be sequences, one item per sample")
    if len(predictions) != len(references):
        raise ValueError(
            f"{name}: {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one (same samples, same order)"
        )
    if len(predictions) == 0:
        raise DataError(f"{name}: nothing to score (0 samples); the task's test split produced no samples")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"{name}: prediction {i} must be a string, got {type(p).__name__}")
    return _as_reference_lists(references)


def _pairs(predictions: Sequence[str], refs: list[list[str]]) -> tuple[list[str], list[str]]:
    """One (prediction, reference) pair per reference, as XARES-LLM's evaluation samples are."""
    preds, targets = [], []
    for p, rs in zip(predictions, refs):
        for r in rs:
            preds.append(p)
            targets.append(r)
    return preds, targets


# --- metrics ---------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], references: list[list[str]]) -> float:
    """Share of (prediction, reference) pairs whose normalised strings are equal (sklearn's accuracy_score)."""
    preds, targets = _pairs(predictions, references)
    return sum(normalize(p) == normalize(t) for p, t in zip(preds, targets)) / len(preds)


def mean_average_precision(
    predictions: Sequence[str], references: list[list[str]], *, num_classes: int | None = None
) -> float:
    """Macro average precision over ';'-separated labels, with hard 0/1 predictions.

    As in XARES-LLM: the label index holds the labels seen in the references (predicted labels not
    among them are ignored), the matrices are ``num_classes`` wide and the unused columns count as
    classes with no positives (sklearn gives them AP 0), so ``num_classes`` scales the result. Labels
    are not stripped after splitting ("a; b" holds " b"), as in the reference. The reference indexes a
    Python ``set``, whose order changes between processes; the macro mean does not depend on column
    order (only the float summation order, in the last bits), and we sort the labels to be exact.

    Raises:
        ConfigError: ``num_classes`` is missing or smaller than the number of distinct labels.
    """
    from sklearn.metrics import average_precision_score

    if num_classes is None or isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ConfigError(f"mAP needs an integer num_classes (metric_args: {{num_classes: N}}), got {num_classes!r}")
    preds, targets = _pairs(predictions, references)
    y_true = [normalize(t, keep_punctuation=True).split(LABEL_SEPARATOR) for t in targets]
    y_pred = [normalize(p, keep_punctuation=True).split(LABEL_SEPARATOR) for p in preds]
    labels = sorted({label for row in y_true for label in row})
    if len(labels) > num_classes:
        raise ConfigError(
            f"mAP: the references hold {len(labels)} distinct labels but num_classes={num_classes}; "
            f"raise num_classes in the task's metric_args (first labels: {labels[:5]})"
        )
    index = {label: i for i, label in enumerate(labels)}
    true = np.zeros((len(y_true), num_classes), dtype=np.float32)  # [N, C]
    pred = np.zeros((len(y_pred), num_classes), dtype=np.float32)  # [N, C]
    for row, (t, p) in enumerate(zip(y_true, y_pred)):
        true[row, [index[label] for label in t]] = 1.0
        pred[row, [index[label] for label in p if label in index]] = 1.0
    with warnings.catch_warnings():
        # Columns past the seen labels have no positives by design; sklearn warns about each of them.
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        return float(average_precision_score(true, pred))


def _error_rate_score(kind: str, predictions: Sequence[str], references: list[list[str]]) -> float:
    """max(0, 1 - corpus error rate) over normalised (prediction, reference) pairs, via jiwer.

    jiwer (>= 4) accepts empty strings: an empty reference adds no words, an empty prediction only
    deletions. When every reference is empty the error rate is 0 if every prediction is empty too,
    else 1 (what jiwer returns).
    """
    import jiwer

    preds, targets = _pairs(predictions, references)
    preds = [normalize(p) for p in preds]
    targets = [normalize(t) for t in targets]
    rate = jiwer.wer(targets, preds) if kind == "word" else jiwer.cer(targets, preds)
    return max(0.0, 1.0 - float(rate))


def iwer(predictions: Sequence[str], references: list[list[str]]) -> float:
    """1 - word error rate, floored at 0."""
    return _error_rate_score("word", predictions, references)


def icer(predictions: Sequence[str], references: list[list[str]]) -> float:
    """1 - character error rate, floored at 0."""
    return _error_rate_score("char", predictions, references)


# --- FENSE and DATE (mecat) ------------------------------------------------------------------------

ENV_SBERT = "XARES_FENSE_SBERT"
ENV_ECHECKER = "XARES_FENSE_ECHECKER"
ENV_ECHECKER_BACKBONE = "XARES_FENSE_ECHECKER_BACKBONE"
SBERT_NAME = "sentence-transformers/paraphrase-TinyBERT-L6-v2"
ECHECKER_NAME = "echecker_clotho_audiocaps_base"  # the name mecat looks up; its file is <name>.ckpt
ECHECKER_URL = "https://github.com/blmoistawinde/fense/releases/download/V0.1/echecker_clotho_audiocaps_base.ckpt"
ECHECKER_SHA256 = "1a719f090af70614bbdb9f9437530b7e133c48cfa4a58d964de0d47fc974a2fa"
MECAT_GROUP = "content_long"  # XARES-LLM calls mecat with task='caption', subtask='long'

_FENSE_DATA_LOCK = threading.Lock()  # mecat reads the checker's folder from $FENSE_DATA


@dataclass(frozen=True)
class MetricModels:
    """Local copies of the models FENSE and DATE need. Nothing is downloaded, ever."""

    sbert: Path | None = None  # folder of the sentence-transformers model paraphrase-TinyBERT-L6-v2
    error_checker: Path | None = None  # echecker_clotho_audiocaps_base.ckpt from the FENSE release
    error_checker_backbone: Path | None = None  # HF folder of the checker's model_type (else the HF cache)
    device: str | None = None  # "cpu", "cuda"; None lets mecat pick

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> MetricModels:
        """Read the paths from $XARES_FENSE_SBERT, $XARES_FENSE_ECHECKER, $XARES_FENSE_ECHECKER_BACKBONE."""
        env = os.environ if environ is None else environ

        def path(key: str) -> Path | None:
            return Path(env[key]).expanduser() if env.get(key) else None

        return cls(path(ENV_SBERT), path(ENV_ECHECKER), path(ENV_ECHECKER_BACKBONE))


class CaptionScorer:
    """FENSE and DATE with their models loaded once; build it with `load_caption_scorer`."""

    def __init__(self, evaluator, models: MetricModels):
        self._evaluator = evaluator  # mecat.DATE.DATEEvaluator
        self.models = models
        self._lock = threading.Lock()

    def __call__(self, kind: str, predictions: Sequence[str], references: list[list[str]]) -> float:
        preds, targets = _pairs(predictions, references)
        preds = [normalize(p) for p in preds]
        targets = [[normalize(t)] for t in targets]
        with self._lock:
            # One loaded DATE model serves both metrics: return_type only picks the output.
            self._evaluator.date_model.return_type = kind
            value = self._evaluator.corpus_score(preds, targets, agg_score="mean", group_name=MECAT_GROUP)
        return float(value)


def _missing(what: str, how: str) -> ModelError:
    return ModelError(f"FENSE/DATE need {what}, which is not available locally (nothing is downloaded). {how}")


def _resolve_backbone(model_type: str, override: Path | None) -> Path:
    if override is not None:
        if not override.is_dir():
            raise _missing(f"the error checker's backbone at {override}", f"Point {ENV_ECHECKER_BACKBONE} at a folder.")
        return override
    if Path(model_type).is_dir():
        return Path(model_type)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_type, local_files_only=True))
    except Exception as e:  # not in the local HF cache (or not a repo name at all)
        raise _missing(
            f"the error checker's backbone {model_type!r}",
            f"Download it once (huggingface-cli download {model_type}) or set {ENV_ECHECKER_BACKBONE}=DIR "
            "(or MetricModels(error_checker_backbone=DIR)).",
        ) from e




def load_caption_scorer(models: MetricModels) -> CaptionScorer:
    """Load the FENSE/DATE models from local paths, once per run.

    Args:
        models: where the sentence-BERT folder, the error-checker checkpoint and its backbone are.

    Returns:
        A `CaptionScorer` to pass to ``score(..., scorer=...)``.

    Raises:
        ModelError: a path is unset or missing, mecat is not installed, or the models fail to load.
    """
    if models.sbert is None or not models.sbert.is_dir():
        raise _missing(
            f"the sentence-BERT model {SBERT_NAME}" + (f" (no folder at {models.sbert})" if models.sbert else ""),
            f"Download it once (huggingface-cli download {SBERT_NAME} --local-dir DIR) and set {ENV_SBERT}=DIR "
            "(or MetricModels(sbert=DIR)).",
        )
    if models.error_checker is None or not models.error_checker.is_file():
        raise _missing(
            f"the FENSE error checker {ECHECKER_NAME}.ckpt"
            + (f" (no file at {models.error_checker})" if models.error_checker else ""),
            f"Download {ECHECKER_URL} once and set {ENV_ECHECKER}=FILE (or MetricModels(error_checker=FILE)).",
        )
    try:
        import torch

        threads = torch.get_num_threads()
        from loguru import logger as loguru_logger
        from mecat.DATE import DATEEvaluator  # sets torch threads to 1 on import: restored below

        torch.set_num_threads(threads)
        loguru_logger.disable("mecat")  # mecat logs every step at INFO; we stay quiet by default
    except ImportError as e:
        raise ModelError(
            f"FENSE/DATE need the mecat package ({e}); install it with: pip install -c constraints.txt mecat"
        ) from e

    if sha256_file(models.error_checker) != ECHECKER_SHA256:
        logger.warning("%s is not the official %s checkpoint: FENSE/DATE scores are not comparable with "
                       "the challenge's", models.error_checker, ECHECKER_NAME)
    states = torch.load(models.error_checker, map_location="cpu", weights_only=True)
    if not isinstance(states, dict) or not {"model_type", "num_classes", "state_dict"} <= set(states):
        raise ModelError(f"{models.error_checker} is not a FENSE error-checker checkpoint "
                         "(expected keys model_type, num_classes, state_dict)")
    backbone = _resolve_backbone(str(states["model_type"]), models.error_checker_backbone)
    try:
        with tempfile.TemporaryDirectory(prefix="xares-fense-") as tmp, _FENSE_DATA_LOCK:
            # mecat finds the checker as $FENSE_DATA/<name>.ckpt and downloads it when absent; we always
            # put it there, pointing model_type at a local folder, so it never reaches the network.
            torch.save({**states, "model_type": str(backbone)}, Path(tmp) / f"{ECHECKER_NAME}.ckpt")
            saved = os.environ.get("FENSE_DATA")
            os.environ["FENSE_DATA"] = tmp
            try:
                evaluator = DATEEvaluator(
                    device=models.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    sbert_model=str(models.sbert),
                    echecker_model=ECHECKER_NAME,
                    return_type="fense",
                )
            finally:
                if saved is None:
                    os.environ.pop("FENSE_DATA", None)
                else:
                    os.environ["FENSE_DATA"] = saved
                torch.set_num_threads(threads)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"could not load the FENSE/DATE models ({models}): {type(e).__name__}: {e}") from e
    return CaptionScorer(evaluator, models)


def _caption_metric(kind: str) -> Callable[..., float]:
    def metric(predictions: Sequence[str], references: list[list[str]], *, scorer: CaptionScorer | None = None):
        if scorer is None:
            raise ModelError(
                f"{kind.upper()} needs its models: load them once per run with "
                f"evaluator.metrics.load_caption_scorer(MetricModels(sbert=DIR, error_checker=FILE)) (or "
                f"MetricModels.from_env(), reading ${ENV_SBERT} and ${ENV_ECHECKER}) and pass scorer=..."
            )
        return scorer(kind, predictions, references)

    metric.__name__ = kind
    metric.__doc__ = f"mecat's {kind.upper()} (content_long), over (prediction, reference) pairs."
    return metric


# --- registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    fn: Callable[..., float]  # (predictions, references: list[list[str]], **kwargs) -> float
    higher_is_better: bool = True
    needs_models: bool = False  # needs a CaptionScorer (see load_caption_scorer)
    kwargs: tuple[str, ...] = ()  # keyword arguments it accepts


METRICS: dict[str, Metric] = {
    "Accuracy": Metric(accuracy),
    "mAP": Metric(mean_average_precision, kwargs=("num_classes",)),
    "iWER": Metric(iwer),
    "iCER": Metric(icer),
    "FENSE": Metric(_caption_metric("fense"), needs_models=True, kwargs=("scorer",)),
    "DATE": Metric(_caption_metric("date"), needs_models=True, kwargs=("scorer",)),
}


def get_metric(name: str) -> Metric:
    """The registry entry for ``name``.

    Raises:
        ConfigError: unknown name (the message suggests close matches and lists the known ones).
    """
    if name in METRICS:
        return METRICS[name]
    folded = {k.lower(): k for k in METRICS}
    close = difflib.get_close_matches(name.lower(), list(folded), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(folded[c]) for c in close)}? " if close else ""
    raise ConfigError(f"unknown metric {name!r}; {hint}available: {', '.join(METRICS)}")


def score(name: str, predictions: Sequence[str], references: Sequence[Reference], **kwargs) -> float:
    """Score predictions against references with metric ``name``.

    Args:
        name: a key of ``METRICS`` (Accuracy, mAP, iWER, iCER, FENSE, DATE).
        predictions: one generated string per sample.
        references: per sample, a string or a list of valid strings.
        **kwargs: ``num_classes`` for mAP; ``scorer`` (from `load_caption_scorer`) for FENSE/DATE.
            Keyword arguments the metric does not take are ignored for ``None`` values only.

    Returns:
        The score, higher is better: in [0, 1], except FENSE and DATE, which may be negative (down to -1).

    Raises:
        ConfigError: unknown metric, unknown or missing metric argument.
        DataError: no samples.
        ModelError: FENSE/DATE without their models.
        ValueError, TypeError: predictions and references do not pair up (a caller's bug).
    """
    metric = get_metric(name)
    unknown = sorted(k for k, v in kwargs.items() if k not in metric.kwargs and v is not None)
    if unknown:
        raise ConfigError(f"metric {name} takes no argument {', '.join(unknown)} (it takes: "
                          f"{', '.join(metric.kwargs) or 'none'})")
    refs = _check_inputs(name, predictions, references)
    value = float(metric.fn(list(predictions), refs, **{k: v for k, v in kwargs.items() if k in metric.kwargs}))
    if not math.isfinite(value):
        raise DataError(f"{name}: the metric returned {value} (not a number)")
    return value


def chance_level(name: str, references: Sequence[list[str]], **kwargs) -> float:
    """The score of always giving the most frequent (first) reference: the bar a decoder must clear.

    Raises:
        as `score` (no references: DataError).
    """
    if not references:
        raise DataError(f"{name}: no references to take a chance level from")
    majority = Counter(r[0] for r in references).most_common(1)[0][0]
    return score(name, [majority] * len(references), references, **kwargs)
