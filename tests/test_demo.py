"""The embedded demo writes a report with a table and a plot, and keeps its console to one
line per step (the steps' own output is in RUN/logs/)."""

import json

from kuberank.cli.demo import run_demo


def test_demo_writes_report_and_plot(tmp_path, capfd):
    lines = []
    run_dir = run_demo(str(tmp_path), echo=lines.append, pipeline=False)
    report = (run_dir / "report.md").read_text()
    assert "| popularity |" in report and "| zero-shot |" in report
    assert (run_dir / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["popularity", "ease", "zero-shot"]
    assert all(r["queries"] == 943 for r in rows)
    assert any("ndcg@10" in line for line in lines)
    # the console: a header, the step line with its headline number, the table, the summary
    text = "\n".join(lines)
    assert lines[0].startswith("kuberank demo: movielens-100k") and f"{run_dir}/logs/" in lines[0]
    step = next(line for line in lines if line.startswith("  baselines "))
    assert step.split()[2] == "s" and "test nDCG@10 0.0737 (best: ease)" in step
    assert f"report: {run_dir / 'report.md'}" in text
    assert capfd.readouterr() == ("", "")  # the work's own output went to its log
    assert (run_dir / "logs" / "baselines.log").is_file()


def test_the_report_says_when_no_compression_level_passed():
    from kuberank.cli.demo import compression_line

    kept = {
        "compressed": False,
        "split": "validation",
        "teacher_ndcg10": 0.8899,
        "ladder": [{"layers": 2, "prune_ratio": 0.5, "ndcg10": 0.5216}],
    }
    assert compression_line(kept) == (
        "No level passed the quality gate on validation (teacher nDCG@10 0.8899; levels tried: "
        "2x0.5 0.5216): the teacher is served uncompressed."
    )
    passed = {
        "split": "validation",
        "compressed_ndcg10": 0.1133,
        "teacher_ndcg10": 0.1188,
        "layers": [2, 5],
        "intermediate_size": 768,
        "teacher_bytes": 90e6,
        "int8_bytes": 9e6,
    }
    assert compression_line(passed).startswith(
        "Quality gate on validation: compressed nDCG@10 0.1133"
    )
    assert compression_line({}) == "The served model is not compressed."
