"""The embedded demo writes a report with a table and a plot."""

import json

from kuberank.demo import run_demo


def test_demo_writes_report_and_plot(tmp_path):
    lines = []
    run_dir = run_demo(str(tmp_path), echo=lines.append, pipeline=False)
    report = (run_dir / "report.md").read_text()
    assert "| popularity |" in report and "| zero-shot |" in report
    assert (run_dir / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["popularity", "ease", "zero-shot"]
    assert all(r["queries"] == 943 for r in rows)
    assert any("ndcg@10" in line for line in lines)
