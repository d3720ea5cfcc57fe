"""The challenge score on hand-computed tables: max over machines, public/hidden halves, ties, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluator.errors import DataError
from evaluator.scoring import (
    Results,
    TaskResult,
    base_track,
    leaderboard,
    load_many,
    load_results,
    merge_machines,
    parse_results,
    results_document,
    track_score,
)

RESOURCES = Path(__file__).parent / "resources" / "results"


def task(name, score, hidden=False, failed=False, machine="m1", metric="Accuracy"):
    return TaskResult(name, hidden, metric, 0.0 if failed else score, 10, failed=failed, machine=machine)


def results(sub, machine, track, *tasks, sha=None):
    tasks = tuple(TaskResult(t.task, t.hidden, t.metric, t.score, t.n_samples, t.failed, t.error, machine)
                  for t in tasks)
    return Results(sub, sha or sub * 8, machine, track, tasks, source=f"{sub}-{track}-{machine}.json")


class TestTrackScore:
    def test_public_and_hidden_halves(self):
        # public mean (0.8 + 0.4) / 2 = 0.6; hidden mean (0.3 + 0.1 + 0.2) / 3 = 0.2; score (0.6 + 0.2) / 2 = 0.4
        s = track_score([task("p1", 0.8), task("p2", 0.4), task("h1", 0.3, True), task("h2", 0.1, True),
                         task("h3", 0.2, True)])
        assert (s.public, s.hidden, s.score, s.partial) == (pytest.approx(0.6), pytest.approx(0.2), pytest.approx(0.4), False)

    def test_halves_weigh_equally_not_tasks(self):
        # 15 public at 1.0 and 1 hidden at 0.0: (1 + 0) / 2 = 0.5, not 15/16
        s = track_score([task(f"p{i}", 1.0) for i in range(15)] + [task("h", 0.0, True)])
        assert s.score == pytest.approx(0.5)

    def test_partial_is_the_mean_of_what_exists(self):
        s = track_score([task("p1", 0.9), task("p2", 0.6)])
        assert s.score == pytest.approx(0.75) and s.partial and s.hidden is None
        assert "no hidden tasks" in s.notes[0]
        s = track_score([task("h1", 0.2, True)])
        assert s.score == pytest.approx(0.2) and s.partial and s.public is None

    def test_failed_counts_as_zero(self):
        # public (0.9 + 0) / 2 = 0.45, hidden 0.5 -> 0.475
        s = track_score([task("p1", 0.9), task("p2", 0.7, failed=True), task("h1", 0.5, True)])
        assert s.score == pytest.approx(0.475) and s.failed == ("p2",)

    def test_missing_expected_task_counts_as_zero_inside_a_present_half(self):
        expected = [("p1", False), ("p2", False), ("h1", True)]
        # p2 missing -> public (0.8 + 0) / 2 = 0.4; no hidden at all -> partial, score 0.4
        s = track_score([task("p1", 0.8)], expected)
        assert s.score == pytest.approx(0.4) and s.missing == ("p2",) and s.partial

    def test_no_tasks(self):
        s = track_score([])
        assert s.score == 0.0 and s.partial


class TestMerge:
    def test_per_task_max_over_machines_then_the_formula(self):
        # task t1: max(0.8, 0.6) = 0.8; t2: max(0.4, 0.5) = 0.5  -> public 0.65
        # hidden (from the A-hidden file): (0.3 + 0.1) / 2 = 0.2    -> Track A = (0.65 + 0.2) / 2 = 0.425
        rs = [
            results("alpha", "m1", "A", task("t1", 0.8), task("t2", 0.4)),
            results("alpha", "m2", "A", task("t1", 0.6), task("t2", 0.5)),
            results("alpha", "m1", "A-hidden", task("h1", 0.3, True), task("h2", 0.1, True)),
        ]
        [entry] = merge_machines(rs)
        assert entry.track == "A" and entry.machines == ("m1", "m2")
        best = {t.task: (t.score, t.machine) for t in entry.tasks}
        assert best == {"t1": (0.8, "m1"), "t2": (0.5, "m2"), "h1": (0.3, "m1"), "h2": (0.1, "m1")}
        assert track_score(entry.tasks).score == pytest.approx(0.425)

    def test_a_success_beats_a_failure_on_another_machine(self):
        rs = [results("a", "m1", "B", task("asr", 0.0, failed=True)), results("a", "m2", "B", task("asr", 0.3))]
        [entry] = merge_machines(rs)
        assert not entry.tasks[0].failed and entry.tasks[0].score == 0.3

    def test_a_negative_caption_score_beats_a_failure(self):
        # FENSE can be negative; a failed run's 0 is no measurement and must not win the per-task maximum
        rs = [results("a", "m1", "B", task("clotho", 0.0, failed=True, metric="FENSE")),
              results("a", "m2", "B", task("clotho", -0.1, metric="FENSE"))]
        [entry] = merge_machines(rs)
        assert not entry.tasks[0].failed and entry.tasks[0].score == -0.1
        assert track_score(entry.tasks, two_halves=False).score == pytest.approx(-0.1)

    def test_failed_everywhere_stays_failed(self):
        rs = [results("a", "m1", "B", task("asr", 0, failed=True)), results("a", "m2", "B", task("asr", 0, failed=True))]
        assert merge_machines(rs)[0].tasks[0].failed

    def test_tracks_and_submissions_stay_apart(self):
        rs = [results("a", "m1", "A", task("t", 0.1)), results("a", "m1", "B", task("u", 0.2)),
              results("b", "m1", "A", task("t", 0.3)), results("b", "m1", "B-hidden", task("v", 0.4, True))]
        got = {(e.submission, e.track): [t.task for t in e.tasks] for e in merge_machines(rs)}
        assert got == {("a", "A"): ["t"], ("a", "B"): ["u"], ("b", "A"): ["t"], ("b", "B"): ["v"]}

    def test_conflicting_metric_is_refused(self):
        rs = [results("a", "m1", "A", task("t", 0.1)), results("a", "m2", "A", task("t", 0.2, metric="mAP"))]
        with pytest.raises(DataError, match="disagree") as e:
            merge_machines(rs)
        assert "metric Accuracy" in e.value.reasons[0] and "mAP" in e.value.reasons[0]

    def test_base_track(self):
        assert [base_track(t) for t in ("A", "A-hidden", "B-hidden", "demo-a")] == ["A", "A", "B", "demo-a"]


class TestLeaderboard:
    def test_ranks_with_ties_per_track(self):
        rs = [
            results("a", "m1", "A", task("t", 0.5), task("h", 0.5, True)),  # 0.5
            results("b", "m1", "A", task("t", 0.7), task("h", 0.3, True)),  # (0.7 + 0.3) / 2 = 0.5: tie with a
            results("c", "m1", "A", task("t", 0.9), task("h", 0.5, True)),  # 0.7
            results("d", "m1", "A", task("t", 0.1), task("h", 0.1, True)),  # 0.1
            results("a", "m1", "B", task("u", 0.2)),
        ]
        rows = leaderboard(rs)
        got = [(r.entry.track, r.rank, r.entry.submission) for r in rows]
        assert got == [("A", 1, "c"), ("A", 2, "a"), ("A", 2, "b"), ("A", 4, "d"), ("B", 1, "a")]

    def test_float_noise_is_a_tie(self):
        # 0.1 + 0.2 != 0.3 in binary floating point, yet the two scores are the same score
        rs = [results("a", "m1", "A", task("t1", 0.1 + 0.2)), results("b", "m1", "A", task("t1", 0.3))]
        assert [r.rank for r in leaderboard(rs)] == [1, 1]

    def test_missing_task_counts_against_its_submission(self):
        # a: (1.0 + 0.0) / 2 = 0.5 public; b: (0.6 + 0.6) / 2 = 0.6; without the rule a would score 1.0
        rs = [results("a", "m1", "A", task("t1", 1.0)), results("b", "m1", "A", task("t1", 0.6), task("t2", 0.6))]
        rows = leaderboard(rs)
        assert [(r.entry.submission, r.result.score) for r in rows] == [("b", pytest.approx(0.6)), ("a", pytest.approx(0.5))]
        assert rows[1].result.missing == ("t2",)


class TestReading:
    def test_minimal_document(self):
        doc = {"schema_version": 1, "submission": {"name": "x", "sha256": "ab"}, "machine": "m", "track": "A",
               "tasks": [{"task": "t", "hidden": False, "metric": "Accuracy", "score": 0.5, "n_samples": 3}]}
        r = parse_results(doc)
        assert r.tasks == (TaskResult("t", False, "Accuracy", 0.5, 3, machine="m"),)

    def test_failed_status_forces_zero(self):
        doc = json.loads((RESOURCES / "beta_A_m1.json").read_text())
        doc["tasks"][1]["score"] = 0.9  # a failed task's score never counts
        t = parse_results(doc).tasks[1]
        assert t.failed and t.score == 0.0 and t.error == "encoder crashed"

    def test_schema_violation_lists_every_problem(self):
        with pytest.raises(DataError) as e:
            parse_results({"schema_version": 2, "tasks": [{}]}, source="x.json")
        assert str(e.value).startswith("x.json: does not match results.schema.json")
        assert any("schema_version" in r for r in e.value.reasons) and len(e.value.reasons) >= 3

    def test_nan_score_is_refused(self, tmp_path):
        text = (RESOURCES / "alpha_A_m1.json").read_text().replace("0.8", "NaN")
        (tmp_path / "nan.json").write_text(text)
        with pytest.raises(DataError, match="NaN is not valid JSON"):
            load_results(tmp_path / "nan.json")

    def test_duplicate_task_is_refused(self):
        doc = json.loads((RESOURCES / "alpha_A_m1.json").read_text())
        doc["tasks"].append(doc["tasks"][0])
        with pytest.raises(DataError, match="task 't1' twice"):
            parse_results(doc)

    def test_one_bad_file_refuses_all_and_names_each(self, tmp_path):
        paths = [RESOURCES / "alpha_A_m1.json", RESOURCES / "bad_not_json.json", RESOURCES / "bad_score_range.json",
                 tmp_path / "absent.json"]
        with pytest.raises(DataError, match="3 of 4 results files are unusable") as e:
            load_many(paths)
        assert len(e.value.reasons) == 3
        assert "bad_not_json.json: not valid JSON" in e.value.reasons[0]
        assert "bad_score_range.json: does not match" in e.value.reasons[1] and "maximum of 1" in e.value.reasons[1]
        assert "absent.json: no such file" in e.value.reasons[2]

    def test_results_document_round_trip(self):
        tasks = [task("t1", 0.75), task("h1", 0.0, True, failed=True)]
        doc = results_document(submission="enc", sha256="ab" * 32, machine="m1", track="A", tasks=tasks,
                               evaluator_version="0.1.0")
        assert doc["tasks"][1] == {"task": "h1", "hidden": True, "metric": "Accuracy", "score": 0.0,
                                   "n_samples": 10, "status": "failed"}
        back = parse_results(json.loads(json.dumps(doc)))
        assert back.tasks == tuple(tasks) and (back.submission, back.track) == ("enc", "A")
        with pytest.raises(RuntimeError, match="score"):
            results_document(submission="enc", sha256="x", machine="m", track="A", tasks=[task("t", 1.5)])


def test_a_track_without_a_hidden_half_is_complete_from_public_tasks():
    from evaluator.scoring import TaskResult, track_score

    tasks = [TaskResult("demo-keywords", False, "Accuracy", 0.5, 40), TaskResult("demo-voices", False, "Accuracy", 1.0, 32)]
    demo = track_score(tasks, two_halves=False)
    assert (demo.score, demo.partial, demo.notes) == (0.75, False, ())
    challenge = track_score(tasks)  # Track A without its hidden half: flagged
    assert (challenge.score, challenge.partial) == (0.75, True)
