"""The plots' smoothing by hand, and the figures the stages write: panels, marks and numbers on them."""

from __future__ import annotations

import math

import pytest


def test_smoothing_is_a_trailing_mean_that_skips_missing_values():
    from rlhf_core.plots import smoothed

    assert smoothed([1.0, 2.0, 3.0, 4.0], share=0.5) == [1.0, 1.5, 2.5, 3.5]  # window of 2
    assert smoothed([1.0, float("nan"), 3.0], share=0.7) == [1.0, 1.0, 3.0]  # window of 2, the NaN skipped
    assert math.isnan(smoothed([float("nan"), 1.0], share=0.5)[0])
    assert smoothed([5.0, 7.0], share=0.01) == [5.0, 7.0]  # at least one point: the raw values


def test_curves_have_a_panel_per_metric_with_validation_points(tmp_path, monkeypatch):
    import matplotlib.figure

    from rlhf_core import plots

    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.append(fig) or path)
    train = [{"step": s, "rm/loss": 1 / s, "rm/accuracy": 0.5 + s / 100} for s in range(1, 41)]
    val = [{"step": s, "rm/val_loss": 1 / s, "rm/val_accuracy": 0.6} for s in (10, 20, 40)]
    plots.write_curves(tmp_path, "rm", train, val, [("rm/loss", "rm/val_loss", "loss"),
                                                     ("rm/accuracy", "rm/val_accuracy", "accuracy")])  # fmt: skip
    (fig,) = saved
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    for ax, label in zip(fig.axes, ("loss", "accuracy"), strict=True):
        assert ax.get_ylabel() == label
        markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert [len(m.get_xdata()) for m in markers] == [3]  # the validation points, marked
        assert ax.get_legend() is not None


def test_ppo_curves_name_the_preset_and_mark_the_critic_warmup(tmp_path, monkeypatch):
    from rlhf_core.trainers.ppo import evaluation

    saved = []
    monkeypatch.setattr(evaluation, "save_figure", lambda fig, path: saved.append(fig) or path)
    history = [{"step": s, "objective/scores": s * 0.1, "objective/kl": 0.0} for s in range(1, 31)]
    evaluation.write_plots(tmp_path, history, "vanilla", critic_warmup_steps=5)
    (fig,) = saved
    assert "vanilla" in fig._suptitle.get_text()
    marks = [line for ax in fig.axes for line in ax.get_lines() if list(line.get_xdata()) == [5.5, 5.5]]
    assert len(marks) == len(fig.axes)  # the warm-up's end on every panel
    evaluation.write_plots(tmp_path, history, "ppo_max", critic_warmup_steps=0)
    assert not [line for line in saved[1].axes[0].get_lines() if list(line.get_xdata()) == [0.5, 0.5]]


@pytest.mark.parametrize("judges", [["gold", "rm"], ["rm"]])
def test_win_rate_figure_prints_each_rate_with_its_interval(tmp_path, monkeypatch, judges):
    from rlhf_core.trainers import eval as evaluation

    saved = []
    monkeypatch.setattr(evaluation, "save_figure", lambda fig, path: saved.append(fig) or path)
    metrics = {}
    for judge in judges:
        metrics.update({f"eval/{judge}/win": 0.4, f"eval/{judge}/tie": 0.3, f"eval/{judge}/lose": 0.3,
                        f"eval/{judge}/win_rate": 0.55, f"eval/{judge}/win_rate_ci_low": 0.51,
                        f"eval/{judge}/win_rate_ci_high": 0.59, f"eval/{judge}/n": 200,
                        f"eval/{judge}/lc_win_rate": 0.52, f"eval/{judge}/lc_win_rate_ci_low": 0.47,
                        f"eval/{judge}/lc_win_rate_ci_high": 0.575, f"eval/{judge}/length_coef": -1.5})  # fmt: skip
    evaluation._plot(metrics, judges, ["all"], tmp_path)
    texts = [t.get_text() for t in saved[0].axes[0].texts]
    expected = "win rate 55.0% [51.0%, 59.0%], length-controlled 52.0% [47.0%, 57.5%], n=200"
    assert texts.count(expected) == len(judges)
    # The length-controlled rate is also drawn on its bar, with its interval.
    markers = [line for line in saved[0].axes[0].lines if line.get_marker() == "D"]
    assert [list(m.get_xdata()) for m in markers] == [[0.52]] * len(judges)
    header = (tmp_path / "win_rates.csv").read_text().splitlines()[0]
    assert header == ("judge,group,win,tie,lose,win_rate,win_rate_ci_low,win_rate_ci_high,"
                      "lc_win_rate,lc_win_rate_ci_low,lc_win_rate_ci_high,length_coef")  # fmt: skip
