"""`xares-eval leaderboard` in process: each format, hand-computed scores, bad inputs."""

from __future__ import annotations

import csv
import html.parser
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evaluator.cli import eval_cli

RESOURCES = Path(__file__).parent / "resources" / "results"
GOOD = sorted(str(p) for p in RESOURCES.glob("*_m*.json"))  # alpha A x2 machines + A-hidden, beta A + B


def run(*args):
    return CliRunner().invoke(eval_cli, ["leaderboard", *args])


def tsv_rows(text):
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


class TestFormats:
    def test_tsv_reproduces_the_hand_computed_scores(self):
        result = run(*GOOD, "--format", "tsv")
        assert result.exit_code == 0, result.output
        rows = tsv_rows(result.output)
        assert list(rows[0])[:7] == ["rank", "submission", "sha256", "track", "score", "public", "hidden"]
        got = {(r["track"], r["submission"]): r for r in rows}
        # alpha, Track A: t1 = max(80, 60) = 80, t2 = max(40, 50) = 50 -> public 65; hidden (30 + 10) / 2 = 20
        # score (65 + 20) / 2 = 42.5
        alpha = got[("A", "alpha")]
        assert (alpha["score"], alpha["public"], alpha["hidden"], alpha["t1"], alpha["t2"], alpha["h1"]) == (
            "42.5", "65.0", "20.0", "80.0", "50.0", "30.0")
        assert alpha["machines"] == "m1,m2" and alpha["note"] == ""
        # beta, Track A: t1 90, t2 failed (0) -> public 45; no hidden file -> partial, score 45 -> rank 1
        beta = got[("A", "beta")]
        assert (beta["rank"], beta["score"], beta["t2"], beta["hidden"]) == ("1", "45.0", "failed", "")
        assert "partial" in beta["note"] and "failed (counted as 0): t2" in beta["note"]
        assert alpha["rank"] == "2"
        # beta, Track B: (75 + 25) / 2 = 50; Track A's task columns are blank there
        b = got[("B", "beta")]
        assert (b["rank"], b["score"], b["librispeech"], b["clotho"], b["t1"]) == ("1", "50.0", "75.0", "25.0", "")

    def test_decimals(self):
        rows = tsv_rows(run(*GOOD, "--format", "tsv", "--decimals", "3").output)
        assert rows[1]["score"] == "42.500"

    def test_md_renders_the_same_table(self):
        tsv = tsv_rows(run(*GOOD, "--format", "tsv").output)
        result = run(*GOOD, "--format", "md")
        assert result.exit_code == 0
        lines = result.output.splitlines()
        assert lines[0].startswith("| rank | submission | sha256 | track | score |")
        assert set(lines[1]) == {"|", "-"}
        cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]
        assert cells == [list(r.values()) for r in tsv]

    def test_html_is_escaped(self, tmp_path):
        doc = json.loads((RESOURCES / "alpha_A_m1.json").read_text())
        doc["submission"]["name"] = "<script>alert(1)</script> & | co"
        path = tmp_path / "evil.json"
        path.write_text(json.dumps(doc))
        result = run(str(path), "--format", "html")
        assert result.exit_code == 0
        assert "<script>" not in result.output
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; | co" in result.output

        cells = []

        class Cells(html.parser.HTMLParser):
            def handle_data(self, data):
                cells.append(data)

        Cells().feed(result.output)
        assert "<script>alert(1)</script> & | co" in cells  # the browser shows the name as written
        md = run(str(path), "--format", "md").output
        assert "\\| co" in md and md.splitlines()[2].count(" | ") == md.splitlines()[0].count(" | ")

    def test_output_file(self, tmp_path):
        out = tmp_path / "board" / "scores.tsv"
        result = run(*GOOD, "--format", "tsv", "-o", str(out))
        assert result.exit_code == 0 and result.stdout == ""
        assert tsv_rows(out.read_text())[0]["submission"] == "beta"
        assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


class TestBadInput:
    def test_bad_files_are_listed_and_nothing_is_ranked(self, tmp_path):
        out = tmp_path / "board.md"
        result = run(*GOOD, str(RESOURCES / "bad_not_json.json"), str(RESOURCES / "bad_score_range.json"),
                     str(tmp_path / "absent.json"), "-o", str(out))
        assert result.exit_code == 1
        lines = result.output.splitlines()
        assert lines[0] == "error: 3 of 8 results files are unusable; nothing was ranked"
        assert [line.split(":")[0].strip(" -").rsplit("/", 1)[-1] for line in lines[1:]] == [
            "bad_not_json.json", "bad_score_range.json", "absent.json"]
        assert "Traceback" not in result.output and not out.exists()

    def test_no_files_is_a_usage_error(self):
        result = run()
        assert result.exit_code == 2 and "RESULTS" in result.output

    def test_unknown_format(self):
        result = run(*GOOD, "--format", "xlsx")
        assert result.exit_code == 2

    @pytest.mark.parametrize("content", ["[]", '{"schema_version": 1}', ""])
    def test_wrong_documents(self, tmp_path, content):
        path = tmp_path / "r.json"
        path.write_text(content)
        result = run(str(path))
        assert result.exit_code == 1 and f"{path}:" in result.output
