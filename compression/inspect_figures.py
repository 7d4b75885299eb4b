"""The class view's pictures: plotly figures drawn from :func:`compression.inspect.inspect_variant`'s numbers
(and the studio's sweep points), in the colours of :mod:`compression.charts`: baseline red, data-free grey,
calibrated blue. Nothing is computed here beyond layout; ``font`` scales every text for a projector."""
from __future__ import annotations

from .charts import row_color

BEFORE, AFTER, MARK = "crimson", "steelblue", "darkorange"


def _layout(fig, title: str, height: int, font: int):
    fig.update_layout(title=title, height=height, font=dict(size=font), margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def histogram_figure(h: dict, layer: str, font: int = 12):
    """Weights of one layer before and after on shared bins (log counts), the levels the stored codes allow
    (k-means centroids, the int4/ternary grid) as thin lines, the pruning threshold ±τ dashed."""
    import plotly.graph_objects as go

    edges = h["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=centres, y=h["before"], width=width, name="before (baseline)", marker_color=BEFORE,
                         opacity=0.55))
    fig.add_trace(go.Bar(x=centres, y=h["after"], width=width, name="after (as stored)", marker_color=AFTER,
                         opacity=0.55))
    if h["levels"]:  # one trace of vertical segments: 256 centroids as shapes would take plotly a second
        top = 2 * max(max(h["before"]), max(h["after"]), 1)
        fig.add_trace(go.Scatter(x=[x for v in h["levels"] for x in (v, v, None)],
                                 y=[y for _ in h["levels"] for y in (0.7, top, None)], mode="lines",
                                 line=dict(color=MARK, width=1), name=h["levels_note"], hoverinfo="x"))
    if h["threshold"] is not None:
        for x in (-h["threshold"], h["threshold"]):
            fig.add_vline(x=x, line=dict(color="black", dash="dash", width=1.5))
        note = f"pruning threshold ±τ = {h['threshold']:.3g}"
        if h["pruned_below_threshold"] is not None and h["pruned_below_threshold"] < 0.999:
            note += f" ({100 * h['pruned_below_threshold']:.0f}% of the pruned weights lie inside it)"
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="black", dash="dash"), name=note))
    fig.update_layout(barmode="overlay", bargap=0)
    fig.update_yaxes(type="log", title_text="weights (log scale)")
    fig.update_xaxes(title_text="weight value")
    return _layout(fig, f"Weights of {layer}, before and after", 420, font)


def layers_figure(rows: list[dict], chosen: str | None = None, font: int = 12):
    """Per layer, in network order: sparsity (when any), stored bits per original weight, rank kept (SVD) and the
    relative output error on the clip, so the most damaged layers stand out; the chosen layer outlined."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [r["layer"] for r in rows]
    panels = [("stored bits per weight", [r["bits_per_weight"] for r in rows], AFTER)]
    if any(r["sparsity"] for r in rows):  # panels that would be all zero (or all full) are left out
        panels.insert(0, ("sparsity (%)", [100 * r["sparsity"] for r in rows], "gray"))
    if any(r["rank"] for r in rows):
        panels.append(("rank kept (% of full rank)", [100 * (r["rank"] or r["full_rank"]) / r["full_rank"]
                                                      for r in rows], "gray"))
    if any(r["output_error"] is not None for r in rows):
        panels.append(("output error on the clip (%)",
                       [None if r["output_error"] is None else 100 * r["output_error"] for r in rows], BEFORE))
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[p[0] for p in panels])
    hover = [f"{r['layer']}<br>{r['encoding']}<br>{' × '.join(map(str, r['shape_after']))}"
             + (f"<br>rank {r['rank']} of {r['full_rank']}" if r["rank"] else "") for r in rows]
    outline = [3 if n == chosen else 0 for n in names]
    for i, (title, values, color) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=names, y=values, marker_color=color, name=title, hovertext=hover,
                             marker_line=dict(width=outline, color="black"), showlegend=False), row=i, col=1)
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=max(8, font - 3)), row=len(panels), col=1)
    return _layout(fig, "Layer by layer (in network order)", 220 * len(panels) + 140, font)


def spectrum_figure(s: dict, layer: str, font: int = 12):
    """Singular values of the baseline layer (log scale) with the kept rank marked, and the energy kept."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    index = list(range(1, len(s["sigma"]) + 1))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=index, y=s["sigma"], mode="lines", name="σᵢ", line=dict(color=AFTER)))
    fig.add_trace(go.Scatter(x=index, y=[100 * e for e in s["energy"]], mode="lines", name="energy kept (%)",
                             line=dict(color="gray", dash="dot")), secondary_y=True)
    if s["rank"]:
        fig.add_vline(x=s["rank"], line=dict(color=BEFORE, width=2),
                      annotation_text=f"kept r = {s['rank']} ({100 * s['energy_kept']:.0f}% of Σσ²)")
    fig.add_vline(x=s["break_even_rank"], line=dict(color="black", dash="dash", width=1),
                  annotation_text="break-even mn/(m+n)", annotation_position="bottom right")
    fig.update_yaxes(type="log", title_text="singular value", secondary_y=False)
    fig.update_yaxes(title_text="energy kept (%)", range=[0, 101], secondary_y=True)
    fig.update_xaxes(title_text="index i")
    title = f"Singular values of {layer}" + ("" if s["rank"] else " (kept whole: a factorisation would not save)")
    return _layout(fig, title, 400, font)


