"""Metrics on hand-checked cases; FENSE/DATE through mecat with tiny models built here."""

from __future__ import annotations

import math

import pytest

from evaluator.errors import ConfigError, DataError, ModelError
from evaluator.metrics import METRICS, MetricModels, get_metric, load_caption_scorer, normalize, score


class TestNormalize:
    @pytest.mark.parametrize(
        "raw, expected",
        [
            ("  Dog   Barking!! ", "dog barking"),
            ("Hip-Hop", "hip hop"),  # hyphen becomes a space before punctuation goes
            ("ＡＢＣ１２", "abc12"),  # NFKC folds full-width forms
            ("ﬁne", "fine"),  # NFKC ligature
            ("it's  a\tcat.\n", "its a cat"),
            ("---", ""),
        ],
    )
    def test_default(self, raw, expected):
        assert normalize(raw) == expected

    def test_keep_punctuation_for_map(self):
        assert normalize("Dog; Cat-Purr.", keep_punctuation=True) == "dog; cat purr."


class TestAccuracy:
    def test_exact_match_after_normalisation(self):
        # hits: "Dog!" == "dog" (1), "a cat" != "cat" (0), "Hip-hop" == "hip hop" (1) -> 2/3
        assert score("Accuracy", ["Dog!", "a cat", "Hip-hop"], ["dog", "cat", "hip hop"]) == pytest.approx(2 / 3)

    def test_one_sample_per_reference(self):
        # as XARES-LLM: (hound, dog) 0, (hound, Hound) 1, (bird, cat) 0, (bird, fish) 0 -> 1/4
        assert score("Accuracy", ["hound", "bird"], [["dog", "Hound"], ["cat", "fish"]]) == 0.25
        # a clip with three references weighs three times a clip with one
        assert score("Accuracy", ["a", "b"], [["a", "a", "a"], ["x"]]) == 0.75

    def test_matches_sklearn_over_expanded_pairs(self):
        from sklearn.metrics import accuracy_score

        preds, refs = ["Dog", "cat!", "", "hip-hop"], [["dog", "hound"], ["cat"], [""], ["hip hop", "rap", "x"]]
        flat_p = [normalize(p) for p, rs in zip(preds, refs) for _ in rs]
        flat_t = [normalize(r) for rs in refs for r in rs]
        assert score("Accuracy", preds, refs) == pytest.approx(accuracy_score(flat_t, flat_p))

    def test_empty_prediction_matches_only_empty_reference(self):
        assert score("Accuracy", ["", "!"], ["", "x"]) == 0.5  # "!" normalises to "" != "x"


class TestMAP:
    def test_hand_checked(self):
        # labels seen in references (sorted): bird, dog; num_classes=4 -> columns bird, dog, -, -
        # true: [1,1,0,0], [1,0,0,0]      pred ("cat" unseen, ignored): [0,1,0,0], [1,0,0,0]
        # AP(bird): pred [0,1] vs true [1,1]: at threshold 1 P=1 R=.5, at 0 P=1 R=1 -> AP = 1
        # AP(dog): pred [1,0] vs true [1,0] -> 1; empty columns -> 0.  macro = (1 + 1 + 0 + 0) / 4 = 0.5
        assert score("mAP", ["dog;cat", "bird"], ["dog;bird", "bird"], num_classes=4) == pytest.approx(0.5)
        # the same data with num_classes == number of labels: (1 + 1) / 2
        assert score("mAP", ["dog;cat", "bird"], ["dog;bird", "bird"], num_classes=2) == pytest.approx(1.0)

    def test_partial_credit(self):
        # labels a, b. true a: [1,0,1], pred a: [1,1,0] -> ranked: two at score 1 (one positive), one at 0
        #   AP(a) = R-steps: at thr 1 P=1/2 R=1/2; at thr 0 P=2/3 R=1 -> 0.5*0.5 + 0.5*(2/3) = 7/12
        # true b: [0,1,0], pred b: [0,0,1] -> at thr 1 P=0 R=0; at thr 0 P=1/3 R=1 -> AP = 1/3
        # macro over 2 columns = (7/12 + 4/12) / 2 = 11/24
        got = score("mAP", ["a", "a", "b"], ["a", "b", "a"], num_classes=2)
        assert got == pytest.approx(11 / 24)

    def test_normalised_without_dropping_separators(self):
        # "Dog;Cat-Purr" -> "dog;cat purr": two labels, matched exactly
        assert score("mAP", ["DOG;cat-purr"], ["Dog;Cat-Purr"], num_classes=2) == pytest.approx(1.0)

    def test_label_order_does_not_change_the_value(self):
        preds, refs = ["x;y", "z", "y"], ["x", "y;z", "z"]
        base = score("mAP", preds, refs, num_classes=5)
        # renaming labels changes their sorted column order, never the macro mean
        renamed = {"x": "c", "y": "b", "z": "a"}

        def swap(s):
            return ";".join(renamed[p] for p in s.split(";"))

        assert score("mAP", [swap(p) for p in preds], [swap(r) for r in refs], num_classes=5) == pytest.approx(base)

    def test_num_classes_required_and_large_enough(self):
        with pytest.raises(ConfigError, match="num_classes"):
            score("mAP", ["a"], ["a"])
        with pytest.raises(ConfigError, match="3 distinct labels but num_classes=2"):
            score("mAP", ["a"], ["a;b;c"], num_classes=2)


