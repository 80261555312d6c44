"""The default curvature is exact for the loss the user writes; the mse/ce fast paths are checked.

Every exactness test compares, in float64 with K = n orthonormal tangents (so the subspace is the whole
space), the SOFO direction with the dense damped Gauss-Newton step (G + lambda max_eig(G) I)^-1 g, where
G = J^T H J from `jax.jacfwd` of the model and `jax.hessian` of the loss, and g = `jax.grad` of the loss.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo

DAMPING = 1e-3


def dense_gauss_newton(fun, loss_fn, params, damping):
    """The damped Gauss-Newton step from dense jax.jacfwd / jax.hessian / jax.grad and jnp.linalg.solve."""
    flat, unravel = ravel_pytree(params)
    out_flat, unravel_out = ravel_pytree(fun(params))
    jac = jax.jacfwd(lambda t: ravel_pytree(fun(unravel(t)))[0])(flat)
    hess = jax.hessian(lambda o: loss_fn(unravel_out(o)))(out_flat)
    ggn = jac.T @ hess @ jac
    ggn = 0.5 * (ggn + ggn.T)
    top = jnp.linalg.eigvalsh(ggn)[-1]
    grad = jax.grad(lambda t: loss_fn(fun(unravel(t))))(flat)
    return jnp.linalg.solve(ggn + damping * top * jnp.eye(flat.size), grad)


def mlp(seed=0, batch=10, inputs=3, hidden=5, outputs=2):
    keys = jax.random.split(jax.random.key(seed), 6)
    params = {
        "w1": jax.random.normal(keys[0], (inputs, hidden)) / np.sqrt(inputs),
        "b1": 0.1 * jax.random.normal(keys[1], (hidden,)),
        "w2": jax.random.normal(keys[2], (hidden, outputs)) / np.sqrt(hidden),
    }
    x = jax.random.normal(keys[3], (batch, inputs))

    def fun(p):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return params, fun, keys[4], keys[5]


def masked_weighted_mse():
    params, fun, k1, k2 = mlp()
    targets = jax.random.normal(k1, (10, 2))
    mask = (jax.random.uniform(k2, (10, 2)) > 0.4).astype(jnp.float64)  # a response period, per element
    weights = jnp.linspace(0.2, 2.0, 10)  # per-example weights
    return params, fun, lambda y: 0.5 * jnp.sum(mask * weights[:, None] * (y - targets) ** 2) / jnp.sum(mask)


def poisson_log_rates():
    params, fun, k1, _ = mlp()
    counts = jax.random.poisson(k1, 2.0, (10, 2)).astype(jnp.float64)  # spike counts; fun gives log-rates
    return params, fun, lambda log_rates: jnp.mean(jnp.exp(log_rates) - counts * log_rates)


def huber():
    params, fun, k1, _ = mlp()
    targets = 2.0 * jax.random.normal(k1, (10, 2))  # many residuals beyond delta: the Hessian is 0 there
    return params, fun, lambda y: jnp.mean(optax.huber_loss(y, targets, delta=0.5))


def sum_not_mean():
    params, fun, k1, _ = mlp()
    targets = jax.random.normal(k1, (10, 2))
    return params, fun, lambda y: 0.5 * jnp.sum((y - targets) ** 2)


LOSSES = {
    "masked_weighted_mse": masked_weighted_mse,
    "poisson_log_rates": poisson_log_rates,
    "huber": huber,
    "sum_not_mean": sum_not_mean,
}


def n_params(params):
    return ravel_pytree(params)[0].size


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_default_curvature_gives_dense_gauss_newton_step(name):
    params, fun, loss_fn = LOSSES[name]()
    n = n_params(params)
    step = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=n, damping=DAMPING, sampler="orthonormal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CurvatureWarning, no DeprecationWarning on the default path
        value, direction, _ = jax.jit(step)(jax.random.key(1), params)
        jax.effects_barrier()
    reference = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-7, atol=1e-9 * np.abs(reference).max())
    np.testing.assert_allclose(value, loss_fn(fun(params)), rtol=1e-12)


@pytest.mark.parametrize("name", ["masked_weighted_mse", "sum_not_mean"])
def test_mse_fast_path_on_these_losses_is_wrong_and_warns(name):
    """The fast path really gives another step on these losses, and says so, naming the fix."""
    params, fun, loss_fn = LOSSES[name]()
    n = n_params(params)
    step = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=n, damping=DAMPING, sampler="orthonormal", curvature="mse")
    with pytest.warns(sofo.CurvatureWarning, match="curvature='exact'"):
        _, direction, _ = jax.jit(step)(jax.random.key(1), params)
        jax.effects_barrier()
    reference = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    got = ravel_pytree(direction)[0]
    assert np.linalg.norm(got - reference) > 1e-2 * np.linalg.norm(reference)


def test_scan_default_curvature_with_per_step_mask_in_ys_is_dense_gauss_newton():
    """A leaky tanh RNN whose loss is masked per time step through ys (the response period only)."""
    hidden, batch, steps = 3, 4, 6
    keys = jax.random.split(jax.random.key(5), 5)
    params = {
        "w": 0.8 * jax.random.normal(keys[0], (hidden, hidden)) / np.sqrt(hidden),
        "u": jax.random.normal(keys[1], (1, hidden)),
        "c": jax.random.normal(keys[2], (hidden, 1)) / np.sqrt(hidden),
    }
    xs = jax.random.normal(keys[3], (steps, batch, 1))
    targets = jax.random.normal(keys[4], (steps, batch, 1))
    mask = jnp.asarray([0, 0, 0, 1, 1, 1], jnp.float64)[:, None, None] * jnp.ones((steps, batch, 1))
    z0 = jnp.zeros((batch, hidden))

    def cell(p, z, x):
        z = 0.7 * z + 0.3 * jnp.tanh(z @ p["w"] + x @ p["u"])
        return z, z @ p["c"]

    def step_loss(y, target):
        t, m = target
        return 0.5 * jnp.sum(m * (y - t) ** 2) / jnp.sum(mask)

    def unrolled(p):  # a Python loop: independent of lax.scan and of the engine
        z, ys = z0, []
        for t in range(steps):
            z, y = cell(p, z, xs[t])
            ys.append(y)
        return jnp.stack(ys)

    def total_loss(outputs):
        return sum(step_loss(outputs[t], (targets[t], mask[t])) for t in range(steps))

    n = n_params(params)
    step = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=n, damping=DAMPING, sampler="orthonormal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, direction, _ = jax.jit(step)(jax.random.key(2), params, z0, xs, (targets, mask))
        jax.effects_barrier()
    reference = dense_gauss_newton(unrolled, total_loss, params, DAMPING)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-7, atol=1e-9 * np.abs(reference).max())
    np.testing.assert_allclose(value, total_loss(unrolled(params)), rtol=1e-12)
    # The old default (the mse form) warns on the same problem, once for the whole rollout.
    fast = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=n, sampler="orthonormal", curvature="mse")
    with pytest.warns(sofo.CurvatureWarning) as record:
        jax.jit(fast)(jax.random.key(2), params, z0, xs, (targets, mask))
        jax.effects_barrier()
    assert len([w for w in record if issubclass(w.category, sofo.CurvatureWarning)]) == 1


def test_sofo_sofo_defaults_take_the_dense_step_on_a_weighted_loss():
    """sofo.sofo's first update, at its defaults (curvature, damping 1e-2, lr 1), is minus the dense step."""
    params, fun, loss_fn = masked_weighted_mse()
    n = n_params(params)
    opt = sofo.sofo(tangent_size=n, sampler="orthonormal", key=4)
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        updates, state = jax.jit(lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn))(state, params)
        jax.effects_barrier()
    assert bool(state[0].accepted)
    reference = dense_gauss_newton(fun, loss_fn, params, 1e-2)
    np.testing.assert_allclose(-ravel_pytree(updates)[0], reference, rtol=1e-7, atol=1e-9 * np.abs(reference).max())


