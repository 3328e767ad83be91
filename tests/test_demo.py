import jax.numpy as jnp
import numpy as np

from sortgrad import demo


def test_demo_runs_and_reports_zero_then_nonzero_gradient(capsys):
    demo.main(["--n", "12", "--m", "5", "--k", "3"])
    out = capsys.readouterr().out
    assert "|grad| through hard top-k:  0 " in out
    assert "central differences" in out


def test_soft_gradient_matches_central_differences():
    a, b, theta = demo.make_problem(10, 20, 0)
    import jax
    grad = np.asarray(jax.grad(demo.soft_objective)(theta, a, b, 3, 1.0))
    fd = demo.central_differences(lambda t: float(demo.soft_objective(jnp.asarray(t), a, b, 3,
                                                                     1.0)), np.asarray(theta))
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, fd, atol=1e-6)