class TestErrorRates:
    def test_iwer_hand_checked(self):
        # refs "the cat sat" (3 words) + "on the mat" (3): hyp 1 has 1 substitution, hyp 2 one deletion
        # WER = 2 / 6 -> iWER = 2/3 (normalisation removes "!" and case first)
        assert score("iWER", ["The dog sat!", "on mat"], ["the cat sat", "on the mat"]) == pytest.approx(2 / 3)

    def test_icer_hand_checked(self):
        # "abcd" vs "abxd": 1 substitution over 4 characters -> iCER = 0.75
        assert score("iCER", ["abxd"], ["abcd"]) == pytest.approx(0.75)

    def test_floored_at_zero(self):
        # 1 reference word, 4 hypothesis words: 1 substitution + 3 insertions -> WER 4 -> iWER 0
        assert score("iWER", ["a b c d"], ["x"]) == 0.0

    def test_empty_strings_do_not_crash(self):
        assert score("iWER", [""], ["hello world"]) == 0.0  # two deletions: WER 1
        assert score("iWER", ["", "a"], ["", "a"]) == 1.0
        assert score("iCER", ["x"], [""]) == 0.0  # all references empty, prediction not: error rate 1
        assert score("iCER", [""], [""]) == 1.0

    def test_several_references_are_pairs(self):
        # pairs (a b, a b) and (a b, a c): errors 0 + 1 over 2 + 2 words -> WER 1/4 -> iWER 0.75
        assert score("iWER", ["a b"], [["a b", "a c"]]) == pytest.approx(0.75)


class TestRegistry:
    def test_entries(self):
        assert set(METRICS) == {"Accuracy", "mAP", "iWER", "iCER", "FENSE", "DATE"}
        assert all(m.higher_is_better for m in METRICS.values())
        assert {n for n, m in METRICS.items() if m.needs_models} == {"FENSE", "DATE"}

    def test_unknown_name_suggests(self):
        with pytest.raises(ConfigError) as e:
            get_metric("accuracy_score")
        assert "'Accuracy'" in str(e.value) and "available: Accuracy, mAP" in str(e.value)

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="2 predictions but 1 references"):
            score("Accuracy", ["a", "b"], ["a"])

    def test_no_samples(self):
        with pytest.raises(DataError, match="0 samples"):
            score("Accuracy", [], [])

    def test_caption_scores_are_not_clamped(self):
        # FENSE/DATE (a mean of cosine similarities) can be negative; the reference reports them as they are
        seen = []

        def scorer(kind, preds, refs):
            seen.append((kind, preds, refs))
            return -0.25

        assert score("FENSE", ["a b"], [["c", "d"]], scorer=scorer) == -0.25
        assert score("DATE", ["a b"], ["c"], scorer=scorer) == -0.25
        assert seen[0] == ("fense", ["a b"], [["c", "d"]])
        with pytest.raises(DataError, match="not a number"):
            score("FENSE", ["a"], ["b"], scorer=lambda *a: float("nan"))

    def test_bad_reference_and_argument(self):
        with pytest.raises(ValueError, match="reference 0"):
            score("Accuracy", ["a"], [[]])
        with pytest.raises(ConfigError, match="takes no argument num_classes"):
            score("Accuracy", ["a"], ["a"], num_classes=3)
        with pytest.raises(TypeError, match="sequences"):
            score("Accuracy", "ab", "ab")


