"""Prints the summary table of a pytest-benchmark JSON and files it by machine.

Usage: python bench/summary.py RESULTS.json
Writes RESULTS_DIR/<machine>.json (machine = GPU name if the run used CUDA, else CPU
model) with the versions of torch/triton/numba, and prints one table: per group,
each provider's median, the provider's time over fastreg's (x > 1: fastreg faster),
and bytes saved for backward per element where recorded.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections import defaultdict


def machine_key(data) -> str:
    info = data.get("machine_info", {})
    gpu = data.get("fastreg", {}).get("gpu")
    name = gpu or info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown-cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "numba", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing module is recorded as such
            out[mod] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        out["cpu_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    return out


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:8.1f} us"
    return f"{s * 1e3:8.3f} ms"


def table(data) -> str:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["name"]].append(b)
    lines = [f"{'group':<34} {'provider':<22} {'median':>11} {'vs fastreg':>11} {'saved B/elem':>13}"]
    lines.append("-" * len(lines[0]))
    for group in sorted(groups):
        rows = groups[group]
        base = [r for r in rows if r.get("extra_info", {}).get("provider") == "fastreg"]
        base_t = base[0]["stats"]["median"] if base else None
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            ei = r.get("extra_info", {})
            prov = ei.get("provider", r["name"])
            med = r["stats"]["median"]
            ratio = f"{med / base_t:10.2f}x" if base_t else "          -"
            saved = ei.get("saved_bytes_per_elem")
            saved_s = f"{saved:13.4f}" if isinstance(saved, (int, float)) else " " * 13
            lines.append(f"{group:<34} {prov:<22} {fmt_time(med):>11} {ratio:>11} {saved_s}")
        lines.append("")
    return "\n".join(lines)


def main(path: str) -> None:
    if not os.path.exists(path):
        # pytest-benchmark writes no JSON when every benchmark skipped (e.g. `-m gpu` without a GPU)
        sys.exit(f"bench/summary.py: no benchmark results at {path}: did every benchmark skip?")
    with open(path) as f:
        data = json.load(f)
    data.setdefault("fastreg", {}).update(versions())
    out_dir = os.environ.get("FASTREG_RESULTS_DIR") or os.path.dirname(path)
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, machine_key(data) + ".json")
    with open(dest, "w") as f:
        json.dump(data, f, indent=1)
    print(table(data))
    print(f"results: {dest}")


if __name__ == "__main__":
    main(sys.argv[1])