def test_sofo_grad_default_is_exact_on_poisson():
    params, fun, loss_fn = poisson_log_rates()
    n = n_params(params)
    states = {name: sofo.State(value) for name, value in params.items()}

    def model():
        return fun({name: s.value for name, s in states.items()})

    g = sofo.transforms.sofo_grad(model, loss_fn, grad_states=states, tangent_size=n, damping=DAMPING,
                                  sampler="orthonormal", key=0)
    direction = g()
    reference = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-7, atol=1e-9 * np.abs(reference).max())


# ---- the fast paths: silent when right, a warning naming the fix when wrong ------------------------------


def classifier(dtype=jnp.float64):
    params, fun, k1, _ = mlp(outputs=4)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    labels = jax.random.randint(k1, (10,), 0, 4)
    return params, lambda p: fun(p).astype(dtype), labels


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fast_paths_are_silent_on_their_own_losses(dtype):
    params, fun, labels = classifier(dtype)
    targets = jax.nn.one_hot(labels, 4, dtype=dtype)
    cases = {
        "mse": lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, axis=-1)),
        "ce": lambda y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, labels)),
    }
    for curvature, loss_fn in cases.items():
        step = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=8, curvature=curvature)
        fast = jax.jit(step)(0, params)
        exact = jax.jit(sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=8))(0, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            jax.block_until_ready(jax.jit(step)(0, params))
            jax.effects_barrier()
        # On their own losses the fast paths are the exact curvature: the same sketch.
        np.testing.assert_allclose(fast[2].curvature, exact[2].curvature, rtol=1e-4 if dtype == jnp.float32 else 1e-10,
                                   atol=1e-6 * float(jnp.abs(exact[2].curvature).max()))


@pytest.mark.parametrize("margin", [12.0, 15.0, 20.0, 25.0])
def test_ce_probe_on_a_confident_float32_classifier_is_not_a_mismatch(margin):
    # Near one-hot softmax (the other probabilities below float32's eps): (diag(p) - p p^T) u cancels to
    # nearly nothing, and the round-off of that cancellation alone used to read as a mismatch (0.18 at a
    # margin of 20). The probe must stay far below the tolerance on the true cross-entropy, while the
    # same logits under a half-masked cross-entropy (a real mismatch) are still caught.
    from sofo import _curvature

    rng = np.random.default_rng(0)
    b, c, k = 256, 10, 32
    labels = rng.integers(0, c, b)
    logits = jnp.asarray(margin * np.eye(c)[labels] + rng.standard_normal((b, c)), jnp.float32)
    tangents = jnp.asarray(rng.standard_normal((k, b, c)), jnp.float32)
    loss_fn = lambda y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, labels))  # noqa: E731
    mismatch = float(_curvature.fast_path_mismatch("ce", loss_fn, logits, tangents, jnp.float32))
    assert mismatch < 0.05 * _curvature.MISMATCH_TOLERANCE
    # a real mismatch on unconfident rows: half the batch masked out, at a margin where p is not one-hot
    soft = jnp.asarray(rng.standard_normal((b, c)), jnp.float32)
    mask = jnp.arange(b) < b // 2
    masked = lambda y: jnp.sum(mask * optax.softmax_cross_entropy_with_integer_labels(y, labels)) / b  # noqa: E731
    assert float(_curvature.fast_path_mismatch("ce", masked, soft, tangents, jnp.float32)) > 0.1


