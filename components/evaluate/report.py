"""Human-facing artifacts: the Markdown table, PNG plots (matplotlib, Agg, offline) and one
self-contained HTML report (images embedded as base64 data URIs, no external resources)."""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

Row = tuple[str, str, float, "float | None"]  # (task, metric, value, stderr)

LOSS_PLOT = "loss_curve.png"
METRICS_PLOT = "eval_metrics.png"
EXPERT_LOAD_PLOT = "expert_load.png"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def markdown_table(rows: Sequence[Row]) -> str:
    """``| task | metric | value | stderr |`` with one line per row."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    lines += [f"| {task} | {metric} | {_fmt(value)} | {_fmt(stderr)} |" for task, metric, value, stderr in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plots (PNG bytes)
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def loss_curve_png(records: Sequence[dict]) -> bytes | None:
    """Training loss against step, eval-loss points on top; ``None`` without loss records."""
    train = [(r["step"], r["loss"]) for r in records if "step" in r and isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records
             if "step" in r and isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    fig = _figure(7, 4)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=4)
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def eval_metrics_png(rows: Sequence[Row]) -> bytes | None:
    """Horizontal bars: perplexities (log scale) in one panel, everything else in the other."""
    if not rows:
        return None
    panels = [("perplexity (log scale, lower is better)", [r for r in rows if "perplexity" in r[1]], True),
              ("accuracy and bits per byte", [r for r in rows if "perplexity" not in r[1]], False)]
    panels = [p for p in panels if p[1]]
    fig = _figure(7, 1.0 + 0.45 * max(len(p[1]) for p in panels) * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, panel_rows, log) in zip(axes, panels):
        labels = [f"{task} / {metric}" for task, metric, _, _ in panel_rows]
        values = [value for _, _, value, _ in panel_rows]
        errors = None if log else [stderr or 0.0 for *_, stderr in panel_rows]  # +-stderr: not for log axes
        bars = ax.barh(labels, values, xerr=errors, color="tab:blue", alpha=0.8)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], padding=3, fontsize=8)
        if log and all(v > 0 for v in values):
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.2)
    return _png(fig)


def last_expert_load(records: Sequence[dict]) -> tuple[int | None, list[list[float]]] | None:
    """``(step, load_LE)`` of the last record with a non-empty ``expert_load``; ``None`` if none."""
    for record in reversed(records):
        load = record.get("expert_load")
        if load and all(isinstance(layer, list) and layer for layer in load):
            return record.get("step"), load
    return None


def expert_load_png(records: Sequence[dict]) -> bytes | None:
    """Heat map layers x experts of the token fractions in the last record with ``expert_load``."""
    found = last_expert_load(records)
    if found is None:
        return None
    step, load = found
    width = max(len(layer) for layer in load)
    load_LE = [layer + [float("nan")] * (width - len(layer)) for layer in load]
    fig = _figure(min(2 + 0.5 * width, 14), min(1.5 + 0.45 * len(load_LE), 10))
    ax = fig.subplots()
    image = ax.imshow(load_LE, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="fraction of routed tokens")
    if width * len(load_LE) <= 256:
        for i, layer in enumerate(load):
            for e, value in enumerate(layer):
                ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_yticks(range(len(load_LE)))
    if width <= 32:
        ax.set_xticks(range(width))
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"Expert load at step {step}")
    return _png(fig)


# ---------------------------------------------------------------------- HTML
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; }
img { max-width: 100%; display: block; margin: 1em 0; }
.continuation { color: #0645ad; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(*, title: str, rows: Sequence[Row], plots: dict[str, bytes], samples: Sequence[dict],
                model_config: dict, summary: dict) -> str:
    """One self-contained HTML page: results table, plots, samples, model config, run summary."""
    esc = html.escape
    table = "".join(
        f"<tr><td>{esc(task)}</td><td>{esc(metric)}</td><td class=\"num\">{_fmt(value)}</td>"
        f"<td class=\"num\">{_fmt(stderr)}</td></tr>" for task, metric, value, stderr in rows)
    images = "".join(f'<figure><img alt="{esc(name)}" src="{data_uri(png)}"><figcaption>{esc(name)}'
                     "</figcaption></figure>" for name, png in plots.items()) or "<p>No plots.</p>"
    sample_html = "".join(
        f"<h3>Sample {i + 1}</h3><pre>{esc(s['prompt'])}<span class=\"continuation\">{esc(s['continuation'])}"
        f"</span></pre><p>True continuation: {esc(s.get('reference', ''))}</p>"
        for i, s in enumerate(samples)) or "<p>No samples.</p>"
    summary_html = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<table id="summary">{summary_html}</table>
<section id="results"><h2>Results</h2>
<table id="results-table"><thead><tr><th>task</th><th>metric</th><th>value</th><th>stderr</th></tr></thead>
<tbody>{table}</tbody></table></section>
<section id="plots"><h2>Plots</h2>{images}</section>
<section id="samples"><h2>Greedy samples</h2><p>Prompt in black, model continuation in blue.</p>{sample_html}</section>
<section id="model"><h2>Model config</h2><pre>{esc(json.dumps(model_config, indent=2, sort_keys=True))}</pre></section>
</body></html>
"""


def render_plots(rows: Sequence[Row], train_records: Sequence[dict]) -> dict[str, bytes | None]:
    """``{file name: png bytes, or None when that plot has no data}``, nothing written."""
    return {METRICS_PLOT: eval_metrics_png(rows), LOSS_PLOT: loss_curve_png(train_records),
            EXPERT_LOAD_PLOT: expert_load_png(train_records)}


def write_plots(plot_dir: Path, rendered: dict[str, bytes | None]) -> None:
    """Write each PNG of :func:`render_plots` (atomically) into ``plot_dir``; a plot without data this
    run removes a previous run's file, so the directory matches the report."""
    from linear_moe.components.files import atomic_write_bytes

    for name, png in rendered.items():
        if png is not None:
            atomic_write_bytes(Path(plot_dir) / name, png)
        else:
            (Path(plot_dir) / name).unlink(missing_ok=True)
