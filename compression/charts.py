"""The one figure of the studio and the benchmark: size vs WER and latency vs WER, the baseline in red, data-free
algorithms grey, calibrated ones blue, the (size, WER) Pareto front dotted."""
from __future__ import annotations

from .methods import NAIVE


def row_color(algorithm: str) -> str:
    """Baseline ("" algorithm) red, a variant made only by data-free algorithms grey, one with a calibrated
    step blue."""
    if not algorithm:
        return "crimson"
    if algorithm == "peer":  # another system, not ours
        return "seagreen"
    return "gray" if all(a in NAIVE.values() for a in algorithm.split("+")) else "steelblue"


def pareto_front(sizes: list[float], wers: list[float]) -> list[int]:
    """Indices of variants no other variant beats on both size and WER, sorted by size."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], wers[i]))
    front, best = [], float("inf")
    for i in order:
        if wers[i] < best:
            front.append(i)
            best = wers[i]
    return front


def tradeoff_figure(labels: list[str], sizes_mb: list[float], latencies_ms: list[float],
                    wers: list[float | None], algorithms: list[str], *, width: int | None = None):
    """A plotly figure of one point per variant. ``wers`` None (no reference transcript): latency and size are
    drawn at WER 0 and the axis says a reference is needed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    have_wer = all(w is not None for w in wers)
    y = [100 * w if have_wer else 0.0 for w in wers]
    colors = [row_color(a) for a in algorithms]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Size on disk vs WER", "Median latency vs WER"))
    for col, xs, title in ((1, sizes_mb, "size on disk (MB)"), (2, latencies_ms, "median latency (ms)")):
        fig.add_trace(go.Scatter(x=xs, y=y, mode="markers+text", text=labels, textposition="top center",
                                 marker=dict(size=10, color=colors), showlegend=False,
                                 hovertemplate="%{text}<br>%{x:.2f}<br>WER %{y:.1f}%"), row=1, col=col)
        fig.update_xaxes(title_text=title, row=1, col=col)
        fig.update_yaxes(title_text="WER (%)" if have_wer else "(add a reference for WER)", row=1, col=col)
    if have_wer and len(labels) > 1:
        front = pareto_front(sizes_mb, y)
        fig.add_trace(go.Scatter(x=[sizes_mb[i] for i in front], y=[y[i] for i in front], mode="lines",
                                 line=dict(dash="dot", color="gray"), name="Pareto front"), row=1, col=1)
    fig.update_layout(height=460, width=width, margin=dict(l=40, r=20, t=60, b=40),
                      title="Baseline (red), data-free algorithms (grey), calibrated (blue), peers (green)")
    return fig
