"""The figures of a campaign (`results/<campaign>/figures/`): PNG and SVG of each, drawn from the merged cells.

- `pareto`: output tokens/s per GPU against tokens/s per user (1/TPOT) for every layout and arrival, a panel per
  model and workload, with the Pareto frontier drawn and its points labelled;
- `throughput_vs_gpus` (log–log) and `scaling_efficiency` (tokens/s per GPU as a share of the smallest GPU
  count's, the ideal being 1): per strategy family, its best layout at each GPU count against the ideal (dotted),
  a panel per model and workload; the USL fit dashed on the first (from `fits` when given, else fitted here as
  fits.py does);
- `reasoning_cliff`: output tokens/s per GPU against the output length per layout, per model;
- `kv_capacity`: KV-cache capacity per replica and the layout's maximum concurrency, model × layout tables;
- `best_layout`: the best layout at each model's single-node GPU count, over model size × workload;
- `latency`: TTFT and TPOT, p50 to p99, per layout, per model (times in ms, or s from 10 s up);
- `energy`: energy per output token per layout and output length (measured backends only);
- `predicted_vs_measured`: the sim's predictions against measured cells (from `infscale validate`'s tables).

A figure whose data is missing is not drawn; its `FigureResult.skipped` says why. Points from predicted rows (the
`sim` backend) are drawn hollow, measured ones filled, and each panel says which it shows and names its workload.
Every layout has one colour and marker in every figure of a campaign (`layout_styles`), every strategy family one
style (`family_style`). Log axes carry plain labels (1, 2, 5 × 10^k within two decades). The files hold the
figure grown to the bounding box of every artist (`saved_box`), so no legend or title is cut off. Per-model panels
of reasoning_cliff, kv_capacity, best_layout, latency and energy compare the layouts of the model's largest
single-node GPU count; the summary lists every GPU count.

The files are deterministic (the artifact evaluation regenerates and compares them byte for byte): fixed size,
DPI, fonts and SVG id salt, no dates or software versions in the metadata, every input sorted.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from infscale.analysis.variants import labelled, with_variant
from infscale.results.columns import upgrade_frame
from infscale.results.io import write_bytes_atomic, write_text_atomic

DPI = 100
PANEL = (3.0, 2.1)           # inches per panel (the axes alone)
SMALL_PANEL = (2.4, 1.7)     # … in the model × workload grids
GRID_WORKLOADS = 4           # workload columns of a grid at most (spread over the campaign's workloads)
PARALLEL_ABOVE_CELLS = 300   # ok cells from which two processes draw (below, a process costs more than it saves)
MANIFEST = "figures.json"
# Okabe & Ito's colour-blind-safe palette, yellow last (weak on white paper); markers tell series apart in grey
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", ":", "-."]
FAMILIES = ["single", "dp", "tp", "pp", "tp×dp", "pp×dp", "tp×pp", "tp×pp×dp"]
RC = {
    "svg.hashsalt": "infscale",       # fixed ids in the SVG
    "svg.fonttype": "none",           # text as text: half the time of glyph paths, and searchable
    "font.family": "DejaVu Sans",     # shipped with matplotlib
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.grid": True,
    "axes.grid.which": "major",
    "grid.alpha": 0.3,
    "savefig.dpi": DPI,
    "path.simplify": False,
}
PREDICTED_NOTE = "hollow markers: predicted (sim); filled: measured"


@dataclass(frozen=True)
class FigureResult:
    name: str
    caption: str
    png: Path | None = None
    svg: Path | None = None
    skipped: str | None = None      # why the figure was not drawn

    def manifest_entry(self) -> dict[str, object]:
        return {"name": self.name, "caption": self.caption, "png": self.png.name if self.png else None,
                "svg": self.svg.name if self.svg else None, "skipped": self.skipped}


class Skip(Exception):
    """Raised by a figure function when the data has no rows for it; the message says why."""


def render_figures(cells: pl.DataFrame, out_dir: Path, *, fits: pl.DataFrame | None = None,
                   validation: pl.DataFrame | None = None, title: str,
                   model_params: dict[str, float] | None = None, workers: int = 1) -> list[FigureResult]:
    """Draw every figure into `out_dir` (PNG + SVG each) and write `figures.json` listing them, with the reason for
    each one skipped. `validation`: rows of `infscale validate`'s tables, optionally with a `predictor` column
    (which prediction they hold, e.g. the hardware profile); `model_params`: total parameters per model (for the
    best-layout map's order; else the catalog's, else the weights' size). `workers` 2: a large campaign's figures
    are drawn by this process and a spawned one (the caller's main module must be import-safe, as a command
    line's is)."""
    out_dir = Path(out_dir)
    # the plan's capacity columns hold for every feasible cell, measured yet or not ("planned")
    data = prepare_data(cells, fits=fits, validation=validation, model_params=model_params)
    names = [name for name, *_ in FIGURES]
    if min(workers, os.cpu_count() or 1) > 1 and data["ok"].height >= PARALLEL_ABOVE_CELLS:
        # a large campaign's grids take seconds each: a second process draws half of them (spawned, not
        # forked: polars must not be forked after it has run); the files do not depend on who drew them
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        here, there = _split(names)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            other = pool.submit(_render_many, there, data, title, out_dir)
            drawn = {r.name: r for r in (_render_one(name, data, title, out_dir) for name in here)}
            drawn.update({r.name: r for r in other.result()})
        results = [drawn[name] for name in names]
    else:
        results = [_render_one(name, data, title, out_dir) for name in names]
    manifest = {"title": title, "figures": [r.manifest_entry() for r in results]}
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return results


# rough drawing seconds of each figure on the demo campaign: to split them evenly between two processes
COST = {"pareto": 2.5, "throughput_vs_gpus": 1.9, "scaling_efficiency": 2.0, "latency": 1.3, "kv_capacity": 0.9,
        "reasoning_cliff": 0.7, "best_layout": 0.4}
SPAWN_COST = 1.5  # a spawned process's imports


def _split(names: list[str]) -> tuple[list[str], list[str]]:
    """The figures this process draws and those a spawned one draws, about equal in time (greedy by cost)."""
    here, there, load = [], [], [0.0, SPAWN_COST]
    for name in sorted(names, key=lambda n: -COST.get(n, 0.3)):
        side = 0 if load[0] <= load[1] else 1
        (here, there)[side].append(name)
        load[side] += COST.get(name, 0.3)
    return here, there


def _render_many(names: list[str], data: dict[str, object], title: str, out_dir: Path) -> list[FigureResult]:
    return [_render_one(name, data, title, out_dir) for name in names]


def _render_one(name: str, data: dict[str, object], title: str, out_dir: Path) -> FigureResult:
    import matplotlib

    caption = next(entry[2] for entry in FIGURES if entry[0] == name)
    with matplotlib.rc_context(RC):
        try:
            figure = draw_figure(name, data, title)
        except Skip as why:
            _remove(out_dir, name)  # a figure drawn from older data must not outlive it
            return FigureResult(name, caption, skipped=str(why))
        return FigureResult(name, caption, *_save(figure, out_dir, name))


def prepare_data(cells: pl.DataFrame, *, fits: pl.DataFrame | None = None, validation: pl.DataFrame | None = None,
                 model_params: dict[str, float] | None = None) -> dict[str, object]:
    """What the figure functions take (as `render_figures` gives it to them): the ok cells, the planned ones, the
    layout styles, fits, validation and model sizes."""
    prepared = _prepare(cells)
    return {"ok": prepared.filter(pl.col("status") == "ok"), "fits": fits, "validation": validation,
            "model_params": model_params, "styles": layout_styles(prepared),
            "planned": prepared.filter((pl.col("status") != "infeasible") & (pl.col("kv_capacity_tokens") > 0))}


def draw_figure(name: str, data: dict[str, object], title: str):  # -> matplotlib.figure.Figure
    """One figure with its title, log-axis ticks settled (call inside `matplotlib.rc_context(RC)`); raises Skip."""
    _, headline, _, draw = next(entry for entry in FIGURES if entry[0] == name)
    if data["ok"].is_empty() and name not in ("kv_capacity", "predicted_vs_measured"):
        raise Skip("no cell has been measured or predicted yet (no row with status ok)")
    figure = draw(**data)
    heading = f"{title}\n{headline}" + (f"\n{figure.infscale_note}" if getattr(figure, "infscale_note", None) else "")
    if figure.get_layout_engine() is None:  # fixed margins (_grid) leave the top 0.75 in to the title
        figure.suptitle(heading, fontsize=10, y=1 - 0.08 / figure.get_figheight(), va="top")
    else:
        figure.suptitle(heading, fontsize=10)
    for ax in figure.axes:
        _decade_ticks(ax)
    return figure


def read_manifest(out_dir: Path) -> list[FigureResult] | None:
    """The figures `render_figures` wrote into `out_dir` (None when it has not run there)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    entries = json.loads(path.read_text())["figures"]
    return [FigureResult(e["name"], e["caption"], Path(out_dir) / e["png"] if e["png"] else None,
                         Path(out_dir) / e["svg"] if e["svg"] else None, e["skipped"]) for e in entries]


def read_validation(paths: list[Path]) -> pl.DataFrame | None:
    """`infscale validate`'s tables as one, with a `predictor` column naming what predicted: `catalog` for
    validation.parquet, the hardware profile for validation.<profile>.parquet. None when there is none."""
    frames = []
    for path in sorted(Path(p) for p in paths):
        predictor = path.name.removeprefix("validation").removesuffix(".parquet").lstrip(".") or "catalog"
        frames.append(pl.read_parquet(path).with_columns(pl.lit(predictor).alias("predictor")))
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


# ------------------------------------------------------------------------------------------- shared pieces


def _prepare(cells: pl.DataFrame) -> pl.DataFrame:
    """The cells, sorted, with a `series` label (model, plus the weights' dtype when a model has several), a
    `predicted_point` flag (the `predicted` column; a null there counts as predicted for the sim backend), the
    compact layout name and the strategy family. Callers pick the statuses they draw."""
    ok = upgrade_frame(cells)  # a merged table of schema 1.x: typed lengths (results/columns.py)
    if ok.is_empty():
        return ok
    dtypes = ok.group_by("model").agg(pl.col("weight_dtype").n_unique().alias("dtypes"))
    # names per distinct layout, not per row: a Python call per row costs most of a second on a large campaign
    layouts = ok.select("layout", "dp", "tp", "pp").unique().sort("layout")
    names = layouts.with_columns(
        pl.Series("short", [short_layout(name) for name in layouts.get_column("layout")], dtype=pl.String),
        pl.Series("family", [_family(*degrees) for degrees in layouts.select("dp", "tp", "pp").iter_rows()],
                  dtype=pl.String))
    ok = with_variant(ok.join(dtypes, on="model", how="left").join(names, on=["layout", "dp", "tp", "pp"],
                                                                   how="left", nulls_equal=True))
    ok = ok.with_columns(labelled("short").alias("short")).with_columns(  # a swept engine knob: its own line
        pl.when(pl.col("dtypes") > 1).then(pl.col("model") + " " + pl.col("weight_dtype")).otherwise(pl.col("model"))
        .alias("series"),
        pl.col("predicted").fill_null(pl.col("backend") == "sim").alias("predicted_point"),
    )
    return ok.sort("series", "gpus", "layout", "workload", "isl_max", "osl_max", "arrival", "cell_id")


def _family(dp: int, tp: int, pp: int) -> str:
    from infscale.analysis.fits import family

    return family(dp, tp, pp)


def short_layout(layout: str) -> str:
    """'dp4tp1pp1' -> 'dp4', 'dp1tp2pp2' -> 'tp2pp2', 'dp1tp1pp1' -> '1 GPU' (degrees of 1 left out)."""
    parts, name = [], layout
    for prefix in ("dp", "tp", "pp", "ep"):
        if not name.startswith(prefix):
            continue
        digits = ""
        name = name[len(prefix):]
        while name and name[0].isdigit():
            digits, name = digits + name[0], name[1:]
        if digits and digits != "1":
            parts.append(f"{prefix}{digits}")
    return "".join(parts) + name if parts or name else "1 GPU"


def _node_gpus(rows: pl.DataFrame) -> int:
    """The largest GPU count of single-node cells (else the smallest count): where the summary compares layouts."""
    single = rows.filter(pl.col("nodes") == 1)
    return int(single.get_column("gpus").max()) if single.height else int(rows.get_column("gpus").min())


def _kind(rows: pl.DataFrame) -> str:
    flags = set(rows.get_column("predicted_point").to_list())
    return "mixed" if len(flags) > 1 else ("predicted" if flags == {True} else "measured")


def _workload_label(row: dict) -> str:
    arrival = "" if row["arrival"] in ("off", "offline") else f", {row['arrival']}"
    return f"{row['workload']} {row['isl_label']}/{row['osl_label']}{arrival}"


def _title(ax, series: str, row: dict, kind: str, gpus: bool = True, osl: bool = True) -> None:
    """Two lines: the model, then what the panel holds (GPU count, workload, measured or predicted)."""
    parts = [f"{int(row['gpus'])} GPUs"] if gpus else []
    parts.append(_workload_label(row) if osl else f"{row['workload']} ISL {row['isl_label']}")
    ax.set_title(f"{series}\n{', '.join(parts)} ({kind})")


def _style(index: int) -> dict[str, object]:
    """The index-th of 64 distinct colour × marker pairs (then the line style changes too)."""
    return {"color": PALETTE[index % len(PALETTE)],
            "marker": MARKERS[(index + index // len(PALETTE)) % len(MARKERS)],
            "linestyle": LINESTYLES[(index // len(PALETTE)) % len(LINESTYLES)]}


def layout_styles(cells: pl.DataFrame) -> dict[str, dict[str, object]]:
    """The one layout → colour, marker and line style mapping that every figure of a campaign uses: each layout
    (engine variants apart) gets its own colour × marker pair, in the order GPU count, TP, PP, EP."""
    if cells.is_empty():
        return {}
    order = (cells.select("short", "gpus", "tp", "pp", "ep").unique("short")
             .sort("gpus", "tp", "pp", "ep", "short").get_column("short").to_list())
    return {label: _style(index) for index, label in enumerate(order)}


def family_style(family: str) -> dict[str, object]:
    """Strategy families keep one style in every figure (their place in FAMILIES)."""
    return _style(FAMILIES.index(family) if family in FAMILIES else len(FAMILIES) + sum(map(ord, family)) % 8)


def _points(ax, x, y, predicted, style: dict[str, object], size: float = 5.0) -> None:
    """Markers filled for measured points, hollow for predicted ones (no line)."""
    x, y, predicted = np.asarray(x), np.asarray(y), np.asarray(predicted, dtype=bool)
    for mask, face in ((~predicted, style["color"]), (predicted, "none")):
        if mask.any():
            ax.plot(x[mask], y[mask], linestyle="none", marker=style["marker"], markersize=size,
                    markerfacecolor=face, markeredgecolor=style["color"])


def _line(ax, x, y, predicted, style: dict[str, object], markersize: float = 5) -> None:
    predicted = np.asarray(predicted, dtype=bool)
    if predicted.all() or not predicted.any():  # one artist for line and markers: the usual case, and cheaper
        ax.plot(x, y, color=style["color"], linestyle=style["linestyle"], linewidth=1.2, marker=style["marker"],
                markersize=markersize, markerfacecolor="none" if predicted.all() else style["color"])
        return
    ax.plot(x, y, color=style["color"], linestyle=style["linestyle"], linewidth=1.2)
    _points(ax, x, y, predicted, style, markersize)


def _legend_handles(labels: list[str], styles: dict[str, dict], kinds: set[str], lines: bool = True) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=styles[label]["color"], linestyle=styles[label]["linestyle"] if lines else "none",
                      marker=styles[label]["marker"], markersize=5, label=label) for label in labels]
    return handles + _kind_handles(kinds)


def _kind_handles(kinds: set[str]) -> list:
    from matplotlib.lines import Line2D

    handles = []
    if kinds & {"measured", "mixed"}:
        handles.append(Line2D([], [], color="#555555", linestyle="none", marker="o", label="measured"))
    if kinds & {"predicted", "mixed"}:
        handles.append(Line2D([], [], color="#555555", linestyle="none", marker="o", markerfacecolor="none",
                              label="predicted (sim)"))
    return handles


def _grid(panels: int, columns: int, legend_rows: int = 0, rotated_ticks: bool = False, title_lines: int = 2,
          panel: tuple[float, float] = PANEL, right_axis: float = 0.0, header_lines: int = 2):
    """`panels` axes of a fixed size in rows of `columns`, with fixed margins in inches (matplotlib's constrained
    layout would measure every label again and double the drawing time)."""
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    width, height = panel
    left, right, wspace = 0.85, 0.2 + right_axis, 0.85 + right_axis   # y tick labels and label (each side)
    titles = 0.2 * title_lines + 0.05                 # the panels' titles
    top = 0.75 + 0.2 * (header_lines - 2) + titles    # the figure's title (two lines: campaign, figure) above
    below = 0.55 + (0.45 if rotated_ticks else 0.0)   # x tick labels and label
    hspace = below + titles + 0.05
    bottom = below + 0.15 + 0.2 * legend_rows
    figure_width = left + columns * width + (columns - 1) * wspace + right
    figure_height = top + rows * height + (rows - 1) * hspace + bottom
    figure = Figure(figsize=(figure_width, figure_height))
    grid = figure.add_gridspec(rows, columns, left=left / figure_width, right=1 - right / figure_width,
                               top=1 - top / figure_height, bottom=bottom / figure_height,
                               wspace=wspace / width, hspace=hspace / height)
    axes = [figure.add_subplot(grid[i // columns, i % columns]) for i in range(panels)]
    return figure, axes


def _legend(figure, handles: list, columns: int = 6) -> None:
    if figure.get_layout_engine() is None:
        figure.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.01),
                      ncols=min(columns, max(1, len(handles))), fontsize=8, frameon=False)
    else:
        figure.legend(handles=handles, loc="outside lower center", ncols=min(columns, max(1, len(handles))),
                      fontsize=8, frameon=False)


def _log2_axis(ax, values) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({int(v) for v in values})
    _log(ax, "x", 2)
    ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)  # markers at the ends stay whole
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_count(t) for t in ticks])


def _log(ax, axis: str = "y", base: float = 10) -> None:
    """A log scale with plain tick labels: matplotlib's default 10^k labels go through mathtext, which costs a
    second per figure on a small machine."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    getattr(ax, f"set_{axis}scale")("log", base=base)
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda value, _: _count(value) if base == 2 else _plain(value)))
    target.set_minor_locator(NullLocator())  # minor ticks cost time and say little here
    target.set_minor_formatter(NullFormatter())


def _plain(value: float) -> str:
    """Tick labels without exponents: 0.05, 2.5, 1,000, 1,000,000 (one style on every axis)."""
    if value == 0:
        return "0"
    if abs(value) >= 1:
        return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 * abs(value) else f"{value:,.3g}"
    return f"{value:.3g}"


def _decade_ticks(ax) -> None:
    """Major ticks of a base-10 log axis: at 1, 2, 5 × 10^k (or every 10^k where that would crowd it, every
    second or third decade beyond six), at evenly spaced round numbers within less than a decade that holds no
    two of those: always two or more labelled ticks, never more than six."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        if axis.get_scale() != "log" or getattr(axis.get_transform(), "base", 10) != 10:
            continue
        low, high = sorted(getattr(ax, f"get_{name}lim")())
        if not (low > 0 and high > low):
            continue
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        step = max(1, math.ceil((last - first) / 6))

        def ticks(subs: tuple[float, ...]) -> list[float]:
            return [m * 10.0**k for k in range(first, last + 1) if (k - first) % step == 0 for m in subs
                    if low * (1 - 1e-9) <= m * 10.0**k <= high * (1 + 1e-9)]

        chosen = ticks((1, 2, 5))
        if len(chosen) > 6 or (step > 1 and len(ticks((1,))) >= 2):
            chosen = ticks((1,))
        if len(chosen) < 2:  # within less than a decade: round numbers, evenly spaced
            chosen = [t for t in MaxNLocator(4, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high) if low <= t <= high]
        axis.set_major_locator(FixedLocator(chosen))


def _count(value: float) -> str:
    return f"{value / 1024:g}K" if value >= 1024 and value % 1024 == 0 else f"{value:g}"


def _save(figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    png, svg = io.BytesIO(), io.BytesIO()
    # zlib level 1: a third of the default level's encoding time, files a little larger
    options = {"format": "png", "dpi": DPI, "metadata": {"Software": None}, "pil_kwargs": {"compress_level": 1}}
    figure.savefig(png, **options)
    # a constrained layout is settled by the first drawing; freezing it spares the later ones a second pass
    figure.set_layout_engine("none")
    box = saved_box(figure, canvas.get_renderer())
    if box is not None:  # something reaches past the edge: draw the whole of it
        png = io.BytesIO()
        figure.savefig(png, bbox_inches=box, **options)
    figure.savefig(svg, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches=box)
    return (write_bytes_atomic(out_dir / f"{name}.png", png.getvalue()),
            write_bytes_atomic(out_dir / f"{name}.svg", svg.getvalue()))


def saved_box(figure, renderer=None):  # -> matplotlib.transforms.Bbox (inches) | None
    """None when every artist lies inside the figure; else the figure grown to the bounding box of them all, with
    a small margin, for the files to hold (a legend or title wider than the panels is never cut off). `renderer`:
    the one of a drawing of the figure (its text layout is reused); else the figure is laid out first.

    Only what can reach past the edge is measured — texts, legends, titles, the axes' tick labels and labels —
    since everything drawn inside an axes is clipped to it (matplotlib's own `get_tightbbox` measures every line
    too and costs several times more)."""
    from matplotlib.transforms import Bbox

    if renderer is None:
        figure.draw_without_rendering()
        renderer = figure.canvas.get_renderer()
    boxes = [artist.get_window_extent(renderer) for artist in [*figure.texts, *figure.legends]
             if artist.get_visible()]
    for ax in figure.axes:
        if not ax.get_visible():
            continue
        boxes.append(ax.get_window_extent(renderer))
        for artist in [ax.title, ax._left_title, ax._right_title, *ax.texts, *([ax.legend_] if ax.legend_ else [])]:
            if artist.get_visible() and (not hasattr(artist, "get_text") or artist.get_text()):
                boxes.append(artist.get_window_extent(renderer))
        for axis in (ax.xaxis, ax.yaxis):
            box = axis.get_tightbbox(renderer)
            if box is not None:
                boxes.append(box)
    tight = Bbox.union(boxes).transformed(figure.dpi_scale_trans.inverted())
    width, height = figure.get_size_inches()
    if tight.x0 >= 0 and tight.y0 >= 0 and tight.x1 <= width and tight.y1 <= height:
        return None
    margin = 0.05
    return Bbox.from_extents(min(0.0, tight.x0 - margin), min(0.0, tight.y0 - margin),
                             max(width, tight.x1 + margin), max(height, tight.y1 + margin))


def _remove(out_dir: Path, name: str) -> None:
    for suffix in (".png", ".svg"):
        (out_dir / f"{name}{suffix}").unlink(missing_ok=True)


def _best_group(rows: pl.DataFrame, keys: list[str], score: Callable[[pl.DataFrame], tuple]) -> pl.DataFrame:
    """The rows of the group (by `keys`) with the highest score; ties go to the first group in sorted order."""
    best, best_score = None, None
    for _, group in sorted(rows.group_by(keys), key=lambda item: tuple(str(v) for v in item[0])):
        value = score(group)
        if best_score is None or value > best_score:
            best, best_score = group, value
    return best


WORKLOAD = ["weight_dtype", "workload", "isl_label", "osl_label", "arrival"]


# ------------------------------------------------------------------------------------------- the figures


def _workload_key(row: dict) -> tuple:
    return tuple(row[k] for k in WORKLOAD[1:])


def _scaling_panels(ok: pl.DataFrame) -> tuple[list[str], list[tuple], dict[tuple, pl.DataFrame]]:
    """Rows (series), columns (workloads, by name, ISL, OSL and arrival) and the cells of each (series, workload)
    that has two or more GPU counts: the panels of the scaling figures."""
    panels = {}
    for (series, *workload), group in ok.group_by(["series", *WORKLOAD[1:]]):
        if group.get_column("gpus").n_unique() >= 2:
            panels[(series, tuple(workload))] = group
    if not panels:
        raise Skip("no model has cells of one workload at two or more GPU counts")
    rows = sorted({series for series, _ in panels})
    order = ok.select(*WORKLOAD[1:], "isl_max", "osl_max").unique().sort("workload", "isl_max", "osl_max",
                                                                          "arrival")
    columns = [key for key in order.select(WORKLOAD[1:]).unique(maintain_order=True).iter_rows()
               if any((series, key) in panels for series in rows)]
    return rows, columns, panels


def _pick_columns(columns: list[tuple], label) -> tuple[list[tuple], str | None]:
    """At most GRID_WORKLOADS workload columns, spread evenly over the sorted workloads (first and last kept):
    a campaign of many workloads would otherwise draw hundreds of panels. The note names the ones left out."""
    if len(columns) <= GRID_WORKLOADS:
        return columns, None
    picked = sorted({round(i * (len(columns) - 1) / (GRID_WORKLOADS - 1)) for i in range(GRID_WORKLOADS)})
    shown = [columns[i] for i in picked]
    left_out = [label(c) for c in columns if c not in shown]
    return shown, (f"{len(shown)} of {len(columns)} workloads shown; not drawn: {', '.join(left_out)} "
                   "(summary.md and cells.parquet have every one)")


def _panel_matrix(rows: list[str], columns: list[tuple], present, legend_rows: int = 1, right_axis: float = 0.0,
                  header_lines: int = 2):
    """A grid of small panels, a row per series and a column per workload; the absent ones hidden."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _grid(len(rows) * len(columns), len(columns), legend_rows=legend_rows, panel=SMALL_PANEL,
                         right_axis=right_axis, header_lines=header_lines)
    for ax in axes:  # few ticks: they cost most of a small panel's drawing
        ax.yaxis.set_major_locator(MaxNLocator(4))
    grid = {}
    for index, ax in enumerate(axes):
        key = (rows[index // len(columns)], columns[index % len(columns)])
        if key in present:
            grid[key] = ax
        else:
            ax.set_visible(False)
    return figure, grid


def _family_best(group: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per strategy family, its best cell at each GPU count (the pure families share the 1-GPU point, as in
    fits.py): one line each."""
    single = group.filter(pl.col("gpus") == 1)
    families = sorted(set(group.get_column("family").to_list()) - {"single"},
                      key=lambda f: (FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f))
    lines = {}
    for fam in families:
        points = group.filter(pl.col("family") == fam)
        if "×" not in fam:
            points = pl.concat([single, points])
        lines[fam] = points.sort("output_tok_s", descending=True).unique("gpus", keep="first").sort("gpus")
    return lines


def _baseline(group: pl.DataFrame) -> dict:
    """The reference of ideal scaling: the best cell at the panel's smallest GPU count."""
    smallest = group.filter(pl.col("gpus") == group.get_column("gpus").min())
    return smallest.sort("output_tok_s", descending=True).row(0, named=True)


def _scaling_figure(ok: pl.DataFrame, fits: pl.DataFrame | None, metric: str) -> object:
    """The scaling figures: `total` (tokens/s, log-log, ideal: linear in the GPU count) and `per_gpu` (tokens/s
    per GPU as a share of the smallest GPU count's: the scaling efficiency X(N) / (N/N0 · X(N0)), ideal 1; each
    panel's y label says what 1 is in tokens/s per GPU)."""
    from matplotlib.lines import Line2D

    if metric == "total" and fits is not None and {"law", "x", "family", "model", *WORKLOAD} <= set(fits.columns):
        fits = fits.filter((pl.col("law") == "usl") & (pl.col("x") == "gpus"))
    else:
        fits = None
    rows, columns, panels = _scaling_panels(ok)
    columns, note = _pick_columns(columns, lambda c: _workload_label(dict(zip(WORKLOAD[1:], c))))
    families = {f for key, group in panels.items() if key[1] in columns for f in group.get_column("family").unique()}
    figure, grid = _panel_matrix(rows, columns, panels, header_lines=3 if note else 2,
                                 legend_rows=math.ceil((len(families) + 4) / 8))
    figure.infscale_note = note
    first_column = {series: min((columns.index(w) for s_, w in grid if s_ == series)) for series in rows}
    kinds, families, fitted = set(), set(), False  # families: those drawn (the 1-GPU "single" is in each)
    for (series, workload), ax in grid.items():
        group = panels[(series, workload)]
        base = _baseline(group)
        counts = sorted(set(group.get_column("gpus").to_list()))
        n0, x0 = base["gpus"], base["output_tok_s"]
        for fam, best in _family_best(group).items():
            gpus, tok_s = best.get_column("gpus"), best.get_column("output_tok_s")
            y = {"total": tok_s, "per_gpu": tok_s / gpus / (x0 / n0)}[metric]
            _line(ax, gpus, y, best["predicted_point"], family_style(fam), markersize=4)
            families.add(fam)
            kinds.add(_kind(best))
            if metric == "total":
                fitted |= _usl_curve(ax, fits, group.row(0, named=True), fam, best, family_style(fam))
        ideal_x = np.array([counts[0], counts[-1]], dtype=float)
        per_gpu0 = x0 / n0
        ideal = {"total": x0 * ideal_x / n0, "per_gpu": np.ones(2)}[metric]
        ax.plot(ideal_x, ideal, color="#555555", linewidth=0.9, linestyle=":", zorder=1)
        _log2_axis(ax, counts)
        if metric == "total":
            _log(ax, "y")
        else:  # per-GPU throughput as a share of the smallest count's: the scaling efficiency (one axis: cheap)
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.15))
        ax.set_xlabel("GPUs")
        if metric == "per_gpu":  # the scale of each panel: what efficiency 1 is in tokens/s per GPU
            ax.set_ylabel(f"efficiency (1 = {per_gpu0:,.0f}\ntok/s/GPU at {n0} GPU{'s' if n0 > 1 else ''})",
                          fontsize=7)
        elif columns.index(workload) == first_column[series]:
            ax.set_ylabel("output tok/s")
        ax.set_title(f"{series}\n{_workload_label(group.row(0, named=True))} ({_kind(group)})", fontsize=8)
    ordered = sorted(families, key=lambda f: (FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f))
    handles = _legend_handles(ordered, {f: family_style(f) for f in ordered}, kinds)
    handles.append(Line2D([], [], color="#555555", linewidth=0.9, linestyle=":",
                          label={"total": "ideal: linear in GPUs",
                                 "per_gpu": "ideal: efficiency 1 (flat per GPU)"}[metric]))
    if fitted:
        handles.append(Line2D([], [], color="#555555", linewidth=0.8, linestyle=(0, (4, 2)), label="USL fit"))
    _legend(figure, handles, 8)
    return figure


def throughput_vs_gpus(ok: pl.DataFrame, fits: pl.DataFrame | None = None, **_) -> object:
    return _scaling_figure(ok, fits, "total")


def scaling_efficiency(ok: pl.DataFrame, **_) -> object:
    """The per-GPU variant: tokens/s per GPU relative to the smallest GPU count's, i.e. the scaling efficiency."""
    return _scaling_figure(ok, None, "per_gpu")


def pareto(ok: pl.DataFrame, styles: dict[str, dict] | None = None, **_) -> object:
    """Output tok/s per GPU against tok/s per user (1000 / TPOT p50 in ms) for every layout and concurrency of a
    model and workload, the frontier drawn through the points no other beats on both."""
    rows_ok = ok.filter(pl.col("tpot_ms_p50").is_not_null() & (pl.col("tpot_ms_p50") > 0))
    if rows_ok.is_empty():
        raise Skip("no cell has a TPOT p50 (per-user speed)")
    styles = styles or layout_styles(rows_ok)
    keys = ["series", "workload", "isl_label", "osl_label"]  # arrivals (concurrencies) of a workload share a panel
    panels = {}
    for (series, *workload), group in rows_ok.group_by(keys):
        panels[(series, tuple(workload))] = group.with_columns((1e3 / pl.col("tpot_ms_p50")).alias("user_tok_s"))
    rows = sorted({series for series, _ in panels})
    order = rows_ok.select("workload", "isl_label", "osl_label", "isl_max", "osl_max").unique().sort(
        "workload", "isl_max", "osl_max")
    columns = [key for key in order.select("workload", "isl_label", "osl_label").unique(maintain_order=True)
               .iter_rows() if any((series, key) in panels for series in rows)]
    columns, note = _pick_columns(columns, lambda c: f"{c[0]} {c[1]}/{c[2]}")
    used = sorted({s for (series, key), group in panels.items() if key in columns
                   for s in group.get_column("short").to_list()}, key=list(styles).index)
    # room on the right for the frontier's labels
    figure, grid = _panel_matrix(rows, columns, panels, legend_rows=math.ceil(len(used) / 8) + 1, right_axis=0.4,
                                 header_lines=3 if note else 2)
    figure.infscale_note = note
    kinds = set()
    for (series, workload), ax in grid.items():
        group = panels[(series, workload)].sort("short", "arrival")
        for (short,), points in group.group_by(["short"], maintain_order=True):
            _points(ax, points["user_tok_s"], points["output_tok_s_per_gpu"], points["predicted_point"],
                    styles[short], size=4.5)
        front = _frontier(group)
        ax.plot(front["user_tok_s"], front["output_tok_s_per_gpu"], color="#333333", linewidth=0.9, zorder=1)
        for row in front.iter_rows(named=True):
            ax.annotate(f"{row['short']} {row['arrival']}", (row["user_tok_s"], row["output_tok_s_per_gpu"]),
                        xytext=(3, 3), textcoords="offset points", fontsize=6, color="#333333")
        _log(ax, "x")
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)  # room for the labels above the highest point
        ax.set_xlabel("tok/s per user (1000 / TPOT p50)")
        ax.set_ylabel("output tok/s per GPU")
        arrivals = ", ".join(sorted(group.get_column("arrival").unique().to_list()))
        ax.set_title(f"{series}\n{workload[0]} {workload[1]}/{workload[2]}, {arrivals} ({_kind(group)})",
                     fontsize=8)
        kinds.add(_kind(group))
    from matplotlib.lines import Line2D

    handles = _legend_handles(used, styles, kinds, lines=False)
    handles.append(Line2D([], [], color="#333333", linewidth=0.9, label="frontier (labelled: layout, arrival)"))
    _legend(figure, handles, 8)
    return figure


