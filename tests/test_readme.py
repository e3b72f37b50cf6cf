"""README.md: its quick start runs, its commands are there, and its benchmark table,
docs/benchmarks.md and the chart writer agree with the committed results JSON."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import chart  # noqa: E402
import history  # noqa: E402


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def quick_start() -> str:
    """The first python block after the '## Quick start' heading."""
    text = _readme()
    section = text.split("## Quick start", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md: no python block under '## Quick start'"
    return m.group(1)


def test_quick_start_is_short_and_runs(capsys):
    code = quick_start()
    assert len(code.strip().splitlines()) <= 15
    exec(compile(code, "README.md quick start", "exec"), {"__name__": "__readme__"})
    # two encoder layers hold three torch.nn.Dropout each
    assert capsys.readouterr().out.strip() == "6 dropouts swapped"


def test_readme_keeps_the_two_commands():
    text = _readme()
    assert "make test" in text and "make bench" in text


def test_readme_table_and_benchmarks_md_match_the_results():
    md, readme = history.render(os.path.join(ROOT, "bench", "results"), _readme())
    assert readme == _readme(), "README.md's benchmark table is stale: run `make docs`"
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        assert f.read() == md, "docs/benchmarks.md is stale: run `make docs`"


def _bench(group, provider, median, saved=None, file="bench/bench_x.py"):
    ei = {"provider": provider}
    if saved is not None:
        ei["saved_bytes_per_elem"] = saved
    return {"group": group, "name": f"t[{provider}]", "fullname": f"{file}::t[{provider}]",
            "extra_info": ei, "stats": {"median": median}}


def _run(benchmarks, when="2026-01-01T00:00:00", gpu=None):
    return {"datetime": when, "benchmarks": benchmarks,
            "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
            "fastreg": {"torch": "2.11.0", "triton": "3.6.0", "numba": "0.60", "gpu": gpu}}


def test_chart_ratios_sizes_and_saved_bytes(tmp_path):
    data = _run([
        _bench("op fwd 2^24 f32 cpu", "fastreg", 2.0, 0.0),
        _bench("op fwd 2^24 f32 cpu", "torch eager", 8.0, 4.0),
        _bench("op fwd 2^24 f32 cpu", "torch.compile", 3.0, 1.0),
        _bench("op fwd 2^24 f32 cpu", "copy (floor)", 1.0),
        _bench("op fwd 2^12 f32 cpu", "fastreg", 1.0, 0.5),
        _bench("op fwd 2^12 f32 cpu", "torch eager", 0.5, 4.0),
        _bench("penalty l1 f32 cpu", "fastreg", 1.0),  # no eager/compile: not charted
        _bench("penalty l1 f32 cpu", "python loop", 2.0),
    ])
    rows = chart.speedups(data)
    assert [(r["op"], r["size"]) for r in rows] == [("op fwd", "2^12"), ("op fwd", "2^24")]
    assert rows[0]["vs_eager"] == 0.5 and rows[0]["vs_compile"] is None
    assert rows[1]["vs_eager"] == 4.0 and rows[1]["vs_compile"] == 1.5
    assert rows[1]["floor_vs_eager"] == 8.0
    saved = chart.saved_rows(data)  # the largest size per op
    assert saved == [{"op": "op fwd", "size": "2^24", "fastreg": 0.0, "eager": 4.0, "compile": 1.0}]
    out = chart.write_chart(data, str(tmp_path / "c.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert chart.device_slug(_run([], gpu="NVIDIA H200")) == "h200"


def test_split_group():
    assert chart.split_group("dropout fwd+bwd 2^24 f32 cpu") == ("dropout fwd+bwd", "2^24")
    assert chart.split_group("reversible fwd step d=1e6 1T") == ("reversible fwd step 1T", "d=1e6")


def test_latest_full_run_per_device(tmp_path):
    full_old = _run([_bench("a 2^4 f32 cpu", "fastreg", 1.0, file="bench/bench_a.py"),
                     _bench("b 2^4 f32 cpu", "fastreg", 1.0, file="bench/bench_b.py")],
                    when="2026-01-01T00:00:00")
    partial_new = _run([_bench("a 2^4 f32 cpu", "fastreg", 1.0, file="bench/bench_a.py")],
                       when="2026-01-02T00:00:00")
    gpu = _run([_bench("a 2^4 f32 cuda", "fastreg", 1.0, file="bench/bench_a.py")],
               when="2026-01-03T00:00:00", gpu="NVIDIA H200")
    for name, d in [("full.json", full_old), ("partial.json", partial_new), ("gpu.json", gpu),
                    ("last-run.json", partial_new)]:
        (tmp_path / name).write_text(json.dumps(d))
    runs = history.load_all(str(tmp_path))
    assert [n for n, _ in runs] == ["gpu.json", "partial.json", "full.json"]  # newest first
    latest = history.latest_full(runs)
    assert {dev: name for dev, (name, _) in latest.items()} == {"NVIDIA H200": "gpu.json",
                                                                "cpu": "full.json"}


def test_readme_table_block_is_replaced_only_between_its_markers():
    text = "a\n<!-- bench-table:cpu:begin -->\nold\n<!-- bench-table:cpu:end -->\nb\n"
    new = history.update_readme(text, "cpu", "NEW")
    assert new == "a\n<!-- bench-table:cpu:begin -->\nNEW\n<!-- bench-table:cpu:end -->\nb\n"
    assert history.update_readme("no markers", "cpu", "NEW") == "no markers"


@pytest.mark.parametrize("name", ["bench-cpu.png"])
def test_committed_chart_exists(name):
    assert os.path.getsize(os.path.join(ROOT, "docs", "figures", name)) > 10_000
