"""Output of a run: markdown tables (terminal), one CSV, PNG plots of time and memory vs N and V."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence

from .harness import Result

MEASURES = ("median_ms", "p20_ms", "p80_ms", "peak_mem_mib", "gbps", "frac_copy_bw")


def _fmt(x) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int) and x >= 10000:
        return f"{x:,}"
    return str(x)


def markdown(results: Sequence[Result]) -> str:
    """One table per suite: case columns, impl, time (median, p20–p80), speedups, memory, bandwidth."""
    out = []
    for suite in dict.fromkeys(r.suite for r in results):
        rows = [r for r in results if r.suite == suite]
        keys = list(dict.fromkeys(k for r in rows for k in r.params))
        baselines = list(dict.fromkeys(b for r in rows for b in r.baselines))
        kind = "speedup vs" if rows[0].ratio_kind == "speedup" else "time ÷"
        has_bw = any(r.bytes_moved for r in rows)
        has_mem = any(r.peak_bytes is not None for r in rows)
        head = keys + ["impl", "median ms", "p20–p80 ms"] + [f"{kind} {b}" for b in baselines]
        has_err = any(r.error is not None for r in rows)
        if has_mem:
            head += ["peak MiB"] + [f"mem ÷ {b}" for b in baselines]
        if has_err:
            head += ["err vs ref"]
        if has_bw:
            head += ["GB/s", "% copy BW"]
        lines = [f"### {suite}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            d = r.row()
            cells = [_fmt(r.params.get(k)) for k in keys] + [r.impl]
            if r.status != "ok":
                cells += [f"**{r.status}**", ""] + [""] * len(baselines)
            else:
                cells += [_fmt(d["median_ms"]), f"{_fmt(d['p20_ms'])}–{_fmt(d['p80_ms'])}"]
                cells += [_fmt(r.ratio.get(b)) if b != r.impl else "1" for b in baselines]
            if has_mem:
                cells += [_fmt(d["peak_mem_mib"])]
                cells += [_fmt(r.mem_ratio.get(b)) if b != r.impl else "1" for b in baselines]
            if has_err:
                cells += [_fmt(r.error) if r.error is not None else "ref"]
            if has_bw:
                frac = d["frac_copy_bw"]
                cells += [_fmt(d["gbps"]), _fmt(None if frac is None else 100 * frac)]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def write_csv(path: str, results: Sequence[Result], env: Dict[str, str]) -> None:
    rows = [{**env, **r.row()} for r in results]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plots(out_dir: str, results: Sequence[Result], title: str) -> List[str]:
    """Loss suite: time and peak memory vs N (at the V with most N values) and vs V (likewise),
    one line per impl, per mode. Other suites: bars of time (and bandwidth) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in results if r.status == "ok" and r.median]
    loss = [r for r in ok if r.suite == "loss"]
    for mode in dict.fromkeys(r.params["mode"] for r in loss):
        rows = [r for r in loss if r.params["mode"] == mode]
        for x, fixed in (("N", "V"), ("V", "N")):
            groups: Dict[int, set] = {}
            for r in rows:
                groups.setdefault(r.params[fixed], set()).add(r.params[x])
            if not groups:
                continue
            at = max(groups, key=lambda k: (len(groups[k]), k))
            if len(groups[at]) < 2:
                continue
            sel = [r for r in rows if r.params[fixed] == at]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, metric, label in ((axes[0], "median", "time (ms)"), (axes[1], "peak_bytes", "peak memory (MiB)")):
                for impl in dict.fromkeys(r.impl for r in sel):
                    pts = sorted((r.params[x], _metric(r, metric)) for r in sel if r.impl == impl)
                    pts = [(a, b) for a, b in pts if b is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=impl)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(x)
                ax.set_ylabel(label)
                ax.grid(True, which="both", alpha=0.3)
            axes[0].legend(fontsize=8)
            written.append(_save(fig, f"loss {mode}, {fixed} = {at} — {title}",
                                 os.path.join(out_dir, f"loss_{mode}_vs_{x}.png")))
    for suite in dict.fromkeys(r.suite for r in ok if r.suite != "loss"):
        rows = [r for r in ok if r.suite == suite]
        cases = list(dict.fromkeys(_case_label(r) for r in rows))
        impls = list(dict.fromkeys(r.impl for r in rows))
        panels = [("median", "time (ms)"), ("peak_bytes", "peak memory (MiB)")]
        if any(r.bandwidth for r in rows):
            panels.append(("bandwidth", "GB/s (dashed: copy)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        width = 0.8 / max(1, len(impls))
        for ax, (metric, label) in zip(axes[0], panels):
            for j, impl in enumerate(impls):
                for i, c in enumerate(cases):
                    v = next((_metric(r, metric) for r in rows if r.impl == impl and _case_label(r) == c), None)
                    if v is not None:
                        ax.bar(i + j * width, v, width, color=f"C{j}", label=impl if i == 0 else None)
            if metric == "bandwidth":
                bw = next((r.copy_bw for r in rows if r.copy_bw), None)
                if bw:
                    ax.axhline(bw / 1e9, ls="--", color="k")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
            ax.set_xticklabels(cases, fontsize=7)
            ax.set_ylabel(label)
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, f"{suite} — {title}", os.path.join(out_dir, f"{suite}.png")))
    return written