def _frontier(group: pl.DataFrame) -> pl.DataFrame:
    """The points no other point beats on both per-user speed and per-GPU throughput, by falling speed."""
    front, best = [], -math.inf
    for row in group.sort(["user_tok_s", "output_tok_s_per_gpu"], descending=[True, True]).iter_rows(named=True):
        if row["output_tok_s_per_gpu"] > best:
            front.append(row)
            best = row["output_tok_s_per_gpu"]
    return pl.DataFrame(front, schema=group.schema).sort("user_tok_s")


def _usl_curve(ax, fits: pl.DataFrame | None, where: dict, fam: str, points: pl.DataFrame, style: dict) -> bool:
    """The family's USL curve: from `fits` where given, else fitted here on the same points as fits.py fits (its
    point estimate does not depend on the bootstrap), so the figures need not wait for `infscale fit`."""
    from infscale.analysis.fits import fit_law, usl

    if points.height < 3:
        return False
    if fits is not None:
        match = fits.filter((pl.col("family") == fam)
                            & pl.all_horizontal([pl.col(k) == where[k] for k in ("model", *WORKLOAD)]))
        if match.is_empty():
            return False
        params = [match.row(0, named=True)[f"p{i}"] for i in range(3)]
    else:
        fit = fit_law("usl", points.get_column("gpus").to_numpy(), points.get_column("output_tok_s").to_numpy(),
                      bootstrap=0)
        if fit is None:
            return False
        params = [fit["lambda"], fit["sigma"], fit["kappa"]]
    n = np.geomspace(float(points.get_column("gpus").min()), float(points.get_column("gpus").max()), 40)
    ax.plot(n, usl(n, *params), color=style["color"], linewidth=0.8, linestyle=(0, (4, 2)))
    return True