@pytest.mark.parametrize(
    "curvature, make_loss",
    [
        ("mse", lambda y, labels: jnp.mean((y - jax.nn.one_hot(labels, 4)) ** 2)),  # mean over all elements
        ("ce", lambda y, labels: jnp.mean(jnp.linspace(0.5, 1.5, 10)  # per-example weights
                                          * optax.softmax_cross_entropy_with_integer_labels(y, labels))),
        ("ce", lambda y, labels: jnp.mean(optax.softmax_cross_entropy(y, optax.smooth_labels(jax.nn.one_hot(labels, 4), 0.1)))
         + 0.1 * jnp.mean(y**2)),  # a logit penalty
    ],
)
def test_fast_path_mismatch_warns_eagerly_and_under_jit_and_vmap(curvature, make_loss):
    params, fun, labels = classifier()
    loss_fn = lambda y: make_loss(y, labels)  # noqa: E731
    step = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, curvature=curvature)
    for run in (step, jax.jit(step), lambda k, p: jax.vmap(step, in_axes=(0, None))(jnp.arange(2) + k, p)):
        with pytest.warns(sofo.CurvatureWarning, match=f"curvature='{curvature}' assumes"):
            jax.block_until_ready(run(0, params))
            jax.effects_barrier()


def test_ce_with_label_smoothing_is_silent():
    """Label smoothing leaves the softmax Hessian unchanged (it only moves the targets): no warning."""
    params, fun, labels = classifier()
    smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 4), 0.2)
    step = sofo.value_and_sofo_grad(fun, lambda y: jnp.mean(optax.softmax_cross_entropy(y, smoothed)), tangent_size=6,
                                    curvature="ce")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(jax.jit(step)(0, params))
        jax.effects_barrier()


# ---- the old name -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: sofo.value_and_sofo_grad(lambda p: p, lambda y: 0.5 * jnp.sum(y**2), **kw),
        lambda **kw: sofo.value_and_sofo_grad_scan(lambda p, z, x: (z, z), lambda y, t: jnp.sum(y), **kw),
        lambda **kw: sofo.scale_by_sofo(**kw),
        lambda **kw: sofo.sofo(**kw),
    ],
)
def test_loss_is_a_deprecated_alias_of_curvature(build):
    with pytest.warns(DeprecationWarning, match="pass curvature='mse' instead"):
        build(tangent_size=2, loss="mse")
    with pytest.raises(ValueError, match="curvature='ce' and loss='mse' disagree"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            build(tangent_size=2, loss="mse", curvature="ce")
    with pytest.raises(ValueError, match="curvature='l2' is not a known curvature form"):
        build(tangent_size=2, curvature="l2")


def test_deprecated_loss_gives_the_same_direction_as_curvature():
    params, fun, loss_fn = sum_not_mean()
    with pytest.warns(DeprecationWarning):
        old = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, loss="exact")
    new = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, curvature="exact")
    np.testing.assert_array_equal(ravel_pytree(old(3, params)[1])[0], ravel_pytree(new(3, params)[1])[0])


def test_brainstate_style_fronts_keep_loss_without_a_warning():
    w = sofo.State(jnp.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        sofo.transforms.sofo_grad(lambda: w.value * 2.0, lambda y: 0.5 * jnp.mean(y**2), grad_states=w, loss="exact",
                                  tangent_size=2, key=0)
