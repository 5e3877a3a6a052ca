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


def test_evaluation_curve_marks_the_best_step_and_draws_fidelity_rising():
    from trainer.evaluation import StepScores
    from trainer.plots import BEST, FIDELITY, evaluation_curve
    history = [StepScores(step, fidelity, 0.3) for step, fidelity in ((0, 0.1), (100, 0.5), (200, 0.9), (300, 0.6))]
    pixels = np.asarray(evaluation_curve(history, best_step=200, pres_limit=0.4, width=408, height=200))
    best_columns = np.where((pixels == BEST).all(axis=2).any(axis=0))[0]
    assert abs(best_columns.mean() - (8 + 392 * 200 / 300)) <= 1  # the yellow line at step 200 of 300
    fidelity_rows = [np.where((pixels[:, x] == FIDELITY).all(axis=1))[0] for x in (10, 270)]
    assert fidelity_rows[0].mean() > fidelity_rows[1].mean()  # 0.1 at step 0 is drawn lower than 0.9 at step 200
    assert evaluation_curve([], None, None).size == (512, 256)
