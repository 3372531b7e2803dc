"""The campaign report (`results/<campaign>/report.html`): one self-contained HTML file with the figures (PNG as
data URIs), the summary, the paper's claims, the fits and where the numbers came from.

Self-contained means no request leaves the file: no CDN, no font, no stylesheet or script from elsewhere; a
Content-Security-Policy forbids any. Every text that comes from data is escaped. A small inline script records on
load whether each figure rendered (`data-rendered` on each <figure>, counts on <body>), so a headless browser can
check the page (tests/test_report.py).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from infscale.analysis.figures import FigureResult, read_manifest
from infscale.results.io import write_text_atomic
from infscale.results.schemas import MERGED_STATUSES

# At most this many cell files are opened for their provenance; beyond it, the first and last cell of each bench job.
PROVENANCE_ALL_UP_TO = 200

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, 'DejaVu Sans', sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em;
       color: #111; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #333; max-width: 60em; }
.PASS { background: #d9f0e3; } .FAIL { background: #f8dcd0; } .NOT-TESTABLE { background: #eeeeee; }
code, pre { font-family: 'DejaVu Sans Mono', monospace; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
@media print { figure { break-inside: avoid; } details { display: block; } }
"""

# Runs on load: did every figure render? A broken data URI leaves naturalWidth at 0; an inline SVG without a box
# has no size; script errors and failed loads are counted (data-errors). The results go into DOM attributes that
# `chromium --dump-dom` shows.
CHECK_SCRIPT = """
var errors = 0;
window.addEventListener('error', function () {
  errors += 1;
  if (document.body) { document.body.dataset.errors = String(errors); }
}, true);
window.addEventListener('load', function () {
  if (errors) { document.body.dataset.errors = String(errors); }
  var figures = document.querySelectorAll('figure[data-figure]');
  var rendered = 0;
  figures.forEach(function (figure) {
    var ok = true;
    figure.querySelectorAll('img').forEach(function (img) {
      ok = ok && img.complete && img.naturalWidth > 0 && img.naturalHeight > 0;
    });
    figure.querySelectorAll('svg').forEach(function (svg) {
      var box = svg.getBoundingClientRect();
      ok = ok && box.width > 0 && box.height > 0;
    });
    if (!figure.querySelector('img, svg')) { ok = false; }
    figure.dataset.rendered = ok ? 'yes' : 'no';
    if (ok) { rendered += 1; }
  });
  document.body.dataset.figures = String(figures.length);
  document.body.dataset.figuresRendered = String(rendered);
  document.body.dataset.checked = 'yes';
});
"""


def write_report(run, out: Path | None = None) -> Path:  # run: infscale.pipeline.CampaignRun
    """Write the report of a campaign from its results directory (cells.parquet is required; the summary, fits,
    claims and figures are shown where they exist, else the report says which command makes them)."""
    if not run.merged_file.exists():
        raise FileNotFoundError(f"{run.merged_file} does not exist yet; run `infscale merge` first")
    cells = pl.read_parquet(run.merged_file)
    out = Path(out) if out else run.report_file
    text = report_html(
        campaign=run.campaign.name,
        description=run.campaign.spec.description,
        config_hash=run.campaign.config_hash,
        cells=cells,
        cells_config_hash=_metadata(run.merged_file).get("infscale.config_hash"),
        provenance=_cell_provenance(run, cells),
        figures=read_manifest(run.figures_dir),
        summary=run.summary_file.read_text() if run.summary_file.exists() else None,
        claims=pl.read_parquet(run.claims_file) if run.claims_file.exists() else None,
        fits=pl.read_parquet(run.fits_file) if run.fits_file.exists() else None,
        notes=(run.results_dir / "PROVENANCE.md").read_text() if (run.results_dir / "PROVENANCE.md").exists() else None,
    )
    write_text_atomic(out, text)
    return out