def _save(fig, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric(r: Result, metric: str) -> Optional[float]:
    if metric == "median":
        return r.median * 1e3
    if metric == "peak_bytes":
        return None if r.peak_bytes is None else r.peak_bytes / 2**20
    bw = r.bandwidth
    return None if bw is None else bw / 1e9


def _case_label(r: Result) -> str:
    return " ".join(str(v) for k, v in r.params.items() if k not in ("dtype", "P", "tensors"))


def headline(results: Sequence[Result]) -> str:
    """The README table: the largest fwd+bwd loss case, the largest steering case, the training
    step and the largest fused-linear loss step, each fast path next to its baselines (time, ratio, peak memory, % of copy bandwidth)."""
    lines = ["| case | impl | median ms | ratio | peak MiB | % copy BW |", "|---|---|---|---|---|---|"]

    def add(rows: List[Result], label: str) -> None:
        for r in rows:
            if r.status != "ok":
                lines.append(f"| {label} | {r.impl} | {r.status} | | | |")
                continue
            ratio = "; ".join(f"{'' if r.ratio_kind == 'speedup' else 'time ÷ '}{b}: "
                              f"{x:.2f}{'×' if r.ratio_kind == 'speedup' else ''}" for b, x in r.ratio.items())
            bw = r.bandwidth
            frac = f"{100 * bw / r.copy_bw:.0f}" if bw and r.copy_bw else "–"
            lines.append(f"| {label} | {r.impl} | {r.median * 1e3:.3g} | {ratio or '1'} | "
                         f"{_fmt(None if r.peak_bytes is None else r.peak_bytes / 2**20)} | {frac} |")

    def largest(suite: str, key, where=lambda r: True) -> List[Result]:
        rows = [r for r in results if r.suite == suite and where(r)]
        if not rows:
            return []
        top = max(key(r) for r in rows)
        return [r for r in rows if key(r) == top]

    loss = largest("loss", lambda r: (r.params["N"] * r.params["V"], r.params["N"]),
                   lambda r: r.params["mode"] == "fwdbwd")
    if loss:
        p = loss[0].params
        add(loss, f"loss fwd+bwd N={p['N']} V={p['V']} {p['dtype']}")
    steer = largest("steering", lambda r: r.params["P"])
    if steer:
        p = steer[0].params
        add(steer, f"steering {p['params']} ({p['P'] / 1e6:.3g} M params, {p['dtype']})")
    step = [r for r in results if r.suite == "step"]
    if step:
        add(step, f"training step ({step[0].params['model']})")
    fused = largest("fused-linear", lambda r: r.params["N"] * r.params["V"] * r.params["H"],
                    lambda r: r.params["path"] == "loss step")
    if fused:
        p = fused[0].params
        add(fused, f"fused-linear loss step N={p['N']} H={p['H']} V={p['V']} {p['dtype']}")
    opd = largest("opd", lambda r: (r.params["N"] * r.params["H"], r.params["dtype"] == "float32"),
                  lambda r: not r.params["pad"])
    if opd:
        p = opd[0].params
        add(opd, f"OPD loss vs TRL N={p['N']} H={p['H']} V={p['V']} {p['dtype']}")
    return "\n".join(lines)