def reasoning_cliff(ok: pl.DataFrame, styles: dict[str, dict] | None = None, **_) -> object:
    panels = []
    for series in ok.get_column("series").unique().sort().to_list():
        rows = ok.filter(pl.col("series") == series)
        rows = rows.filter(pl.col("gpus") == _node_gpus(rows))
        group = _best_group(rows, ["weight_dtype", "workload", "isl_label", "arrival"],
                            lambda g: (g.get_column("osl_max").n_unique(), g.height))
        if group.get_column("osl_max").n_unique() >= 2:
            panels.append((series, group))
    if not panels:
        raise Skip("no layout has cells at two or more output lengths (OSL) of one workload")
    styles = styles or layout_styles(ok)
    layouts = sorted({s for _, g in panels for s in g.get_column("short").unique().to_list()}, key=list(styles).index)
    figure, axes = _grid(len(panels), 4, legend_rows=math.ceil(len(layouts) / 8))
    kinds = set()
    for ax, (series, group) in zip(axes, panels):
        for layout in sorted(group.get_column("short").unique().to_list()):
            line = group.filter(pl.col("short") == layout).sort("osl_max")
            _line(ax, line["osl_max"], line["output_tok_s_per_gpu"], line["predicted_point"], styles[layout])
        kinds.add(_kind(group))
        _log2_axis(ax, group.get_column("osl_max").to_list())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("output length OSL (tokens)")
        ax.set_ylabel("output tokens/s per GPU")
        _title(ax, series, group.row(0, named=True), _kind(group), osl=False)
    _legend(figure, _legend_handles(layouts, styles, kinds), 8)
    return figure


