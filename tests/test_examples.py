"""The examples run as a user would run them (they rot otherwise)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serve_under_budget_example(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_under_budget.py"), "--out", str(tmp_path),
                          "--new-tokens", "32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynaexq:" in out.stdout and "lowest-ids:" in out.stdout
    for policy in ("dynaexq", "lowest-ids"):
        assert (tmp_path / policy / "residency.png").stat().st_size > 1000
        assert (tmp_path / policy / "hotness.png").stat().st_size > 1000
