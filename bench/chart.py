"""Writes the benchmark chart of one pytest-benchmark results JSON as a PNG.

Usage: python bench/chart.py RESULTS.json [OUT.png | OUT_DIR]
(default: docs/figures/bench-<device>.png, device "cpu" or the GPU's name, e.g. "h200";
a directory as OUT gets bench-<device>.png inside it)

Left panel: per op and size, fastreg's speed-up over torch eager and over torch.compile
(their median over fastreg's; > 1 means fastreg is faster), on a log axis, with the copy
floor marked: the speed-up over eager that an op moving only a copy's bytes would reach.
Right panel: bytes saved for backward per element, fastreg against torch.
The machine, date and library versions of the run are in the title.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict

FASTREG = "fastreg"
EAGER = "torch eager"
COMPILE = "torch.compile"
FLOOR = "copy (floor)"

_DTYPES = {"f16", "bf16", "f32", "f64"}
_DEVICES = {"cpu", "cuda", "gpu"}
_SIZE = re.compile(r"^(2\^\d+|d=\S+)$")


def split_group(group: str) -> tuple[str, str]:
    """'dropout fwd 2^24 f32 cpu' -> ('dropout fwd', '2^24'): the op, then its size."""
    op, size = [], ""
    for tok in group.split():
        if _SIZE.match(tok):
            size = tok
        elif tok not in _DTYPES and tok not in _DEVICES:
            op.append(tok)
    return " ".join(op), size


def _size_key(size: str) -> float:
    m = re.match(r"2\^(\d+)", size)
    return float(m.group(1)) if m else 0.0


def collect(data) -> "OrderedDict[tuple[str, str], dict]":
    """Per (op, size) with a fastreg provider: each provider's median and saved bytes/elem."""
    rows: OrderedDict = OrderedDict()
    for b in data["benchmarks"]:
        ei = b.get("extra_info", {})
        key = split_group(b.get("group") or b["name"])
        row = rows.setdefault(key, {"median": {}, "saved": {}})
        prov = ei.get("provider", b["name"])
        row["median"][prov] = b["stats"]["median"]
        if isinstance(ei.get("saved_bytes_per_elem"), (int, float)):
            row["saved"][prov] = float(ei["saved_bytes_per_elem"])
    return OrderedDict((k, v) for k, v in rows.items() if FASTREG in v["median"])


def speedups(data) -> list[dict]:
    """Rows with torch eager or torch.compile beside fastreg, ops in first-seen order,
    sizes ascending: op, size, vs_eager, vs_compile, floor_vs_eager (None where absent)."""
    rows = collect(data)
    order = list(OrderedDict.fromkeys(op for op, _ in rows))
    out = []
    for op in order:
        for (o, size), r in sorted(((k, v) for k, v in rows.items() if k[0] == op),
                                   key=lambda kv: _size_key(kv[0][1])):
            med = r["median"]
            if EAGER not in med and COMPILE not in med:
                continue
            f = med[FASTREG]
            out.append({
                "op": o, "size": size,
                "vs_eager": med[EAGER] / f if EAGER in med else None,
                "vs_compile": med[COMPILE] / f if COMPILE in med else None,
                "floor_vs_eager": (med[EAGER] / med[FLOOR]
                                   if EAGER in med and FLOOR in med else None),
                "fastreg_s": f,
            })
    return out


def saved_rows(data) -> list[dict]:
    """Rows where both fastreg and torch eager recorded bytes saved for backward."""
    out = []
    for (op, size), r in collect(data).items():
        s = r["saved"]
        if FASTREG in s and EAGER in s:
            out.append({"op": op, "size": size, "fastreg": s[FASTREG], "eager": s[EAGER],
                        "compile": s.get(COMPILE)})
    # the largest size is the per-element figure that matters (the seed's 8 bytes vanish)
    best: OrderedDict = OrderedDict()
    for r in out:
        if r["op"] not in best or _size_key(r["size"]) > _size_key(best[r["op"]]["size"]):
            best[r["op"]] = r
    return list(best.values())


def device_of(data) -> str:
    gpu = (data.get("fastreg") or {}).get("gpu")
    return gpu if gpu else "cpu"