def kv_capacity(planned: pl.DataFrame, model_params: dict[str, float] | None = None, **_) -> object:
    rows = planned
    if rows.is_empty():
        raise Skip("no feasible cell has a KV capacity (kv_capacity_tokens)")
    sizes = _model_sizes(rows, model_params)
    series_list = sorted(rows.get_column("series").unique().to_list(), key=lambda s: (sizes.get(s, math.inf), s))
    capacity, concurrency, labels = {}, {}, []
    for series in series_list:
        cells = rows.filter(pl.col("series") == series)
        gpus = _node_gpus(cells)
        cells = cells.filter(pl.col("gpus") == gpus).with_columns(
            (pl.col("isl_max") + pl.col("osl_max")).alias("length"))
        longest = int(cells.get_column("length").max())
        labels.append(f"{series}, {gpus} GPUs (ISL+OSL {_count(longest)})")
        for row in cells.sort("short", "length").iter_rows(named=True):
            held = None
            if not row["predicted_point"] and row["kv_pool_blocks"]:  # what the measured engine held
                held = row["kv_pool_blocks"] * row["kv_block_size"]
            capacity[(series, row["short"])] = (row["kv_capacity_tokens"], held)
            if row["length"] == longest:
                concurrency[(series, row["short"])] = row["max_concurrency"]
    layouts = sorted({layout for _, layout in capacity})
    from matplotlib.figure import Figure

    width = max(7.0, 0.62 * len(layouts) + 3.6)
    figure = Figure(figsize=(width, 2 * (0.42 * len(series_list) + 1.3) + 1.0), layout="constrained")
    top, bottom = figure.subplots(2, 1)
    _heatmap(top, series_list, labels, layouts, {k: v[0] for k, v in capacity.items()},
             {k: f"{_thousands(v[0])}" + (f"\n(held {_thousands(v[1])})" if v[1] and abs(v[1] / v[0] - 1) > 0.01
                                         else "") for k, v in capacity.items()})
    top.set_title("KV-cache capacity per replica, tokens (planned"
                  f"{'; held: what the measured engine had' if any(v[1] for v in capacity.values()) else ''})")
    _heatmap(bottom, series_list, labels, layouts, concurrency, {k: f"{v:,}" for k, v in concurrency.items()})
    bottom.set_title("max concurrent sequences at the longest ISL+OSL (planned)")
    for ax in (top, bottom):
        ax.set_xlabel("layout")
    return figure


