"""serving/ stays in small modules (issue 14): none over MAX_LINES lines."""

from pathlib import Path

SERVING = Path(__file__).resolve().parents[1] / "serving"
MAX_LINES = 600


def test_no_serving_module_exceeds_the_line_limit():
    sizes = {p.name: len(p.read_text().splitlines()) for p in sorted(SERVING.rglob("*.py"))}
    assert "app.py" in sizes and "bench.py" in sizes  # the scan sees the package
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
