"""The comparison's results as people read them: summary statistics, a markdown table, the per-level plot
and a grid of samples."""
from __future__ import annotations

import statistics

import torch

from ..demo.run import save_grid
from .methods import NOT_BUILT
from .metrics import pyramid_sizes

IMAGE_SIZE = 32


def summary(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation; None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def per_method(results: dict) -> dict[str, dict]:
    """For each method (and the base model): every metric's (mean, spread) over its seeds, per level for SWD."""
    out = {}
    for method in ["base", *results["methods"]]:
        runs = [r for r in results["runs"] if r["method"] == method]
        entry = {"seeds": len(runs)}
        for key in ("target_swd", "retention_swd"):
            entry[key] = [summary([r[key][i] for r in runs]) for i in range(len(runs[0][key]))]
            entry[key + "_mean"] = summary([statistics.fmean(r[key]) for r in runs])
        for key in ("target_spectrum", "retention_spectrum"):
            entry[key] = summary([r[key] for r in runs])
        if runs[0]["router"] is not None:
            entry["router"] = {key: summary([r["router"][key] for r in runs]) for key in ("entropy", "spread")}
            entry["router"]["leads"] = [(r["router"]["lead_high_noise"], r["router"]["lead_low_noise"]) for r in runs]
        out[method] = entry
    return out


def _pm(stat: tuple[float, float | None], digits: int = 1) -> str:
    return f"{stat[0]:.{digits}f}" + ("" if stat[1] is None else f" ± {stat[1]:.{digits}f}")


def table(results: dict) -> str:
    """Markdown: the metrics table (mean ± standard deviation over seeds), then the router table."""
    stats, levels = per_method(results), pyramid_sizes(IMAGE_SIZE)
    floor = results["data_floor"]
    head = (["method", "trainable parameters", "learning rate"] + [f"SWD {s}px" for s in levels]
            + ["SWD mean", "spectrum dB", "retention SWD", "retention dB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, params, lr, s):
        cells = ([name, params, lr] + [_pm(v) for v in s["target_swd"]]
                 + [_pm(s["target_swd_mean"]), _pm(s["target_spectrum"], 2), _pm(s["retention_swd_mean"]),
                    _pm(s["retention_spectrum"], 2)])
        lines.append("| " + " | ".join(cells) + " |")

    lines.append("| held-out data (noise floor) | | | " + " | ".join(f"{v:.1f}" for v in floor["target_swd"])
                 + f" | {sum(floor['target_swd']) / len(floor['target_swd']):.1f} | {floor['target_spectrum']:.2f}"
                 + f" | {sum(floor['retention_swd']) / len(floor['retention_swd']):.1f}"
                 + f" | {floor['retention_spectrum']:.2f} |")
    row("base model (not adapted)", "0", "", stats["base"])
    for method, title in results["methods"].items():
        weights, router = results["counts"][method]
        params = f"{weights + router:,}" + (f" ({weights:,} + router {router:,})" if router else "")
        row(f"{title} ({stats[method]['seeds']} seeds)", params, f"{results['learning_rates'][method]:g}",
            stats[method])
    for name in NOT_BUILT:
        lines.append(f"| {name} | SODA: not built yet |" + " |" * (len(head) - 2))
    routed = [(results["methods"][m], stats[m]["router"]) for m in results["methods"] if "router" in stats[m]]
    if routed:
        lines += ["", "| routed method | routing entropy (1 = uniform) | expert-weight spread over the steps "
                  "| leading expert at high / low noise, per seed |", "|---|---|---|---|"]
        for title, r in routed:
            leads = ", ".join(f"{hi} / {lo}" for hi, lo in r["leads"])
            lines.append(f"| {title} | {_pm(r['entropy'], 2)} | {_pm(r['spread'], 2)} | {leads} |")
    return "\n".join(lines) + "\n"


def save_levels_plot(results: dict, path) -> None:
    """Two panels (target, retention): SWD per pyramid level, methods side by side, bars at the mean over seeds
    with the standard deviation; the dotted line is held-out data against held-out data (the noise floor)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..atomic import atomic_write

    stats, levels = per_method(results), pyramid_sizes(IMAGE_SIZE)
    names = ["base", *results["methods"]]
    titles = {"base": "base model", **results["methods"]}
    fig = Figure(figsize=(10, 3.6), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "target_swd", "new class (target)"),
                           (axes[1], "retention_swd", "base classes (retention)")):
        for i, name in enumerate(names):
            means = [m for m, _ in stats[name][key]]
            spreads = [s or 0.0 for _, s in stats[name][key]]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(levels))]
            ax.bar(xs, means, width, yerr=spreads, capsize=2, label=titles[name],
                   color="0.7" if name == "base" else None)
        for j, v in enumerate(results["data_floor"][key]):
            ax.hlines(v, j - 0.45, j + 0.45, colors="k", linestyles="dotted")
        ax.set_xticks(range(len(levels)), [f"{s} x {s}" for s in levels])
        ax.set_xlabel("Laplacian pyramid level (finest first)")
        ax.set_ylabel("SWD x 1e3 (lower is closer)")
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def save_samples(samples: dict, data: dict, titles: dict, path, per_row: int = 8) -> None:
    """Seed-0 samples of every method from the same noise: the new label's first images, then two of each
    base label."""
    def row(sets):
        return torch.cat([sets["test"][:per_row - 4], sets["test disc"][:2], sets["test wave"][:2]])
    rows = {"held-out data": row(data)}
    rows.update({("base model" if name == "base" else titles[name].replace(", ", ",\n")): row(out)
                 for name, out in samples.items()})
    save_grid(rows, path)
