import json
import math

import pytest

from conftest import DATA
from ironman_nb.config import PlotConfig
from ironman_nb.plots import epoch_marks, figure, load_log_history, plot_training, series, smooth


@pytest.mark.parametrize("name, points", [("recipe_qwen2_trainer_state.json", 41), ("recipe_llama3_trainer_state.json", 51)])
def test_draws_the_recipe_logs(tmp_path, name, points):
    history = load_log_history(DATA / name)
    assert len(series(history, "loss")[1]) == points
    result = plot_training(PlotConfig(trainer_state=str(DATA / name), output_dir=str(tmp_path)))
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["training_curves.png", "training_grad_norm.png", "training_learning_rate.png", "training_loss.png"]
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert result.last_values().loc["loss", "last value"] == series(history, "loss")[1][-1]


def test_eval_loss_chart_only_when_logged(tmp_path):
    state = {"log_history": [
        {"step": 0, "epoch": 0, "eval_loss": 2.0},
        {"step": 1, "epoch": 0.5, "loss": 2.1, "grad_norm": 1.0, "learning_rate": 1e-4},
        {"step": 2, "epoch": 1.0, "loss": 1.9, "grad_norm": 0.9, "learning_rate": 5e-5},
        {"step": 3, "epoch": 1.5, "loss": 1.7, "grad_norm": 0.8, "learning_rate": 2e-5},
        {"step": 3, "epoch": 1.5, "eval_loss": 1.8},
    ]}
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    result = plot_training(PlotConfig(trainer_state=str(path), output_dir=str(tmp_path / "plots")))
    assert (tmp_path / "plots" / "training_eval_loss.png").is_file()
    assert set(result.files) == {"loss", "grad_norm", "learning_rate", "eval_loss", "curves"}


def test_epoch_boundaries_are_interpolated_in_steps():
    history = [{"step": 10, "epoch": 0.16}, {"step": 60, "epoch": 0.97}, {"step": 70, "epoch": 1.13}, {"step": 130, "epoch": 2.1}]
    marks = epoch_marks(history)
    assert [epoch for _, epoch in marks] == [1, 2]
    assert marks[0][0] == pytest.approx(60 + (1 - 0.97) / 0.16 * 10)


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    values = smooth([4.0, 0.0], 0.5)
    assert values[0] == 4.0 and values[1] == pytest.approx((0.5 * 0.5 * 4.0) / 0.75)


def test_an_inf_or_nan_is_skipped_by_the_smoothed_line_and_the_minimum(tmp_path):
    """fp16 runs go on through an overflowed (inf) gradient norm: one such point must not make the smoothed line
    inf or NaN from then on, and the summary's minimum must not depend on where a NaN sits."""
    inf, nan = float("inf"), float("nan")
    smoothed = smooth([inf, 4.0, nan, 0.0], 0.5)
    assert math.isnan(smoothed[0])  # nothing to average yet: matplotlib leaves the point out
    assert smoothed[1:] == [4.0, 4.0, pytest.approx((0.5 * 0.5 * 4.0) / 0.75)]
    history = [{"step": s, "epoch": s / 5, "loss": loss, "grad_norm": norm}
               for s, loss, norm in ((1, nan, inf), (2, 2.0, inf), (3, 1.0, 0.9), (4, 1.5, nan), (5, 1.2, 0.8))]
    line = next(l for l in figure(history, "grad_norm").axes[0].lines if "smoothed" in l.get_label())
    assert all(math.isfinite(y) for y in line.get_ydata()[2:])
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history}))  # Python's json writes NaN and Infinity, as the Trainer does
    summary = plot_training(PlotConfig(trainer_state=str(state), output_dir=str(tmp_path / "plots"))).last_values()
    assert summary.loc["loss", "best"] == 1.0 and summary.loc["loss", "last step"] == 5


