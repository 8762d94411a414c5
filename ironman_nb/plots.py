"""Training curves from a `trainer_state.json`: raw points plus a smoothed line, x in steps, epochs marked.

Functions return matplotlib Figures; the notebook displays them and `plot_training` also saves PNGs.
"""
from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

from .config import PlotConfig
from .io import atomic_write_bytes, read_json

SERIES = {
    "loss": ("training loss", "loss"),
    "grad_norm": ("gradient norm", "grad norm"),
    "learning_rate": ("learning rate", "learning rate"),
    "eval_loss": ("held-out loss", "eval loss"),
    # Logged with token_metrics=True in notebook 02, and by TRL's own SFTTrainer by default.
    "mean_token_accuracy": ("answer-token top-1 accuracy", "accuracy"),
}


def load_log_history(path: str | Path) -> list[dict]:
    state = read_json(path, "trainer_state.json")
    history = state.get("log_history") if isinstance(state, dict) else state
    if not isinstance(history, list):
        raise ValueError(f"{path}: no 'log_history' list (is this a trainer_state.json?)")
    return history


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged quantity; entries without a step use their epoch."""
    xs, ys = [], []
    for entry in history:
        if key in entry and entry[key] is not None:
            x = entry.get("step", entry.get("epoch"))
            if x is None:
                continue
            xs.append(float(x))
            ys.append(float(entry[key]))
    return xs, ys


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it) of the finite values.

    An inf or NaN (fp16 runs go on through an overflowed gradient norm) is skipped: its place gets the average so
    far (NaN before the first finite value, which matplotlib leaves out), so it does not poison the rest."""
    out, last, norm = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            last = weight * last + (1 - weight) * value
            norm = weight * norm + (1 - weight)
        out.append(last / norm if norm else math.nan)
    return out


def nan_min(values: list[float]) -> float:
    """The smallest value that is not NaN (min() with a NaN answers by order); NaN when all are."""
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def epoch_marks(history: list[dict]) -> list[tuple[float, int]]:
    """(step, epoch) where each whole epoch ends, interpolated from the logged (step, epoch) pairs."""
    pairs = sorted({(float(e["step"]), float(e["epoch"])) for e in history if "step" in e and "epoch" in e})
    marks = []
    for (s0, e0), (s1, e1) in zip(pairs, pairs[1:]):
        for whole in range(int(e0) + 1, int(e1) + 1):
            if e1 > e0 and e0 < whole <= e1:
                marks.append((s0 + (whole - e0) * (s1 - s0) / (e1 - e0), whole))
    return marks


# Points drawn as markers up to this many; a longer series is drawn as a thin line (markers merge into a band).
MARKER_POINTS = 400
# `smoothing` is the moving average's weight per point for a series of up to this many points; a longer series
# gets the weight that averages over the same share of the run (otherwise the line is as noisy as the points).
SMOOTHING_POINTS = 100
DARK = {"C0": "#0b3d66", "C1": "#8a3b00"}  # the smoothed line, drawn over the pale raw points of its colour


def smoothing_weight(weight: float, points: int) -> float:
    return weight ** (SMOOTHING_POINTS / points) if points > SMOOTHING_POINTS and weight > 0 else weight


def _draw(ax, history: list[dict], key: str, weight: float) -> bool:
    xs, ys = series(history, key)
    if not xs:
        return False
    title, label = SERIES[key]
    color = "C1" if key == "eval_loss" else "C0"
    if len(ys) <= MARKER_POINTS:
        ax.plot(xs, ys, "o", ms=3, alpha=0.3, color=color, label=f"{label} (raw)")
    else:
        ax.plot(xs, ys, "-", lw=0.6, alpha=0.3, color=color, label=f"{label} (raw)")
    # Train loss and grad norm are noisy per-step values: smooth them. The held-out loss is already a mean
    # over the eval set and the learning rate is exact: connect their points instead.
    if len(ys) > 2 and key in ("loss", "grad_norm"):
        ax.plot(xs, smooth(ys, smoothing_weight(weight, len(ys))), "-", lw=2, color=DARK[color], zorder=3,
                label=f"{label} (smoothed)")
    elif len(ys) > 1:
        ax.plot(xs, ys, "-", lw=1.5, color=color, label=label)
    bad = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
    if bad and len(bad) < len(ys):
        # fp16 runs go on through an overflowed (inf) gradient norm; matplotlib would leave those steps out.
        ax.plot(bad, [0.97] * len(bad), "x", ms=5, color="red", transform=ax.get_xaxis_transform(), clip_on=False,
                label=f"{len(bad)} inf/NaN (step marked)")
    elif bad:
        ax.text(0.5, 0.5, f"all {len(bad)} values inf or NaN", transform=ax.transAxes, ha="center", va="center",
                color="red")
        ax.set_yticks([])
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    x_is_step = any("step" in e for e in history)
    for step, epoch in epoch_marks(history) if x_is_step else []:
        ax.axvline(step, color="grey", ls=":", lw=1)
        # Right of the label is where epoch N ends: the label sits inside the epoch it names.
        ax.text(step, 1.0, f"epoch {epoch} ", transform=ax.get_xaxis_transform(), ha="right", va="top", fontsize=8,
                color="grey")
    ax.set_title(title)
    ax.set_xlabel("step" if x_is_step else "epoch")
    ax.set_ylabel(label)
    if key == "learning_rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return True


def figure(history: list[dict], key: str, weight: float = 0.6):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if not _draw(ax, history, key, weight):
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig


def combined_figure(history: list[dict], weight: float = 0.6):
    import matplotlib.pyplot as plt

    keys = [k for k in SERIES if series(history, k)[0]]
    if not keys:
        raise ValueError("the log history has no loss, grad_norm, learning_rate or eval_loss entries to draw")
    cols = 2 if len(keys) > 1 else 1
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _draw(ax, history, key, weight)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


@dataclasses.dataclass
class PlotResult:
    files: dict[str, Path]
    figures: dict[str, object]
    history: list[dict]

    def last_values(self):
        """Each series' last value, and its best (lowest loss, highest accuracy) where a best means something."""
        import pandas as pd

        rows = []
        for key in SERIES:
            steps, values = series(self.history, key)
            if values:
                best = {"loss": nan_min(values), "eval_loss": nan_min(values),
                        "mean_token_accuracy": -nan_min([-v for v in values])}.get(key)
                step = int(steps[-1]) if steps[-1].is_integer() else steps[-1]
                rows.append((key, step, values[-1], best))
        return pd.DataFrame(rows, columns=["series", "last step", "last value", "best"], dtype=object).set_index("series")


def plot_training(cfg: PlotConfig) -> PlotResult:
    """Write training_<series>.png for each series in SERIES that has data, and training_curves.png."""
    history = load_log_history(cfg.trainer_state)
    out = Path(cfg.output_dir)
    files, figures = {}, {}
    for key in SERIES:
        fig = figure(history, key, cfg.smoothing)
        if fig is not None:
            figures[key] = fig
            files[key] = _save(fig, out / f"training_{key}.png")
        else:
            # An earlier run's chart of a series this run did not log (the folder is reused) would pass for its.
            (out / f"training_{key}.png").unlink(missing_ok=True)
    fig = combined_figure(history, cfg.smoothing)
    figures["curves"] = fig
    files["curves"] = _save(fig, out / "training_curves.png")
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)  # the notebook displays what it chooses; closed figures still render
    return PlotResult(files, figures, history)