class TestCaptionModelsMissing:
    def test_score_without_scorer(self):
        with pytest.raises(ModelError, match="load_caption_scorer"):
            score("FENSE", ["a dog"], ["a dog barks"])
        with pytest.raises(ModelError, match="DATE needs its models"):
            score("DATE", ["a dog"], ["a dog barks"])

    def test_unset_paths_say_how_to_fix(self, tmp_path):
        with pytest.raises(ModelError, match="XARES_FENSE_SBERT"):
            load_caption_scorer(MetricModels())
        with pytest.raises(ModelError, match=r"no folder at .*nowhere"):
            load_caption_scorer(MetricModels(sbert=tmp_path / "nowhere"))
        with pytest.raises(ModelError, match=r"echecker_clotho_audiocaps_base\.ckpt.*XARES_FENSE_ECHECKER"):
            load_caption_scorer(MetricModels(sbert=tmp_path))

    def test_from_env(self, tmp_path):
        m = MetricModels.from_env({"XARES_FENSE_SBERT": str(tmp_path), "XARES_FENSE_ECHECKER": ""})
        assert m.sbert == tmp_path and m.error_checker is None and m.error_checker_backbone is None


# --- FENSE and DATE with real (tiny, locally built) models ----------------------------------------

CAPTIONS = ["a dog barks loudly", "music plays softly in the background", "a man speaks", "rain falls on a roof"]


@pytest.fixture(scope="module")
def tiny_caption_models(tmp_path_factory):
    """A 1-layer BERT + WordPiece tokenizer, a sentence-transformers folder on it, and an error checker
    checkpoint in the FENSE release format whose classifier never flags an error (bias -10)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mecat")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("caption_models")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(CAPTIONS * 3 + ["birds sing a cat"], vocab_size=200, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=300)
    bert = root / "bert"
    BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    SentenceTransformer(modules=[Transformer(str(bert)), Pooling(32, "mean")]).save(str(root / "sbert"))

    from mecat.DATE import BERTFlatClassifier

    checker = BERTFlatClassifier(str(bert), num_classes=5)
    torch.nn.init.zeros_(checker.clf.weight)
    torch.nn.init.constant_(checker.clf.bias, -10.0)  # sigmoid(-10) << 0.9: no caption is penalised
    ckpt = root / "echecker.ckpt"
    torch.save({"model_type": "bert-base-uncased", "num_classes": 5, "state_dict": checker.state_dict()}, ckpt)
    return root


@pytest.mark.slow
class TestCaptionMetrics:
    def test_backbone_not_local_is_a_model_error(self, tiny_caption_models):
        m = tiny_caption_models
        with pytest.raises(ModelError, match="bert-base-uncased.*XARES_FENSE_ECHECKER_BACKBONE"):
            load_caption_scorer(MetricModels(sbert=m / "sbert", error_checker=m / "echecker.ckpt"))

    def test_fense_is_mean_cosine_when_nothing_is_penalised(self, tiny_caption_models):
        import numpy as np
        import torch
        from sentence_transformers import SentenceTransformer

        m = tiny_caption_models
        threads = torch.get_num_threads()
        scorer = load_caption_scorer(MetricModels(sbert=m / "sbert", error_checker=m / "echecker.ckpt",
                                                  error_checker_backbone=m / "bert", device="cpu"))
        assert torch.get_num_threads() == threads  # importing mecat sets 1 thread; we restore it
        preds = ["A dog barks!", "rain falls", "a man speaks"]
        refs = [["a dog barks loudly"], ["birds sing", "rain falls on a roof"], "a man speaks"]
        got = score("FENSE", preds, refs, scorer=scorer)
        # FENSE without penalties = mean over (prediction, reference) pairs of the cosine similarity of
        # their sentence embeddings (normalised text); mecat rounds to 4 decimals.
        st = SentenceTransformer(str(m / "sbert"), device="cpu")
        pairs = [("a dog barks", "a dog barks loudly"), ("rain falls", "birds sing"),
                 ("rain falls", "rain falls on a roof"), ("a man speaks", "a man speaks")]
        a = st.encode([p for p, _ in pairs], normalize_embeddings=True)
        b = st.encode([r for _, r in pairs], normalize_embeddings=True)
        assert got == pytest.approx(float(np.mean(np.sum(a * b, axis=1))), abs=1e-4)
        assert score("FENSE", ["a man speaks"] * 2, ["a man speaks"] * 2, scorer=scorer) == pytest.approx(1.0, abs=1e-4)

        date = score("DATE", CAPTIONS, CAPTIONS, scorer=scorer)
        assert 0.0 <= date <= 1.0 and not math.isnan(date)
        # the shared model is switched back: FENSE again gives the same value
        assert score("FENSE", preds, refs, scorer=scorer) == got


def test_chance_level_is_the_score_of_the_most_frequent_answer():
    from evaluator.errors import DataError
    from evaluator.metrics import chance_level

    refs = [["dog"], ["dog"], ["cat"], ["bird", "dog"]]
    assert chance_level("Accuracy", refs) == pytest.approx(3 / 5)  # "dog" matches 3 of the 5 (clip, reference) pairs
    with pytest.raises(DataError):
        chance_level("Accuracy", [])