def test_inf_and_nan_steps_are_marked_not_left_out():
    inf, nan = float("inf"), float("nan")
    history = [{"step": s, "grad_norm": v} for s, v in ((1, 1.0), (2, inf), (3, 0.9), (4, nan), (5, 0.8))]
    marks = [l for l in figure(history, "grad_norm").axes[0].lines if "inf/NaN" in l.get_label()]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [2.0, 4.0]
    assert marks[0].get_label() == "2 inf/NaN (step marked)"
    ax = figure([{"step": s, "grad_norm": inf} for s in range(1, 4)], "grad_norm").axes[0]
    assert [t.get_text() for t in ax.texts] == ["all 3 values inf or NaN"] and list(ax.get_yticks()) == []


def test_a_long_run_gets_a_readable_smoothed_line():
    """At 0.6 per point, 2,000 noisy points give a line as noisy as the points; the weight scales with the run."""
    import random

    rng = random.Random(0)
    history = [{"step": s, "loss": 2.0 - s / 2000 + rng.uniform(-0.5, 0.5)} for s in range(1, 2001)]
    line = next(l for l in figure(history, "loss").axes[0].lines if "smoothed" in l.get_label())
    ys = list(line.get_ydata())[100:]
    trend = [2.0 - s / 2000 for s in range(101, 2001)]
    assert max(abs(y - t) for y, t in zip(ys, trend)) < 0.2  # the raw points stray up to 0.5; at 0.6 per point, 0.4
    few = [{"step": s, "loss": v} for s, v in ((1, 1.0), (2, 0.0), (3, 0.0))]
    line = next(l for l in figure(few, "loss", 0.5).axes[0].lines if "smoothed" in l.get_label())
    assert list(line.get_ydata()) == pytest.approx(smooth([1.0, 0.0, 0.0], 0.5))  # short runs: the weight as given


def test_epoch_labels_sit_inside_the_epoch_they_name():
    history = [{"step": s, "epoch": s / 10, "loss": 1.0} for s in range(1, 31)]
    ax = figure(history, "loss").axes[0]
    labels = [(t.get_position()[0], t.get_text().strip(), t.get_horizontalalignment()) for t in ax.texts]
    assert labels == [(10.0, "epoch 1", "right"), (20.0, "epoch 2", "right"), (30.0, "epoch 3", "right")]


def test_a_chart_of_an_earlier_run_is_not_left_in_the_folder(tmp_path):
    state = tmp_path / "trainer_state.json"
    logged = {"step": 1, "epoch": 1, "loss": 1.0, "grad_norm": 1.0, "learning_rate": 1e-4}
    state.write_text(json.dumps({"log_history": [{"step": 0, "eval_loss": 2.0, "mean_token_accuracy": 0.4}, logged]}))
    plot_training(PlotConfig(trainer_state=str(state), output_dir=str(tmp_path / "plots")))
    assert (tmp_path / "plots" / "training_eval_loss.png").is_file()
    state.write_text(json.dumps({"log_history": [logged]}))
    result = plot_training(PlotConfig(trainer_state=str(state), output_dir=str(tmp_path / "plots")))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in result.files.values())


def test_the_summary_names_a_best_value_only_where_one_means_something(tmp_path):
    state = tmp_path / "trainer_state.json"
    history = [{"step": s, "loss": l, "mean_token_accuracy": a, "learning_rate": r}
               for s, l, a, r in ((1, 2.0, 0.3, 1e-4), (2, 1.0, 0.6, 2e-8), (3, 1.5, 0.5, 0.0))]
    state.write_text(json.dumps({"log_history": history}))
    summary = plot_training(PlotConfig(trainer_state=str(state), output_dir=str(tmp_path / "plots"))).last_values()
    assert summary.loc["loss", "best"] == 1.0 and summary.loc["mean_token_accuracy", "best"] == 0.6
    assert summary.loc["learning_rate", "best"] is None and summary.loc["loss", "last step"] == 3


def test_state_without_curves_is_refused(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": [{"step": 1, "train_runtime": 3.0}]}))
    with pytest.raises(ValueError, match="no loss, grad_norm"):
        plot_training(PlotConfig(trainer_state=str(path), output_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="trainer_state.json not found"):
        load_log_history(tmp_path / "missing.json")