def device_slug(data) -> str:
    dev = device_of(data)
    if dev == "cpu":
        return "cpu"
    name = re.sub(r"^(nvidia|amd)\s+", "", dev.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def describe(data) -> str:
    """One line: machine, date, library versions."""
    fr = data.get("fastreg") or {}
    cpu = data.get("machine_info", {}).get("cpu", {})
    dev = fr.get("gpu") or "{} ({} cores)".format(cpu.get("brand_raw", "unknown CPU"),
                                                  cpu.get("count", "?"))
    when = (data.get("datetime") or "")[:16].replace("T", " ")
    libs = ", ".join(f"{k} {fr[k]}" for k in ("torch", "triton", "numba") if fr.get(k))
    return f"{dev}, {when} UTC" + (f", {libs}" if libs else ", versions not recorded")


def write_chart(data, out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = speedups(data)
    saved = saved_rows(data)
    if not rows:
        raise ValueError("no benchmark group has torch eager or torch.compile beside fastreg")
    n = len(rows)
    fig, (ax, axs) = plt.subplots(1, 2, figsize=(14, 0.34 * n + 1.9),
                                  gridspec_kw={"width_ratios": [2.1, 1]})
    ys = list(range(n))[::-1]
    h = 0.38
    eag = [r["vs_eager"] or 0 for r in rows]
    com = [r["vs_compile"] or 0 for r in rows]
    ax.barh([y + h / 2 for y in ys], eag, h, color="#3b6fb6", label="vs torch eager")
    ax.barh([y - h / 2 for y in ys], [c if c else float("nan") for c in com], h,
            color="#e08a2c", label="vs torch.compile")
    fl = [(y, r["floor_vs_eager"]) for y, r in zip(ys, rows) if r["floor_vs_eager"]]
    ax.scatter([v for _, v in fl], [y + h / 2 for y, _ in fl], marker="|", s=160, color="black",
               linewidths=2, zorder=3, label="copy floor (eager / copy)")
    for y, r in zip(ys, rows):
        for v, dy in ((r["vs_eager"], h / 2), (r["vs_compile"], -h / 2)):
            if v:
                ax.text(v * 1.04, y + dy, f"{v:.1f}×", va="center", fontsize=7)
    ax.axvline(1.0, color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    vals = [v for v in eag + com + [v for _, v in fl] if v]
    ax.set_xlim(min(0.2, min(vals) / 1.5), max(vals) * 2.2)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['op']}  {r['size']}" for r in rows], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("speed-up of fastreg (other provider's median / fastreg's; > 1: fastreg faster)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("time: float32 medians, log scale", fontsize=9)

    if saved:
        m = len(saved)
        ys2 = list(range(m))[::-1]
        h2 = 0.27
        axs.barh([y + h2 for y in ys2], [r["fastreg"] for r in saved], h2, color="#2a9d5b",
                 label="fastreg")
        axs.barh(ys2, [r["eager"] for r in saved], h2, color="#3b6fb6", label="torch eager")
        axs.barh([y - h2 for y in ys2], [r["compile"] if r["compile"] is not None else float("nan")
                                        for r in saved], h2, color="#e08a2c",
                 label="torch.compile")
        for y, r in zip(ys2, saved):
            # a seed's 8 bytes over 2^24 elements is 5e-7: print it as the 0 it is per element
            v = r["fastreg"]
            axs.text(v + 0.1, y + h2, "0" if v < 0.005 else f"{v:.3g}", va="center", fontsize=7)
        axs.set_yticks(ys2)
        axs.set_yticklabels([f"{r['op'].replace(' fwd+bwd', '')}  {r['size']}" for r in saved],
                            fontsize=8)
        axs.set_xlabel("bytes saved for backward per element")
        axs.legend(loc="lower right", fontsize=8)
        axs.set_title("memory, forward+backward", fontsize=9)
    else:
        axs.axis("off")
    fig.suptitle("fastreg against torch: " + describe(data), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not data.get("fastreg"):
        # a raw pytest-benchmark file (before summary.py): the versions are this environment's
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from summary import versions

        data["fastreg"] = versions()
    return data


def main(argv: list[str]) -> None:
    if not argv or len(argv) > 2:
        sys.exit(__doc__)
    if not os.path.exists(argv[0]):
        sys.exit(f"bench/chart.py: no benchmark results at {argv[0]}: did every benchmark skip?")
    data = load(argv[0])
    name = f"bench-{device_slug(data)}.png"
    out = argv[1] if len(argv) > 1 else os.path.join("docs", "figures", name)
    if os.path.isdir(out):
        out = os.path.join(out, name)
    print(f"chart: {write_chart(data, out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
