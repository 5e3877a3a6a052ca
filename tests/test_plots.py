import numpy as np

from trainer.plots import BACKGROUND, SMOOTH, loss_curve, smoothed


def test_smoothing_is_a_debiased_moving_average():
    # by hand: a1 = 0.1*1 / (1-0.9) = 1; a2 = (0.9*0.1 + 0.1*3) / (1-0.81) = 0.39/0.19
    assert np.allclose(smoothed([1.0, 3.0]), [1.0, 0.39 / 0.19])
    assert np.allclose(smoothed([5.0] * 50), 5.0)


def test_curve_goes_down_where_the_loss_goes_down():
    losses = list(np.linspace(1.0, 0.1, 200))
    pixels = np.asarray(loss_curve(losses, 400, 200))
    smooth_rows = [np.where((pixels[:, x] == SMOOTH).all(axis=1))[0] for x in (20, 380)]
    assert len(smooth_rows[0]) and len(smooth_rows[1])
    assert smooth_rows[0].mean() < smooth_rows[1].mean()  # high loss is drawn near the top


def test_empty_and_flat_histories_draw_without_error():
    assert loss_curve([]).size == (512, 256)
    flat = np.asarray(loss_curve([0.5] * 10))
    assert (flat != BACKGROUND).any()