def _thousands(tokens: float) -> str:
    return f"{tokens / 1e6:.2f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}K"


def _heatmap(ax, series_list: list[str], labels: list[str], layouts: list[str], values: dict, texts: dict) -> None:
    """A series × layout table coloured by the value (log scale, viridis: readable without colour vision)."""
    from matplotlib.colors import LogNorm

    grid = np.full((len(series_list), len(layouts)), np.nan)
    for (series, layout), value in values.items():
        if value:
            grid[series_list.index(series), layouts.index(layout)] = value
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()) * 1.0001)
    ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
    for (series, layout), text in sorted(texts.items()):
        value = values.get((series, layout))
        if value:
            dark = norm(value) < 0.6
            ax.text(layouts.index(layout), series_list.index(series), text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(layouts)), layouts, rotation=30, ha="right")
    ax.set_yticks(range(len(series_list)), labels)
    ax.grid(False)


def best_layout(ok: pl.DataFrame, model_params: dict[str, float] | None = None, **_) -> object:
    rows = []
    for series in ok.get_column("series").unique().sort().to_list():
        cells = ok.filter(pl.col("series") == series)
        at_n = cells.filter(pl.col("gpus") == _node_gpus(cells))
        for _, group in sorted(at_n.group_by(WORKLOAD[1:]), key=lambda item: tuple(str(v) for v in item[0])):
            if group.get_column("layout").n_unique() < 2:
                continue  # one layout is no choice
            winner = group.sort(["output_tok_s", "layout"], descending=[True, False]).row(0, named=True)
            rows.append({**winner, "column": _workload_label(winner)})
    if not rows:
        raise Skip("no model has two or more layouts of one GPU count measured on one workload")
    table = pl.DataFrame(rows, infer_schema_length=None)
    sizes = _model_sizes(ok, model_params)
    series_order = sorted(table.get_column("series").unique().to_list(),
                          key=lambda s: (sizes.get(s, math.inf), s))
    columns = (table.select("column", "osl_max", "isl_max").unique("column")
               .sort(["osl_max", "isl_max", "column"]).get_column("column").to_list())
    families = sorted(table.get_column("family").unique().to_list(),
                      key=lambda f: (FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f))
    colours = {f: PALETTE[(FAMILIES.index(f) if f in FAMILIES else i) % len(PALETTE)] for i, f in enumerate(families)}
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    kind = _kind(table)
    mixed = kind == "mixed"

    figure = Figure(figsize=(max(6.0, 1.25 * len(columns) + 2.5), 0.55 * len(series_order) + 2.2),
                    layout="constrained")
    ax = figure.subplots()
    for row in table.iter_rows(named=True):
        x, y = columns.index(row["column"]), series_order.index(row["series"])
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=colours[row["family"]], alpha=0.45,
                               edgecolor="white"))
        star = "*" if row["predicted_point"] and mixed else ""
        ax.text(x, y, f"{row['short']}{star}\n{row['output_tok_s_per_gpu']:,.0f}", ha="center", va="center",
                fontsize=7)
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylim(len(series_order) - 0.5, -0.5)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(series_order)), [_size_label(s, sizes) for s in series_order])
    ax.grid(False)
    ax.set_xlabel("workload ISL/OSL (tokens)")
    ax.set_ylabel("model (total parameters)")
    ax.set_title(f"best layout and its output tokens/s per GPU ({kind}{'; *: predicted' if mixed else ''})")
    _legend(figure, [Patch(facecolor=colours[f], alpha=0.45, label=f) for f in families], 8)
    return figure


