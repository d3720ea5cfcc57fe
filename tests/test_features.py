"""The feature store on its own: keys, float16 round trip, atomic shards, resume, the dataset view."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from evaluator.errors import ConfigError, DataError, SubmissionError
from evaluator.features import DONE_NAME, Failure, FeatureRangeError, FeatureStore, PendingClip, StoreKey

SUB = "ab" * 32


def key(**kw) -> StoreKey:
    base = {"submission_sha256": SUB, "data_digests": ("02" * 32, "01" * 32), "task": "esc50", "split": "train",
                "window_seconds": 30.0}
    return StoreKey(**{**base, **kw})


def pending(n: int, *, dim: int = 6, seed: int = 0, start: int = 0) -> list[PendingClip]:
    rng = np.random.default_rng(seed)
    return [
        PendingClip(f"s.tar.gz/{i:03d}", i, rng.standard_normal((int(rng.integers(3, 40)), dim)).astype(np.float32),
                    1.0 + i, (f"dog;cat{i}",))
        for i in range(start, start + n)
    ]


class TestKey:
    def test_digest_is_stable_and_order_free(self):
        assert key().digest == key(data_digests=("01" * 32, "02" * 32)).digest
        assert key(settings=(("b", "2"), ("a", "1"))).digest == key(settings=(("a", "1"), ("b", "2"))).digest

    @pytest.mark.parametrize("change", [{"submission_sha256": "cd" * 32}, {"dtype": "float32"}, {"task": "x"},
                                        {"split": "eval"}, {"window_seconds": 10.0}, {"crop_seconds": 30.0},
                                        {"data_digests": ("01" * 32,)}, {"settings": (("label_keys", "a"),)}])
    def test_everything_that_changes_features_changes_the_digest(self, change):
        assert key(**change).digest != key().digest

    def test_bad_keys_are_refused(self):
        with pytest.raises(ConfigError, match="64 lower-case hex"):
            key(submission_sha256="abc")
        with pytest.raises(ConfigError, match="float16, float32"):
            key(dtype="int8")
        with pytest.raises(ConfigError, match="window_seconds"):
            key(window_seconds=0)

    def test_key_json_records_what_went_in(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        assert store.path.name == key().digest[:32]
        recorded = json.loads((store.path / "key.json").read_text())
        assert recorded["submission_sha256"] == SUB and recorded["task"] == "esc50" and recorded["dtype"] == "float16"
        assert FeatureStore.load(store.path).key == key()

    def test_a_foreign_key_json_is_refused(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        doc = json.loads((store.path / "key.json").read_text())
        (store.path / "key.json").write_text(json.dumps({**doc, "task": "tampered"}))
        with pytest.raises(DataError, match="different key.json"):
            FeatureStore.open(tmp_path, key())


class TestRoundTrip:
    def test_float16_round_trip_with_targets_and_order(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        clips = pending(7)
        store.write_shard(clips[4:])  # written out of data order on purpose
        store.write_shard(clips[:4], [Failure("s.tar.gz/999", 7, 2.0, "timeout", ("bird",))])
        store.finalize({"note": "test"})
        again = FeatureStore.open(tmp_path, key())
        assert again.complete and (again.path / DONE_NAME).exists()
        ds = again.dataset(prompt="Classify the environmental sound.")
        assert (ds.task, ds.prompt, len(ds)) == ("esc50", "Classify the environmental sound.", 7)
        for i, c in enumerate(clips):
            assert ds.key(i) == c.key and ds.targets(i) == c.targets and ds.seconds(i) == c.seconds
            f = ds.features(i)
            assert f.dtype == np.float16 and isinstance(f.base, np.memmap)  # lazy: a view of the shard
            np.testing.assert_array_equal(f, c.features.astype(np.float16))
            np.testing.assert_allclose(f, c.features, rtol=1e-3, atol=1e-3)
        assert ds.failed["s.tar.gz/999"].reason == "timeout" and ds.failed["s.tar.gz/999"].targets == ("bird",)
        assert again.bytes_stored == sum(p.stat().st_size for p in (again.path / "shards").glob("*.npy"))
        assert again.bytes_stored < sum(c.features.nbytes for c in clips)  # half of float32 plus headers
        assert again.verify() == [] and again.profile == {"note": "test"}
        clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers
        np.testing.assert_array_equal(clone.features(3), ds.features(3))
        with pytest.raises(IndexError):
            ds.features(7)

    def test_float32_store_keeps_float32(self, tmp_path):
        store = FeatureStore.open(tmp_path, key(dtype="float32"))
        clips = pending(2)
        store.write_shard(clips)
        np.testing.assert_array_equal(store.features(clips[1].key), clips[1].features)

    def test_values_beyond_float16_are_refused_with_a_fix(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        clips = pending(2)
        clips[1].features[0, 0] = 1e6
        with pytest.raises(FeatureRangeError, match="beyond float16") as e:
            store.write_shard(clips)
        assert isinstance(e.value, SubmissionError) and "--feature-dtype" in e.value.reasons[0]
        assert not list((store.path / "shards").iterdir())

    @pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
    def test_wide_dtypes_hold_what_float16_cannot(self, tmp_path, dtype):
        store = FeatureStore.open(tmp_path, key(dtype=dtype))
        clips = pending(2)
        clips[1].features[0, 0] = 7.1e4
        store.write_shard(clips)
        store.finalize({})
        reopened = FeatureStore.open(tmp_path, key(dtype=dtype))
        got = reopened.features(clips[1].key).astype(np.float32)
        rtol = 2**-8 if dtype == "bfloat16" else 0  # bfloat16 keeps 8 bits of mantissa
        np.testing.assert_allclose(got, clips[1].features, rtol=rtol, atol=0)
        ds = reopened.dataset(prompt="p")
        assert str(ds.features(1).dtype) == dtype and np.isfinite(np.asarray(ds.features(1), np.float32)).all()
        if dtype == "bfloat16":  # half float32's bytes
            assert (store.path / "shards" / "000000.npy").stat().st_size < 2 * 2 * sum(
                c.features.size for c in clips) + 256

    def test_an_incomplete_store_is_no_dataset(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        store.write_shard(pending(2))
        with pytest.raises(DataError, match="incomplete"):
            store.dataset(prompt="p")

    def test_corruption_is_detected(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        store.write_shard(pending(3))
        store.finalize({})
        npy = next((store.path / "shards").glob("*.npy"))
        data = bytearray(npy.read_bytes())
        data[-1] ^= 0xFF
        npy.write_bytes(bytes(data))
        assert "sha256 differs" in FeatureStore.load(store.path).verify()[0]


class TestAtomicity:
    def test_interrupted_writes_leave_only_finished_shards(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        store.write_shard(pending(3))
        store.write_shard(pending(2, start=3, seed=1))
        shards = store.path / "shards"
        # a crash mid-write: a temp file, an array whose index part never landed, a truncated array
        (shards / "000002.npy.tmp").write_bytes(b"half")
        (shards / "000002.npy").write_bytes(b"\x93NUMPY")
        truncated = shards / "000001.npy"
        truncated.write_bytes(truncated.read_bytes()[:-8])
        resumed = FeatureStore.open(tmp_path, key())
        assert not resumed.complete
        assert resumed.done_keys() == {f"s.tar.gz/{i:03d}" for i in range(3)}  # shard 1 is redone
        assert sorted(p.name for p in shards.iterdir()) == ["000000.json", "000000.npy"]
        resumed.write_shard(pending(2, start=3, seed=1))
        resumed.finalize({})
        assert len(FeatureStore.open(tmp_path, key()).dataset(prompt="p")) == 5

    def test_no_temp_files_remain_and_done_is_last(self, tmp_path):
        store = FeatureStore.open(tmp_path, key())
        store.write_shard(pending(2))
        assert not (store.path / DONE_NAME).exists() and not (store.path / "index.json").exists()
        store.finalize({})
        assert not list(store.path.rglob("*.tmp"))
        names = {p.name for p in store.path.iterdir()}
        assert names == {"key.json", "shards", "index.json", "profile.json", DONE_NAME}


class TestSharedRoot:
    def test_tasks_and_splits_share_one_root(self, tmp_path):
        for task, split in [("esc50", "train"), ("esc50", "eval"), ("gtzan", "train")]:
            s = FeatureStore.open(tmp_path, key(task=task, split=split))
            s.write_shard(pending(2))
            s.finalize({})
        FeatureStore.open(tmp_path, key(task="nsynth"))  # started, not finished
        found = [(s.key.task, s.key.split, s.complete) for s in FeatureStore.scan(tmp_path)]
        assert found == [("esc50", "eval", True), ("esc50", "train", True), ("gtzan", "train", True),
                         ("nsynth", "train", False)]
        assert FeatureStore.find(tmp_path, key(task="gtzan")) is not None
        assert FeatureStore.find(tmp_path, key(task="nsynth")) is None
