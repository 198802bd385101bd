import numpy as np
import pytest
from scipy.integrate import solve_ivp

from analysis.examples import (
    XOR_FLOW,
    appendix_a_field,
    euler_paths,
    linearly_separable,
    separating_line,
    xor_data,
    xor_separability_sweep,
)


def test_xor_outputs_separable_at_coarse_step_not_at_fine_step():
    """Figure 3: Euler's outputs are linearly separable at h = 10^-2.5 and not at 10^-3.5."""
    assert xor_separability_sweep([-2.5, -3.5]) == [True, False]


def test_xor_separability_is_a_discretisation_artefact():
    # Every step size from 10^-4 to 10^-3 is inseparable, and so is the exact flow:
    # the separability at 10^-2.5 is Euler's global error, not the ODE's.
    assert not any(xor_separability_sweep(np.arange(-4.0, -2.99, 0.1)))
    x, y = xor_data()
    exact = np.array([solve_ivp(lambda t, z: XOR_FLOW(z), (0, XOR_FLOW.T), z0, rtol=1e-10, atol=1e-12).y[:, -1] for z0 in x])
    assert linearly_separable(exact, y) is False
    np.testing.assert_allclose(XOR_FLOW.paths(10**-4.5)[-1], exact, atol=0.05)


def test_separating_line_separates_and_rejects_xor():
    x, y = xor_data()
    assert separating_line(x, y) is None  # XOR itself: the textbook inseparable set
    z = np.array([[0.0, 0.0], [1.0, 0.2], [3.0, 3.0], [4.0, 2.5]])
    labels = np.array([0, 0, 1, 1])
    w, b = separating_line(z, labels)
    side = z @ w + b
    assert np.all(side[labels == 1] > 0) and np.all(side[labels == 0] < 0)
    assert linearly_separable(np.array([[np.inf, 0.0], [1, 1], [0, 1], [1, 0]]), y) is None
    with pytest.raises(ValueError, match="exactly two classes"):
        separating_line(z, np.array([0, 1, 2, 1]))


def test_euler_paths_take_the_requested_steps():
    paths = euler_paths(lambda z: -z, np.array([[1.0, 2.0]]), 0.25, 1.0)
    assert paths.shape == (5, 1, 2)
    np.testing.assert_allclose(paths[-1], np.array([[1.0, 2.0]]) * 0.75**4)
    with pytest.raises(ValueError, match="step must be > 0"):
        euler_paths(lambda z: z, np.zeros((1, 2)), 0.0, 1.0)


def test_appendix_a_field_is_straight_outside_the_curved_region_and_continuous():
    y = np.linspace(0.1, 2.0, 7)
    for x in (0.0, 0.5, 1.0, 2.0, 2.5, 3.0):
        f = appendix_a_field(np.stack([np.full_like(y, x), y], 1))
        np.testing.assert_allclose(f, np.tile([1.0, 0.0], (len(y), 1)))
    # Continuous (so Lipschitz, being piecewise linear) at every breakpoint.
    for x in (1.0, 1.25, 1.75, 2.0):
        left = appendix_a_field(np.stack([np.full_like(y, x - 1e-9), y], 1))
        right = appendix_a_field(np.stack([np.full_like(y, x + 1e-9), y], 1))
        np.testing.assert_allclose(left, right, atol=1e-7)
    inside = appendix_a_field(np.array([[1.5, 0.5], [1.5, 1.5]]))
    assert inside[0, 1] > 0 > inside[1, 1]  # curves towards y = 1 inside (1, 2]
