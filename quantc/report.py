"""The plan report: a Markdown table and PNG plots (bits per layer; importance and sensitivity per
layer; predicted quality against size for a sweep of budgets)."""
from __future__ import annotations

from pathlib import Path

from .passes.measure import Measurements, option_key, unit_dkl


def _short(key: str) -> str:
    return key.split(".", 1)[1]


def sweep(ms: Measurements, cfg, points: int = 24, head: int = 0) -> list[dict]:
    """Predicted ΔKL of the optimal plan at evenly spaced budgets between the smallest and largest size
    (`head`: the bytes of an lm_head the rotation unties, paid by every budget)."""
    from .planning import allocatable, solve
    from .passes.allocate import size_range
    keys, fixed = allocatable(ms, cfg)
    fixed += head
    costs = [[ms.units[k]["options"][option_key(o)]["bytes"] for o in cfg.candidates] for k in keys]
    lo, hi = size_range(costs)
    weights = sum(ms.units[k]["weights"] for k in keys)
    out = []
    for t in range(points):
        b = lo + (hi - lo) * t // (points - 1)
        p = solve(ms, cfg, b + fixed, head=head)
        out.append({"budget": b + fixed, "bytes": p.predicted["bytes"], "avg_bits": 8 * p.predicted["allocated_bytes"] / weights,
                    "delta_kl": p.predicted["delta_kl"]})
    return out


def write_report(folder: Path, plan, ms: Measurements, cfg) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    layers = sorted({u["layer"] for u in ms.units.values()})
    kinds = list(dict.fromkeys(_short(k) for k in ms.units))

    # bits per layer: a layers × unit-kind heatmap
    grid = np.full((len(kinds), len(layers)), np.nan)
    for k, o in plan.choices.items():
        grid[kinds.index(_short(k)), layers.index(int(k.split(".")[0]))] = o.bits
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.35), 2 + 0.4 * len(kinds)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=8)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("decoder layer")
    for (r, c), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(c, r, int(v), ha="center", va="center", fontsize=7, color="w" if v < 5 else "k")
    fig.colorbar(im, ax=ax, label="bits")
    ax.set_title(f"bits per unit: {plan.predicted['avg_bits']:.3f} bits/weight, "
                 f"{plan.predicted['bytes'] / 2**20:.2f} MiB, predicted ΔKL {plan.predicted['delta_kl']:.4f}")
    fig.tight_layout()
    written.append(folder / "bits_per_layer.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # importance and sensitivity per layer
    lowest = option_key(min(cfg.candidates, key=lambda o: o.size_order))
    sens = [sum(unit_dkl(u, lowest) for u in ms.units.values() if u["layer"] == i) for i in layers]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    L = ms.layers
    axes[0].plot(layers, [x["block_influence"] for x in L], "o-")
    axes[0].set_ylabel("block influence\n1 − cos(in, out)")
    axes[1].plot(layers, [100 * x["outlier_share"] for x in L], "o-", color="C1")
    axes[1].set_ylabel("outlier weights %")
    if ms.meta.get("predictor", "exact") == "exact":    # the fisher predictor's LieQ value is the sum below
        axes[2].semilogy(layers, [max(x["lieq_kl"], 1e-6) for x in L], "o-", color="C2", label="measured (LieQ)")
    axes[2].semilogy(layers, [max(s, 1e-6) for s in sens], "x--", color="C3", label="predicted ΣΔKL (lowest option)")
    axes[2].set_ylabel(f"ΔKL, layer alone\nat {lowest}")
    axes[2].legend(fontsize=8)
    for kind in kinds:
        us = [ms.units[f"{i}.{kind}"] for i in layers if f"{i}.{kind}" in ms.units]
        axes[3].semilogy([u["layer"] for u in us],
                         [unit_dkl(u, lowest) / max(u["options"][lowest]["err"], 1e-30) for u in us], ".-", label=kind)
    axes[3].set_ylabel(f"ΔKL / err\nat {lowest}")
    axes[3].legend(fontsize=7, ncol=4)
    axes[3].set_xlabel("decoder layer")
    fig.suptitle("importance and sensitivity per layer")
    fig.tight_layout()
    written.append(folder / "importance.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # predicted quality against size
    pts = sweep(ms, cfg, head=plan.predicted.get("untied_head_bytes", 0))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy([p["avg_bits"] for p in pts], [max(p["delta_kl"], 1e-6) for p in pts], "o-", label="optimal plans")
    ax.semilogy([plan.predicted["avg_bits"]], [max(plan.predicted["delta_kl"], 1e-6)], "r*", ms=14, label="this plan")
    ax.set_xlabel("bits per weight (quantized linears)")
    ax.set_ylabel("predicted ΔKL (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(folder / "quality_vs_size.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    lines = ["# quantc plan", "",
             f"Model: `{cfg.model}`  ",
             f"Predicted: {plan.predicted['bytes']:,} bytes ({plan.predicted['bytes'] / 2**20:.2f} MiB), "
             f"{plan.predicted['avg_bits']:.3f} bits/weight, ΔKL {plan.predicted['delta_kl']:.4f} nats/token"
             + (f" (of the bytes, {plan.predicted['untied_head_bytes']:,} are the lm_head that quant.rotate unties)"
                if plan.predicted.get("untied_head_bytes") else "") + "  ",
             f"Achievable sizes: {plan.predicted['min_bytes']:,} … {plan.predicted['max_bytes']:,} bytes  ",
             f"Measurement: {ms.meta.get('seconds', 0):.0f} s on {ms.meta.get('measure_samples')} sequences, "
             f"ΔKL on {ms.meta.get('alpha_tokens')} held-out tokens, predictor "
             f"{ms.meta.get('predictor', 'exact')}"
             + (f", each error weighted by what QEP leaves of it (gradient into every linear × "
                f"{ms.meta['qep_beta']:g}, plan.qep_discount)" if ms.meta.get("qep_beta") is not None else ""), "",
             "| layer | " + " | ".join(kinds) + " | block influence | outliers % | LieQ ΔKL |",
             "|---|" + "---|" * (len(kinds) + 3)]
    for i, x in zip(layers, ms.layers):
        cells = []
        for kind in kinds:
            o = plan.choices.get(f"{i}.{kind}")
            cells.append(("fixed" if o is None else o.label if o.grid != "gptq" else f"{o.bits}b g{o.group_size}"))
        lines.append(f"| {i} | " + " | ".join(cells) +
                     f" | {x['block_influence']:.4f} | {100 * x['outlier_share']:.3f} | {x['lieq_kl']:.4f} |")
    lines += ["", "| plan bytes | bits/weight | predicted ΔKL |", "|---|---|---|"]
    lines += [f"| {p['bytes']:,} | {p['avg_bits']:.3f} | {p['delta_kl']:.4f} |" for p in pts]
    lines += ["", "![bits per layer](bits_per_layer.png)", "![importance](importance.png)",
              "![quality vs size](quality_vs_size.png)"]
    written.append(folder / "report.md")
    written[-1].write_text("\n".join(lines) + "\n")
    return written
