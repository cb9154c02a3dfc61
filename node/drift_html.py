"""The `drift report --html` page: one small inline SVG chart per feature.

Self-contained on purpose (no scripts, fonts, styles or images from elsewhere): the
page is opened from a ticket or an e-mail on machines that may have no network, and
a page that fetches nothing leaks nothing about who looked at it. Each chart shows the
reference (training) and live shares per bin side by side; bins come from the
reference, so no individual live value appears (see `drift_stats.py`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hybridroute.node.drift_cli import NodeDrift

__all__ = ["render_chart", "render_page"]

_W, _H, _PAD = 360, 150, 24
_PREDICTION = "<prediction: "  # drift_stats.PREDICTION_PREFIX (not imported: scipy)
_REF, _LIVE = "#9aa5b1", "#2b6cb0"
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 2em; color: #1a202c; }
h2 { margin-top: 2em; } .charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; } figcaption { font-size: 13px; max-width: 360px; }
.drift { color: #c53030; font-weight: bold; } .muted { color: #718096; }
.key-ref { color: #9aa5b1; } .key-live { color: #2b6cb0; }
"""


def _label(value: float) -> str:
    return f"{value:.3g}"


def _bin_labels(feature: Any) -> list[str]:
    edges = list(feature.bin_edges)
    if feature.categorical:
        return [_label(e) for e in edges] + ["other"]
    return [_label(edges[0]), _label(edges[-1])] if edges else []


def render_chart(feature: Any) -> str:
    """An SVG of reference vs live shares per bin for one FeatureDrift message."""
    ref, live = list(feature.reference_shares), list(feature.current_shares)
    bins = max(len(ref), len(live), 1)
    top = max([*ref, *live, 1e-9])
    plot_w, plot_h = _W - 2 * _PAD, _H - 2 * _PAD
    slot = plot_w / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(feature.feature)}">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#4a5568"/>',
    ]
    for i in range(bins):
        for j, (shares, colour) in enumerate(((ref, _REF), (live, _LIVE))):
            share = shares[i] if i < len(shares) else 0.0
            height = plot_h * share / top
            x, y, width = _PAD + i * slot + j * slot / 2, _H - _PAD - height, max(slot / 2 - 1, 0.5)
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
                f'fill="{colour}"><title>{share:.1%}</title></rect>'
            )
    parts += _axis_labels(feature, slot)
    parts.append("</svg>")
    return "".join(parts)


def _axis_labels(feature: Any, slot: float) -> list[str]:
    labels = _bin_labels(feature)
    y = _H - _PAD + 14
    if feature.categorical:
        return [
            f'<text x="{_PAD + (i + 0.5) * slot:.1f}" y="{y}" font-size="10" '
            f'text-anchor="middle">{html.escape(text)}</text>'
            for i, text in enumerate(labels)
        ]
    if not labels:
        return []
    return [
        f'<text x="{_PAD}" y="{y}" font-size="10">{html.escape(labels[0])}</text>',
        f'<text x="{_W - _PAD}" y="{y}" font-size="10" text-anchor="end">'
        f"{html.escape(labels[1])}</text>",
    ]


def _caption(model: Any, feature: Any) -> str:
    name = html.escape(feature.feature)
    test = html.escape(feature.test)
    if model.status == "not enough data":
        verdict = '<span class="muted">no verdict, no live bars: window too small</span>'
        score = "-"
    elif math.isnan(feature.statistic):
        verdict = '<span class="muted">no verdict: too few live values to test</span>'
        score = "-"
    else:
        verdict = '<span class="drift">drift</span>' if feature.drift else "no drift"
        score = f"{feature.statistic:.4g}"
    what = "p-value" if feature.score_kind == "p_value" else "distance"
    note = ""
    if feature.feature.startswith(_PREDICTION):
        note = (
            '<br><span class="muted">the model\'s default output on live requests'
            + ("; text classes are numbered in sorted order" if feature.categorical else "")
            + "</span>"
        )
    return (
        f"<figcaption><b>{name}</b>: {test} {what} {score} "
        f"(threshold {feature.threshold:.4g}), {verdict}{note}</figcaption>"
    )


def _section(node: str, model: Any) -> str:
    head = (
        f"<h2>{html.escape(node)}: {html.escape(model.model)} version "
        f"{html.escape(model.version)}</h2>"
        f"<p>Status <b>{html.escape(model.status)}</b>; {model.window} live rows "
        f"(window {model.window_size}, minimum {model.min_window}) against "
        f"{model.reference_rows} reference rows ({html.escape(model.baseline_kind)}).</p>"
    )
    figures = [f"<figure>{render_chart(f)}{_caption(model, f)}</figure>" for f in model.features]
    return head + '<div class="charts">' + "".join(figures) + "</div>"


def render_page(answers: Sequence[NodeDrift]) -> str:
    """The whole page for the answers of `drift report`."""
    sections = []
    for answer in answers:
        if answer.code != "OK":
            sections.append(
                f"<h2>{html.escape(answer.target.name)}</h2><p class='drift'>"
                f"{html.escape(answer.code)}: {html.escape(answer.message)}</p>"
            )
        sections += [_section(answer.target.name, m) for m in answer.models]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>hybridroute drift report</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>Drift report</h1><p>Bars per bin: <span class='key-ref'>&#9632; reference "
        "(training)</span> and <span class='key-live'>&#9632; live window</span>; bins "
        "come from the reference, live values outside its range fall in the end bins.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
