"""Tests of gpu_check.py on the CPU (--smoke, the tiny model): each section runs in its own process and
appends its JSON line as soon as it ends, so a lease that runs out keeps what finished."""
import json
import subprocess
import sys

from conftest import HERE


def test_smoke_sections_each_write_their_line(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    proc = subprocess.run([sys.executable, "gpu_check.py", "--smoke", "--sections", "env,generate,vllm,tests",
                           "--out", str(out)], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["section"] for r in rows] == ["env", "generate", "vllm", "tests"]
    env, gen = rows[0], rows[1]
    assert env["torch"] and "vllm" in env and "error" not in gen
    for role in ("teacher", "student"):
        g = gen[role]
        assert g["sequences"] == 16 and 0 < g["tokens"] <= 16 * 32 and g["tok_per_s"] > 0
        assert g["roofline_share"] is None  # no bandwidth figure for a CPU
    assert "skipped" in rows[3]


def test_unknown_section_refused():
    proc = subprocess.run([sys.executable, "gpu_check.py", "--sections", "nope"], cwd=HERE, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "unknown sections" in proc.stderr
