"""`analyze report`: one self-contained HTML page (figures inlined as base64 PNG) for a sweep."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from pathlib import Path

from reled_hpc import __version__
from reled_hpc.errors import DumpError, ReledError

from .load import Sweep, group_runs, open_dump, run_data
from .plots import plot_curves, plot_scaling, plot_sed, png_bytes
from .rows import recompute_hpo
from .stats import FINAL_WINDOW, read_programs
from .tables import RobustOptions, compare, fmt_pct, fmt_s, to_html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.ref td { color: #555; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.problems li { color: #a40; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_report(
    sweep: Sweep, threshold: float | None, max_sed: int = 12, options: RobustOptions | None = None
) -> tuple[str, list[str]]:
    """(HTML page, problems noted on the way)."""
    runs = sweep.runs
    groups = group_runs(runs)
    problems = [*sweep.bad, *(p for r in runs for p in r.problems)]
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>reled-hpc report: {esc(str(sweep.root))}</title><style>{STYLE}</style></head><body>",
        "<h1>reled-hpc analysis report</h1>",
        f"<p>Sweep <code>{esc(str(sweep.root))}</code>: {len(runs)} readable runs in {len(groups)} groups"
        f"{f', {len(sweep.bad)} unreadable' if sweep.bad else ''}. "
        f"References: <code>{esc(str(sweep.references_path or 'none'))}</code>. "
        f"Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} by reled-hpc {esc(__version__)}.</p>",
    ]
    intro = len(parts)
    label_of = {id(r): g.label for g in groups for r in g.runs}

    parts.append("<h2>Comparison</h2>")
    parts.append(to_html(compare(groups, sweep.references, threshold, FINAL_WINDOW, options)))  # with its notes

    parts.append("<h2>Learning curves</h2>")
    for x, what in (("env_steps", "env steps"), ("wall_s", "wall time")):
        fig = plot_curves(groups, x=x, references=sweep.references,
                          title=f"Learning curves vs {what}: mean over seeds, 95% confidence band")  # fmt: skip
        parts.append(_img(png_bytes(fig), f"learning curves vs {what}"))

    counts = {r.total_agents for r in runs if r.total_agents is not None}
    if len(counts) > 1:
        parts.append("<h2>Scaling</h2>")
        fig = plot_scaling(group_runs(runs, ignore=("agents", "ranks")))
        parts.append(_img(png_bytes(fig), "scaling with the agent count"))

    sed_runs = [r for r in runs if r.has_sed]
    if sed_runs:
        parts.append("<h2>SED / HPO</h2>")
        for r in sed_runs[:max_sed]:
            try:
                with open_dump(r.path) as d:
                    run = run_data(d)
                    recomputed, notes = recompute_hpo(d, run)
                    progs = read_programs(d)
            except DumpError as exc:
                problems.append(f"SED plot skipped: {exc}")
                continue
            problems += notes
            title = f"{label_of[id(r)]}, seed {r.seed}"
            parts.append(f"<h3>{esc(title)}</h3><p><code>{esc(str(r.path))}</code></p>")
            parts.append(_img(png_bytes(plot_sed(run, progs, recomputed, title=f"SED / HPO: {title}")), title))
        if len(sed_runs) > max_sed:
            parts.append(f"<p>{len(sed_runs) - max_sed} more runs with SED data not shown "
                         "(<code>reled-hpc analyze sed RUN.h5</code>).</p>")  # fmt: skip

    parts.append("<h2>Runs</h2><table><thead><tr><th>dump</th><th>group</th><th>seed</th><th>iterations</th>"
                 "<th>final travel time</th><th>final arrival rate</th></tr></thead><tbody>")  # fmt: skip
    for r in runs:
        parts.append(
            f"<tr><td>{esc(str(r.path))}</td><td>{esc(label_of[id(r)])}</td><td>{esc(str(r.seed))}</td>"
            f"<td>{r.n_iterations}</td><td>{fmt_s(r.final('mean_travel_time'))}</td>"
            f"<td>{fmt_pct(r.final('arrival_rate'))}</td></tr>"
        )
    parts.append("</tbody></table></body></html>")
    if problems:  # right after the introduction, where nobody misses it
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        parts.insert(intro, f'<h2>Problems</h2><ul class="problems">{items}</ul>')
    return "\n".join(parts) + "\n", problems


def write_report(page: str, out: str | Path) -> Path:
    p = Path(out)
    if p.suffix.lower() not in (".html", ".htm"):
        raise ReledError(f"{p}: the report is HTML; name it *.html")
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        p.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ReledError(f"{p}: cannot write the report ({exc})") from exc
    return p