def _model_sizes(ok: pl.DataFrame, model_params: dict[str, float] | None) -> dict[str, float]:
    """Total parameters per series: given, else from the catalog, else the weights' bytes (a monotone stand-in)."""
    from infscale.catalog.models import CatalogError, get_model

    sizes = {}
    for row in ok.select("series", "model", "weights_gib_per_gpu", "tp", "pp").unique("series").iter_rows(named=True):
        if model_params and row["model"] in model_params:
            sizes[row["series"]] = float(model_params[row["model"]])
            continue
        try:
            sizes[row["series"]] = float(get_model(row["model"]).param_counts().total)
        except CatalogError:
            weights = row["weights_gib_per_gpu"]
            sizes[row["series"]] = math.inf if weights is None else weights * row["tp"] * row["pp"] * 2**30 / 2
    return sizes


def _size_label(series: str, sizes: dict[str, float]) -> str:
    size = sizes.get(series, math.inf)
    return series if not math.isfinite(size) else f"{series} ({size / 1e9:.0f}B)"


def latency(ok: pl.DataFrame, styles: dict[str, dict] | None = None, **_) -> object:
    metrics = ["ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"]
    rows = ok.filter(pl.all_horizontal([pl.col(m).is_not_null() for m in metrics]))
    if rows.is_empty():
        raise Skip("no cell has TTFT and TPOT percentiles")
    styles = styles or layout_styles(rows)
    panels = []
    for series in rows.get_column("series").unique().sort().to_list():
        cells = rows.filter(pl.col("series") == series)
        cells = cells.filter(pl.col("gpus") == _node_gpus(cells))
        panels.append((series, _best_group(cells, WORKLOAD, lambda g: (g.height, g.get_column("osl_max")[0]))))
    figure, axes = _grid(2 * len(panels), 4, legend_rows=1 + math.ceil(len(styles) / 8), rotated_ticks=True)
    kinds, used = set(), set()
    for index, (series, group) in enumerate(panels):
        group = group.sort("short")
        names = group.get_column("short").to_list()
        used.update(names)
        x = np.arange(len(names))
        for ax, metric, label in ((axes[2 * index], "ttft_ms", "TTFT"), (axes[2 * index + 1], "tpot_ms", "TPOT")):
            scale, unit = time_unit(group.get_column(f"{metric}_p99").to_numpy())
            for i, name in enumerate(names):
                style = styles[name]
                p50, p99 = group[f"{metric}_p50"][i] * scale, group[f"{metric}_p99"][i] * scale
                ax.vlines(i, p50, p99, color=style["color"], linewidth=1.2)
                ax.plot(i, p99, marker="_", markersize=9, color=style["color"], linestyle="none")
                _points(ax, [i], [p50], [group["predicted_point"][i]], style)
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_xlim(-0.6, len(names) - 0.4)
            _log(ax, "y")
            ax.set_ylabel(f"{label} ({unit})")
            ax.set_title(f"{series}: {label}\n{int(group['gpus'][0])} GPUs, {_workload_label(group.row(0, named=True))}"
                         f" ({_kind(group)})", fontsize=8)
        kinds.add(_kind(group))
    from matplotlib.lines import Line2D

    ordered = sorted(used, key=list(styles).index)
    handles = _legend_handles(ordered, styles, kinds, lines=False)
    handles.append(Line2D([], [], color="#555555", marker="_", markersize=9, linestyle="-", label="bar: p50 (marker) "
                          "to p99 (dash)"))
    _legend(figure, handles, 8)
    return figure