def report_html(*, campaign: str, description: str, config_hash: str, cells: pl.DataFrame,
                cells_config_hash: str | None, provenance: dict[str, object], figures: list[FigureResult] | None,
                summary: str | None, claims: pl.DataFrame | None, fits: pl.DataFrame | None,
                notes: str | None = None) -> str:
    """The report as one HTML string (no file access but the figures' PNGs)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{e(CSP)}">',
        f"<title>infscale report: {e(campaign)}</title>",
        f"<style>{STYLE}</style>",
        f"<script>{CHECK_SCRIPT}</script>",
        "</head><body>",
        f"<h1>Campaign <code>{e(campaign)}</code></h1>",
    ]
    if description:
        parts.append(f"<p>{e(description)}</p>")
    parts += _provenance_section(cells, config_hash, cells_config_hash, provenance, notes)
    parts += _figures_section(figures)
    parts += ["<h2>Summary</h2>", _markdown(summary) if summary else
              "<p>No summary yet (<code>infscale merge</code> writes it).</p>"]
    parts += _claims_section(claims)
    parts += _fits_section(fits)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- sections


def _provenance_section(cells: pl.DataFrame, config_hash: str, cells_config_hash: str | None,
                        provenance: dict[str, object], notes: str | None) -> list[str]:
    ok = cells.filter(pl.col("status") == "ok")
    statuses = Counter(cells.get_column("status").to_list())
    predicted = ok.select(pl.col("predicted").fill_null(pl.col("backend") == "sim")).to_series()
    hash_note = config_hash
    if cells_config_hash and cells_config_hash != config_hash:
        hash_note = f"{config_hash} (the merged cells were written under {cells_config_hash})"
    started, ended = ok.get_column("started_at").drop_nulls(), ok.get_column("ended_at").drop_nulls()
    rows = [
        ("config hash", hash_note),
        ("cells", ", ".join(f"{statuses[s]} {s}" for s in MERGED_STATUSES if statuses[s])),
        ("measured / predicted", f"{int((~predicted).sum())} measured, {int(predicted.sum())} predicted by the "
                                 "sim backend's model"),
        ("backends", _values(ok if ok.height else cells, "backend")),
        ("hardware", _values(cells, "hardware")),
        ("GPUs (as the cells report them)", _values(ok, "gpu_name") or "none reported (predicted cells)"),
        ("models", _values(cells, "model")),
        ("cells run from – to (UTC)", f"{started.min()} – {ended.max()}" if started.len() else "—"),
    ]
    for key, label in (("git_commit", "infscale git commits"), ("infscale_version", "infscale versions"),
                       ("hostname", "hosts"), ("python", "Python")):
        counts = provenance.get(key) or {}
        if counts:
            rows.append((label, ", ".join(f"{value} ({n} cells)" for value, n in sorted(counts.items()))))
    if provenance.get("read"):
        rows.append(("provenance read from", str(provenance["read"])))
    out = ["<h2>Provenance</h2>", _table(["", ""], [[key, value] for key, value in rows], header=False)]
    if notes:
        out.append(f"<details><summary>PROVENANCE.md of the results directory</summary><pre>{html.escape(notes)}"
                   "</pre></details>")
    return out


def _figures_section(figures: list[FigureResult] | None) -> list[str]:
    out = ["<h2>Figures</h2>"]
    if figures is None:
        return out + ["<p>No figures yet (<code>infscale figures</code> draws them).</p>"]
    skipped = [f for f in figures if f.skipped]
    for figure in figures:
        if figure.skipped:
            continue
        data = base64.b64encode(Path(figure.png).read_bytes()).decode("ascii")
        out.append(f'<figure data-figure="{html.escape(figure.name)}" id="figure-{html.escape(figure.name)}">'
                   f'<img src="data:image/png;base64,{data}" alt="{html.escape(figure.caption)}">'
                   f"<figcaption><b>{html.escape(figure.name)}</b>: {html.escape(figure.caption)} "
                   f"(SVG for print: <code>figures/{html.escape(Path(figure.svg).name)}</code>)</figcaption>"
                   "</figure>")
    if skipped:
        out.append("<h3>Figures not drawn</h3>")
        out.append(_table(["figure", "why"], [[f.name, f.skipped] for f in skipped]))
    return out


def _claims_section(claims: pl.DataFrame | None) -> list[str]:
    out = ["<h2>The paper's claims</h2>"]
    if claims is None or claims.is_empty():
        return out + ["<p>No claims checked yet (<code>infscale claims</code> checks them).</p>"]
    out.append("<p>Each claim is PASS, FAIL or NOT TESTABLE on this campaign's cells; “numbers from” says whether "
               "they were measured or predicted by the sim backend.</p>")
    rows = []
    for row in claims.iter_rows(named=True):
        verdict = row["verdict"] or ""
        rows.append([_Raw(f"<b>{html.escape(row['claim'])}</b>"), row["title"],
                     _Raw(f'<span class="{html.escape(verdict.replace(" ", "-"))}">{html.escape(verdict)}</span>'),
                     row["evidence"], row["source"] or "—"])
    out.append(_table(["claim", "statement", "verdict", "evidence", "numbers from"], rows,
                      row_classes=[(r["verdict"] or "").replace(" ", "-") for r in claims.iter_rows(named=True)]))
    return out


def _fits_section(fits: pl.DataFrame | None) -> list[str]:
    out = ["<h2>Scaling-law fits</h2>"]
    if fits is None or fits.is_empty():
        return out + ["<p>No fits (<code>infscale fit</code> fits the laws where a campaign has enough points: "
                      "three GPU counts for USL, three output lengths for the capacity knee).</p>"]
    laws = Counter(fits.get_column("law").to_list())
    out.append("<p>" + html.escape(", ".join(f"{n} {law}" for law, n in sorted(laws.items())))
               + " fits; parameters with their bootstrap 95 % intervals where there were enough points.</p>")
    rows = []
    ordered = fits.sort("law", "model", "weight_dtype", "workload", "isl", "osl", "family", nulls_last=True)
    for row in ordered.iter_rows(named=True):
        params = []
        for slot in range(3):
            name = row.get(f"p{slot}_name")
            if name is None:
                continue
            low, high = row.get(f"p{slot}_low"), row.get(f"p{slot}_high")
            interval = f" [{_num(low)}, {_num(high)}]" if low is not None and low == low else ""
            params.append(f"{name} = {_num(row[f'p{slot}'])}{interval}")
        workload = row["workload"] + (f" {row['isl']}/{row['osl']}" if row.get("isl") else "")
        rows.append([row["law"], row["model"], row["weight_dtype"], workload, row["family"],
                     f"{row['y']} vs {row['x']}", row["points"], _num(row["r2"]), "; ".join(params)])
    table = _table(["law", "model", "weights", "workload", "family / layout", "fit", "points", "R²", "parameters"],
                   rows)
    out.append(f"<details><summary>all {fits.height} fits</summary>{table}</details>")
    return out


# ------------------------------------------------------------------------------------------- pieces


class _Raw(str):
    """HTML built here from escaped parts: not escaped again."""


def _table(headers: list[str], rows: list[list[object]], header: bool = True,
           row_classes: list[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
    for index, row in enumerate(rows):
        cls = f' class="{html.escape(row_classes[index])}"' if row_classes else ""
        cells = []
        for value in row:
            if isinstance(value, _Raw):
                cells.append(f"<td>{value}</td>")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f'<td class="num">{html.escape(_num(value))}</td>')
            else:
                cells.append(f"<td>{html.escape('—' if value is None else str(value))}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _num(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "—"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _values(frame: pl.DataFrame, column: str) -> str:
    if column not in frame.columns:
        return ""
    return ", ".join(sorted(str(v) for v in frame.get_column(column).drop_nulls().unique().to_list()))


def _metadata(path: Path) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}


def _cell_provenance(run, cells: pl.DataFrame) -> dict[str, object]:
    """Counts of git commit, infscale version, host and Python over the ok cells' files (each file's metadata).
    Opening a file's footer costs a millisecond or two, so a large (predicted) campaign is sampled: the first
    and the last cell of each bench job."""
    from infscale.results.io import cell_file

    ok = cells.filter(pl.col("status") == "ok").sort("started_at", "cell_id", nulls_last=True)
    ids = ok.get_column("cell_id").to_list()
    read = f"all {len(ids)} cell files"
    if len(ids) > PROVENANCE_ALL_UP_TO:
        job_of = {item.cell.id: item.job for item in run.planned}
        by_job: dict[str, list[str]] = {}
        for cell_id in ids:
            by_job.setdefault(job_of.get(cell_id, ""), []).append(cell_id)
        picked = sorted({cell for members in by_job.values() for cell in (members[0], members[-1])})
        read = f"{len(picked)} of {len(ids)} cell files (the first and the last of each bench job)"
        ids = picked
    counts: dict[str, Counter] = {key: Counter() for key in ("git_commit", "infscale_version", "hostname", "python")}
    for cell_id in ids:
        path = cell_file(run.results_dir, cell_id)
        if not path.exists():
            continue
        raw = (pq.read_schema(path).metadata or {}).get(b"infscale.provenance")
        provenance = json.loads(raw) if raw else {}
        for key, counter in counts.items():
            counter[str(provenance.get(key) or "unknown")] += 1
    return {**{key: dict(counter) for key, counter in counts.items()}, "read": read if ids else None}


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """Escape, then the two inline forms summary.md uses: **bold** and `code`."""
    return _CODE.sub(r"<code>\1</code>", _BOLD.sub(r"<b>\1</b>", html.escape(text)))


def _markdown(text: str) -> str:
    """The markdown that summary_markdown writes (headings, lines, bullets, pipe tables) as HTML."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):  # the |---| line
                table.append(cells)
            continue
        flush()
        if not stripped:
            continue
        heading = re.match(r"(#{1,4}) (.*)", stripped)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)  # the report's own headings are h1/h2
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif stripped.startswith("- "):
            out.append(f"<ul><li>{_inline(stripped[2:])}</li></ul>")
        else:
            out.append(f"<p>{_inline(stripped)}</p>")
    flush()
    return "\n".join(out)