def frames_figure(f: dict, font: int = 12):
    """The clip frame by frame: the baseline's and the variant's CTC posteriors one above the other (time on x,
    characters on y), then both best-path characters with the frames where they differ marked in red."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    step = f["seconds_per_frame"]
    t = [i * step for i in range(f["frames"])]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.4, 0.4, 0.2],
                        subplot_titles=("baseline posteriors", "variant posteriors", "best character per frame"))
    for row, side in ((1, "baseline"), (2, "variant")):
        z = [list(col) for col in zip(*f[side]["posteriors"])]  # (V, T')
        fig.add_trace(go.Heatmap(x=t, y=f["tokens"], z=z, colorscale="Blues", zmin=0, zmax=1, showscale=row == 1,
                                 colorbar=dict(title="p", len=0.4, y=0.8), name=side,
                                 hovertemplate="%{x:.2f} s, %{y}: %{z:.2f}<extra>" + side + "</extra>"),
                      row=row, col=1)
    for y, side in ((1, "baseline"), (0, "variant")):
        chars = [f["tokens"][i] for i in f[side]["argmax"]]
        shown = [(x, c) for x, c in zip(t, chars) if c != "∅"]
        fig.add_trace(go.Scatter(x=[x for x, _ in shown], y=[y] * len(shown), text=[c for _, c in shown],
                                 mode="text", name=f"{side} best path", showlegend=False,
                                 textfont=dict(size=max(9, font - 2))), row=3, col=1)
    fig.add_trace(go.Scatter(x=[t[i] for i in f["differ"]], y=[0.5] * len(f["differ"]), mode="markers",
                             marker=dict(color=BEFORE, symbol="line-ns-open", size=22), name="they differ"),
                  row=3, col=1)
    fig.update_yaxes(tickvals=[0, 1], ticktext=["variant", "baseline"], range=[-0.5, 1.5], row=3, col=1)
    fig.update_xaxes(title_text="time (s)", row=3, col=1)
    title = f"Where the transcript breaks: {100 * f['agreement']:.1f}% of frames agree"
    return _layout(fig, title, 620, font)


def sweep_figure(points: list[dict], knob: str, label: str, font: int = 12, baseline: dict | None = None):
    """WER and size across one knob's range, one line per algorithm (naive grey, calibrated blue), the
    baseline's as red dashed lines. ``points``: dicts with the knob value, family ("naive"/"calibrated"),
    algorithm, wer, size_mb."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("WER on the clip (greedy)", "size on disk (MB)"))
    for family in ("naive", "calibrated"):
        line = sorted((p for p in points if p["family"] == family), key=lambda p: p["value"])
        if not line:
            continue
        color = row_color(line[0]["algorithm"])
        name = f"{family} ({line[0]['algorithm']})"
        fig.add_trace(go.Scatter(x=[p["value"] for p in line], y=[None if p["wer"] is None else 100 * p["wer"]
                                                                  for p in line],
                                 mode="lines+markers", name=name, line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=[p["value"] for p in line], y=[p["size_mb"] for p in line], mode="lines+markers",
                                 name=name, line=dict(color=color, dash="dot"), showlegend=False), row=2, col=1)
    if baseline is not None:
        if baseline["wer"] is not None:
            fig.add_hline(y=100 * baseline["wer"], line=dict(color=row_color(""), dash="dash"), row=1, col=1,
                          annotation_text="baseline")
        fig.add_hline(y=baseline["size_mb"], line=dict(color=row_color(""), dash="dash"), row=2, col=1,
                      annotation_text="baseline")
    fig.update_yaxes(title_text="WER (%)", row=1, col=1)
    fig.update_yaxes(title_text="MB", row=2, col=1)
    fig.update_xaxes(title_text=knob, row=2, col=1)
    return _layout(fig, f"{label}: sweep of the {knob}", 520, font)


def figures(report: dict, font: int = 12) -> dict:
    """Every picture of one inspect report, by file stem: histogram, layers, spectrum (SVD), frames (a clip)."""
    out = {"histogram": histogram_figure(report["histogram"], report["layer"], font),
           "layers": layers_figure(report["layers"], report["layer"], font)}
    if report["spectrum"] is not None:
        out["spectrum"] = spectrum_figure(report["spectrum"], report["layer"], font)
    if report["frames"] is not None:
        out["frames"] = frames_figure(report["frames"], font)
    return out
