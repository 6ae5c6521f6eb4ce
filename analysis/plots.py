"""Figures: learning curves over seeds, SED indices of one run, scaling with the agent count.

matplotlib's object API on the Agg canvas: no pyplot, so no display, no global figure registry to
leak from, and nothing that depends on the user's default backend. Every axis names its unit.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reled_hpc.errors import ReledError

from .load import Group, RunData
from .stats import first_round_by_iteration, mean_band, mean_std, seconds_per_iteration, x_values

CURVE_METRICS = ("mean_return", "mean_travel_time", "arrival_rate")
# metric -> (axis label with unit, factor from stored value to shown value)
METRIC_LABELS: dict[str, tuple[str, float]] = {
    "mean_return": ("mean return (sum of rewards per agent)", 1.0),
    "mean_travel_time": ("mean travel time (s)", 1.0),
    "arrival_rate": ("arrival rate (%)", 100.0),
    "expert_arrival_rate": ("expert arrival rate (%)", 100.0),
    "failed_rate": ("failed rate (%)", 100.0),
    "execution_rate": ("program execution rate (%)", 100.0),
    "expert_travel_time": ("expert travel time (s)", 1.0),
    "bg_mean_travel_time": ("background travel time (s)", 1.0),
    "mean_time_censored": ("travel time, censored at the horizon (s)", 1.0),
    "alpha_mean": ("alpha (mean over agents)", 1.0),
    "dtw_mean": ("DTW (map-scale units)", 1.0),
    "rvi_max": ("RVI (units of r_max/(1-gamma))", 1.0),
    "pdi_max": ("PDI (nats)", 1.0),
    "llm_latency_s": ("LLM latency per iteration (s)", 1.0),
    "rss_mb_max": ("peak RSS (MB)", 1.0),
    "env_steps": ("env steps", 1.0),
    "wall_s": ("wall time (s)", 1.0),
}
X_LABELS = {"env_steps": "env steps", "wall_s": "wall time (s)", "iteration": "iteration"}
REF_STYLES = {"shortest_path": ("black", "--"), "fastest_path": ("tab:brown", "-."), "random": ("grey", ":")}
FORMATS = (".png", ".svg", ".pdf")


def metric_label(name: str) -> tuple[str, float]:
    return METRIC_LABELS.get(name, (name.replace("_", " "), 1.0))


def _colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def check_output(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise ReledError(f"{p}: unsupported figure format {p.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return p


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure (format from the suffix) and free it."""
    p = check_output(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(p, dpi=120)
    except OSError as exc:
        raise ReledError(f"{p}: cannot write the figure ({exc})") from exc
    return p


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure on the Agg canvas (constrained layout: room for long labels) and its axes array."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def shared_legend(fig: Figure, axes: Any) -> None:
    """One legend under all panels: group labels can be long, and every panel has the same groups."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    if not seen:
        return
    ncol = 1 if max(map(len, seen)) > 70 else min(3, len(seen))
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=ncol, fontsize=8)
    rows = -(-len(seen) // ncol)
    w, h = fig.get_size_inches()
    fig.set_size_inches(w, h + 0.22 * rows)


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes, color="grey")


def _maybe_log(ax: Any, values: np.ndarray, axis: str = "y") -> None:
    """Log scale when the positive values span more than two decades (RVI is worst-case large)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and v.max() / v.min() > 100:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


# ---------------------------------------------------------------------------- learning curves
def plot_curves(
    groups: Sequence[Group],
    metrics: Sequence[str] = CURVE_METRICS,
    x: str = "env_steps",
    references: dict[str, dict[str, float]] | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per metric: per group the mean over seeds with a 95% confidence band, and the
    reference policies as horizontal lines."""
    fig, axes = new_figure(1, len(metrics), (5.6 * len(metrics), 4.4))
    colors = _colors(len(groups))
    for ax, m in zip(axes[0], metrics, strict=True):
        label, scale = metric_label(m)
        drawn = False
        for color, g in zip(colors, groups, strict=True):
            band = mean_band([(x_values(r, x), r.metric(m) * scale) for r in g.runs])
            if band is None:
                continue
            drawn = True
            name = f"{g.label} (n={band.n})"
            if band.x.size == 1:
                ax.errorbar(band.x, band.mean, yerr=band.hi - band.mean, fmt="o", color=color, label=name)
                continue
            ax.plot(band.x, band.mean, color=color, label=name, lw=1.6)
            if band.n > 1:
                ax.fill_between(band.x, band.lo, band.hi, color=color, alpha=0.2, lw=0)
        for policy, vals in (references or {}).items():
            if m in vals and math.isfinite(vals[m]):
                c, ls = REF_STYLES.get(policy, ("tab:olive", "--"))
                ax.axhline(vals[m] * scale, color=c, ls=ls, lw=1.2, label=f"{policy} (reference)")
                drawn = True
        if not drawn:
            _no_data(ax, f"finite {m}")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0])
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Learning curves: mean over seeds, 95% confidence band (t interval)")
    shared_legend(fig, axes)
    return fig


# ---------------------------------------------------------------------------- SED
def plot_sed(
    run: RunData,
    progs: dict[str, np.ndarray],
    recomputed: dict[str, np.ndarray] | None = None,
    title: str | None = None,
) -> Figure:
    """RVI, PDI (accepted plans per iteration, first round dashed), execution rate, alpha, DTW over
    iterations, and the measured external return change against the RVI bound."""
    it = run.iterations
    fig, axes = new_figure(2, 3, (16, 8.6))
    first = first_round_by_iteration(progs)

    def index_panel(ax: Any, key: str, k0: str, tau_key: str, name: str, unit_label: str) -> None:
        v = run.metric(key)
        shown = np.r_[v, first[k0]]
        if np.isfinite(shown).any():
            ax.plot(it, v, "o-", ms=3, label=f"{name} of the kept plans (max over subsets)")
            if np.isfinite(first[k0]).any():
                ax.plot(first["iteration"], first[k0], "x--", ms=4, alpha=0.8, label=f"{name} of round 1 (max)")
            tau = run.cfg(tau_key)
            if isinstance(tau, int | float):
                ax.axhline(tau, color="red", ls=":", label=f"threshold {tau_key.split('.')[-1]} = {tau:g}")
            _maybe_log(ax, shown)
            ax.legend(fontsize=8)
        else:
            _no_data(ax, name)
        ax.set_title(f"{name} per iteration")
        ax.set_xlabel("iteration")
        ax.set_ylabel(unit_label)

    index_panel(axes[0, 0], "rvi_max", "rvi0", "sed.tau_R", "RVI", "RVI (units of r_max/(1-gamma))")
    index_panel(axes[0, 1], "pdi_max", "pdi0", "sed.tau_P", "PDI", "PDI (nats)")

    ax = axes[0, 2]
    er = run.metric("execution_rate") * 100
    if np.isfinite(er).any():
        ax.plot(it, er, "o-", ms=3, color="tab:green")
        ax.set_ylim(-3, 103)
    else:
        _no_data(ax, "program execution rate")
    ax.set_title("LLM programs executed")
    ax.set_xlabel("iteration")
    ax.set_ylabel("execution rate (%)")

    for ax, key, name in ((axes[1, 0], "alpha_mean", "alpha"), (axes[1, 1], "dtw_mean", "DTW")):
        v = run.metric(key)
        drawn = False
        if np.isfinite(v).any():
            ax.plot(it, v, "o-", ms=3, label="from the metrics")
            drawn = True
        if recomputed is not None and np.isfinite(recomputed[key]).any():
            ax.plot(recomputed["iteration"], recomputed[key], "x--", ms=4, label="recomputed from the rows")
            drawn = True
        if drawn:
            ax.legend(fontsize=8)
            if key == "alpha_mean":
                ax.set_ylim(-0.03, 1.03)
        else:
            _no_data(ax, name)
        ax.set_title(f"{name} (mean over agents)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("alpha = exp(-kappa DTW)" if key == "alpha_mean" else "DTW (map-scale units)")

    ax = axes[1, 2]
    bound, change = run.metric("rvi_max"), run.metric("external_change_max")
    ok = np.isfinite(bound) & np.isfinite(change)
    if ok.any():
        sc = ax.scatter(bound[ok], change[ok], c=it[ok], cmap="viridis", s=18)
        fig.colorbar(sc, ax=ax, label="iteration")
        lim = [0.0, float(max(bound[ok].max(), change[ok].max())) * 1.05 or 1.0]
        positive = (bound[ok] > 0).all() and (change[ok] > 0).all()
        if positive:
            lim[0] = float(min(bound[ok].min(), change[ok].min())) / 1.5
        ax.plot(lim, lim, "k--", lw=1, label="y = x (bound attained)")
        if positive and lim[1] / lim[0] > 100:
            ax.set_xscale("log")
            ax.set_yscale("log")
        below = int((change[ok] <= bound[ok]).sum())
        ax.legend(fontsize=8, title=f"{below}/{int(ok.sum())} under the bound", title_fontsize=8)
    else:
        _no_data(ax, "measured external change")
    ax.set_title("measured external return change vs RVI bound")
    ax.set_xlabel("RVI bound (rvi_max, units of r_max/(1-gamma))")
    ax.set_ylabel("measured change (same units)")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(title or f"SED / HPO: {run.algorithm}, seed {run.seed} ({run.path})")
    return fig


# ---------------------------------------------------------------------------- scaling
def plot_scaling(groups: Sequence[Group], title: str | None = None) -> Figure:
    """Final travel time and seconds per iteration against the total agent count, per group
    (groups formed ignoring the agent and rank counts); mean ± std over the runs of each count."""
    fig, axes = new_figure(1, 2, (12, 4.6))
    colors = _colors(len(groups))
    panels = ((axes[0, 0], lambda r: r.final("mean_travel_time"), "final mean travel time (s)"),
              (axes[0, 1], seconds_per_iteration, "seconds per iteration (median, s)"))  # fmt: skip
    counts_all: set[int] = set()
    for ax, fn, ylabel in panels:
        for color, g in zip(colors, groups, strict=True):
            by_n: dict[int, list[RunData]] = {}
            for r in g.runs:
                if r.total_agents is not None:
                    by_n.setdefault(r.total_agents, []).append(r)
            if not by_n:
                continue
            ns = sorted(by_n)
            counts_all.update(ns)
            stats = [mean_std([fn(r) for r in by_n[n]]) for n in ns]
            mean = np.array([s[0] for s in stats])
            std = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.errorbar(ns, mean, yerr=std, fmt="o-", capsize=3, color=color, label=g.label)
        ax.set_xlabel("total agents (all ranks)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
        ax.grid(alpha=0.3, which="both")
        if counts_all and max(counts_all) / max(min(counts_all), 1) >= 10:
            ax.set_xscale("log")
        if counts_all:  # ticks at the agent counts measured, not at round numbers between them
            ax.set_xticks(sorted(counts_all), [str(n) for n in sorted(counts_all)])
            ax.minorticks_off()
        if not ax.get_legend_handles_labels()[0]:
            _no_data(ax, "agent counts")
    fig.suptitle(title or "Scaling with the number of agents (mean ± std over runs)")
    shared_legend(fig, axes[:, :1])
    return fig