def time_unit(values_ms) -> tuple[float, str]:
    """Milliseconds, or seconds when the largest value is 10 s or more: (factor from ms, unit)."""
    finite = np.asarray(values_ms, dtype=float)
    finite = finite[np.isfinite(finite)]
    return (1e-3, "s") if finite.size and finite.max() >= 10_000 else (1.0, "ms")


def energy(ok: pl.DataFrame, **_) -> object:
    rows = ok.filter(pl.col("energy_per_output_token_j").is_not_null())
    if rows.is_empty():
        raise Skip("no cell has an energy per output token: the sim backend predicts no energy; measured "
                   "backends record it from GPU telemetry")
    series_list = rows.get_column("series").unique().sort().to_list()
    osls = sorted(rows.get_column("osl_max").unique().to_list())
    styles = {o: _style(i) for i, o in enumerate(osls)}
    figure, axes = _grid(len(series_list), 3, legend_rows=1, rotated_ticks=True)
    width = 0.8 / len(osls)
    for ax, series in zip(axes, series_list):
        cells = rows.filter(pl.col("series") == series)
        gpus = _node_gpus(cells)
        cells = cells.filter(pl.col("gpus") == gpus)
        names = sorted(cells.get_column("short").unique().to_list())
        for index, osl in enumerate(osls):
            bars = cells.filter(pl.col("osl_max") == osl).group_by("short").agg(
                pl.col("energy_per_output_token_j").mean(), pl.col("predicted_point").all()).sort("short")
            if bars.is_empty():
                continue
            x = np.array([names.index(n) for n in bars["short"].to_list()]) + (index - (len(osls) - 1) / 2) * width
            ax.bar(x, bars["energy_per_output_token_j"], width, color=styles[osl]["color"],
                   hatch=["//" if p else None for p in bars["predicted_point"].to_list()], edgecolor="white")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_xlabel("layout")
        ax.set_ylabel("energy per output token (J)")
        workloads = ", ".join(f"{w} ISL {i}" for w, i in cells.select("workload", "isl_label").unique().sort(
            "workload", "isl_label").iter_rows())
        ax.set_title(f"{series}\n{gpus} GPUs, {workloads} ({_kind(cells)})", fontsize=8)
    from matplotlib.patches import Patch

    _legend(figure, [Patch(color=styles[o]["color"], label=f"OSL {_count(o)}") for o in osls], 8)
    return figure


