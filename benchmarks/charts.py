"""PNG charts of the benchmarks' tables (matplotlib, a benchmark-only dependency: `pip install matplotlib`).

Each benchmark prints its Markdown table and, beside it, writes a chart of the same numbers to benchmarks/charts/
(`--chart PATH` moves it, `--chart none` skips it). A chart's title names the machine, date and commit of the run,
as the table's first line does; with matplotlib missing the benchmark says so and writes none.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

CHARTS = Path(__file__).with_name("charts")
# One color per engine, always (llama-server is llama.cpp's own server)
COLORS = {"lamina": "#2563eb", "llama.cpp": "#ea580c", "llama-server": "#ea580c", "transformers": "#16a34a"}
OTHER = ["#7c3aed", "#db2777", "#0891b2", "#65a30d"]


def default_path(script: str) -> str:
    """benchmarks/charts/<name>.png for benchmarks/bench_<name>.py."""
    return str(CHARTS / f"{Path(script).stem.removeprefix('bench_')}.png")


def add_option(parser, script: str) -> None:
    """The benchmark's `--chart PATH` option (default: default_path; "none": no chart)."""
    parser.add_argument(
        "--chart",
        default=default_path(script),
        help="where to write the PNG chart of the table (default: %(default)s; 'none' for no chart)",
    )


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def colors(names) -> list[str]:
    """A color per series: an engine's own (by the series name's first word) for its first series, then others."""
    out, used, spare = [], set(), iter(OTHER * 4)
    for name in names:
        engine = name.split()[0].rstrip(",")
        out.append(COLORS[engine] if engine in COLORS and engine not in used else next(spare))
        used.add(engine)
    return out


def figure(panels: int, title: str, width: float = 6.0):
    """A row of `panels` axes under a two-line title (what was measured; the machine, date and commit), or None."""
    plt = _pyplot()
    if plt is None:
        return None, [None] * panels
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 4.6), squeeze=False)
    # A title line wider than the figure is wrapped (~14 characters an inch at this size)
    fig.suptitle("\n".join(textwrap.fill(line, int(14 * width * panels)) for line in title.split("\n")), fontsize=10)
    for ax in axes[0]:
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return fig, list(axes[0])


def lines(ax, x: list, series: dict[str, dict], xlabel: str, ylabel: str, title: str, log_x: bool = False) -> None:
    """One line per engine: series[engine] = {x: (median, low, high)}; a range is drawn as an error bar. An engine
    with a single point (a peer that only runs one stream) is a marker."""
    for color, (name, points) in zip(colors(series), series.items()):
        xs = [v for v in x if v in points]
        if not xs:
            continue
        mid = [points[v][0] for v in xs]
        err = [[points[v][0] - points[v][1] for v in xs], [points[v][2] - points[v][0] for v in xs]]
        ax.errorbar(xs, mid, yerr=err, label=name, color=color, marker="o", capsize=3, linewidth=2)
        for v, m in zip(xs, mid):
            ax.annotate(f"{m:.0f}", (v, m), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_ylim(bottom=0)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()


def bars(ax, groups: list[str], series: dict[str, list], ylabel: str, title: str, log_y: bool = False) -> None:
    """Grouped bars: one group per label in `groups`, one bar per engine in it (None: no bar), values written on
    the bars."""
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (color, (name, values)) in enumerate(zip(colors(series), series.items())):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not shown:
            continue
        rects = ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=name, color=color)
        labels = [f"{v:.0f}" if v >= 10 else f"{v:.1f}" for _, v in shown]
        ax.bar_label(rects, labels=labels, fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    if log_y:
        ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (6 if log_y else 1.3))  # room above the bars for the legend
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8, ncols=2 if n > 2 else 1, loc="upper left")


def save(fig, path: str) -> None:
    """Write the figure as a PNG (its folder made where missing) and say where."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}", file=sys.stderr)