VALIDATED = [("output_tok_s", "output throughput (tokens/s)"), ("tpot_ms_p50", "TPOT p50 (ms)"),
             ("ttft_ms_p50", "TTFT p50 (ms)")]


def predicted_vs_measured(ok: pl.DataFrame, validation: pl.DataFrame | None = None, **_) -> object:
    if validation is None or validation.is_empty():
        raise Skip("no validation table: `infscale validate` writes one for a campaign with measured cells")
    missing = [f"{m}_{k}" for m, _ in VALIDATED for k in ("measured", "predicted") if f"{m}_{k}" not in
               validation.columns]
    if missing:
        raise Skip(f"the validation table lacks {', '.join(missing)}")
    if "predictor" not in validation.columns:
        validation = validation.with_columns(pl.lit("sim").alias("predictor"))
    if "in_medians" not in validation.columns:
        validation = validation.with_columns(pl.lit(True).alias("in_medians"))
    validation = validation.with_columns(pl.col("in_medians").fill_null(False))
    validation = validation.sort("predictor", "model", "layout", "isl", "osl", "cell_id")
    models = validation.get_column("model").unique().sort().to_list()
    predictors = validation.get_column("predictor").unique().sort().to_list()
    figure, axes = _grid(len(VALIDATED), 3, legend_rows=math.ceil((len(models) + len(predictors)) / 6),
                         title_lines=1 + len(predictors))
    for ax, (metric, label) in zip(axes, VALIDATED):
        rows = validation.filter(pl.col(f"{metric}_measured").is_not_null()
                                 & pl.col(f"{metric}_predicted").is_not_null())
        if rows.is_empty():
            ax.text(0.5, 0.5, "no cell with both values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label)
            continue
        for m_index, model in enumerate(models):
            for p_index, predictor in enumerate(predictors):
                points = rows.filter((pl.col("model") == model) & (pl.col("predictor") == predictor))
                for counted in (True, False):  # faded: cells validate leaves out of its medians (eager path)
                    part = points.filter(pl.col("in_medians") == counted)
                    if part.height:
                        colour = PALETTE[m_index % len(PALETTE)]
                        ax.plot(part[f"{metric}_measured"], part[f"{metric}_predicted"], linestyle="none",
                                marker=MARKERS[p_index % len(MARKERS)], color=colour, alpha=1.0 if counted else 0.35,
                                markerfacecolor="none" if p_index else colour, markersize=6)
        values = np.concatenate([rows[f"{metric}_measured"].to_numpy(), rows[f"{metric}_predicted"].to_numpy()])
        low, high = float(values.min()) / 1.3, float(values.max()) * 1.3
        ax.plot([low, high], [low, high], color="#555555", linewidth=0.8)
        for factor in (0.75, 1.25):
            ax.plot([low, high], [low * factor, high * factor], color="#999999", linewidth=0.6, linestyle=":")
        _log(ax, "x")
        _log(ax, "y")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        errors = rows.filter(pl.col("in_medians")).group_by("predictor").agg(
            (pl.col(f"{metric}_predicted") / pl.col(f"{metric}_measured") - 1).abs().median().alias("error"),
            pl.len().alias("cells")).sort("predictor")
        ax.set_title(label + "\n" + "\n".join(f"{r['predictor']}: median |error| {r['error']:.0%} ({r['cells']} cells)"
                                                for r in errors.iter_rows(named=True)), fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=PALETTE[i % len(PALETTE)], marker="o", linestyle="none", label=m)
               for i, m in enumerate(models)]
    handles += [Line2D([], [], color="#555555", marker=MARKERS[i % len(MARKERS)], linestyle="none",
                       markerfacecolor="none" if i else "#555555", label=f"prediction: {p}")
                for i, p in enumerate(predictors)]
    handles.append(Line2D([], [], color="#999999", linestyle=":", label="±25 %"))
    if not validation.get_column("in_medians").all():
        handles.append(Line2D([], [], color="#555555", marker="o", alpha=0.35, linestyle="none",
                              label="faded: not in the medians (validate's in_medians)"))
    _legend(figure, handles, 3)
    return figure


FIGURES: list[tuple[str, str, str, Callable]] = [  # name, headline, caption, draw
    ("pareto", "Throughput per GPU vs speed per user (latency–throughput Pareto)",
     "Output tokens/s per GPU against tokens/s per user (1000 / TPOT p50 in ms), one point per layout (every GPU "
     "count) and arrival, a panel per model and workload; the line is the Pareto frontier (no other point is both "
     "faster per user and higher per GPU), its points labelled by layout and arrival (off: offline, cN: N "
     "requests in flight, rN: Poisson at N requests/s).", pareto),
    ("throughput_vs_gpus", "Throughput vs GPU count per strategy family",
     "Output throughput against the GPU count on log–log axes, per strategy family (the family's best layout at "
     "each count), a panel per model and workload; dotted: ideal linear scaling from the panel's smallest GPU "
     "count; USL fits dashed where fitted.", throughput_vs_gpus),
    ("scaling_efficiency", "Scaling efficiency (throughput per GPU) vs GPU count per strategy family",
     "Scaling efficiency X(N) / (N / N0 · X(N0)) of each strategy family's best layout at each GPU count N against "
     "the best cell at the panel's smallest GPU count N0: its output tokens/s per GPU as a share of N0's (each "
     "panel's axis says what 1 is in tokens/s per GPU), a panel per model and workload; dotted: the ideal, 1.",
     scaling_efficiency),
    ("reasoning_cliff", "Per-GPU throughput vs output length (the reasoning cliff)",
     "Output tokens/s per GPU against the output length (OSL), per layout at each model's "
     "single-node GPU count: the reasoning cliff, where the KV cache, not compute, caps the batch.", reasoning_cliff),
    ("kv_capacity", "KV capacity and maximum concurrency per layout",
     "KV-cache capacity per replica and the layout's maximum concurrent sequences at the model's longest ISL+OSL, "
     "per model and layout at its single-node GPU count, as the memory model plans them for every feasible cell "
     "(measured or not); 'held' is the pool a measured engine actually had, where it differs.", kv_capacity),
    ("best_layout", "Best layout by model size and workload",
     "Best layout (highest output throughput) at each model's single-node GPU count, over model size "
     "and workload; colour: the strategy family; number: output tokens/s per GPU.", best_layout),
    ("latency", "TTFT and TPOT, p50 and p99, per layout",
     "TTFT and TPOT at p50 and p99 per layout, at each model's single-node GPU count (one workload per "
     "model: the one with the most layouts). Offline arrival: TTFT includes the time a request queues.", latency),
    ("energy", "Energy per output token",
     "Energy per output token per layout and output length, from GPU telemetry (NVML energy counters).",
     energy),
    ("predicted_vs_measured", "Predicted vs measured",
     "The sim backend's predictions against measured cells (output throughput, TPOT and TTFT p50), from "
     "`infscale validate`; the solid line is a perfect prediction, dotted ±25 %. Medians over the cells validate "
     "counts (in_medians: the eager-path cells, host-bound, are shown faded and left out).",
     predicted_vs_measured),
]
