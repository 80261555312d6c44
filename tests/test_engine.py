"""value_and_sofo_grad against dense references: jax.jacfwd, jax.hessian, jax.grad, jnp.linalg.solve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sofo
from sofo import _tangents

DAMPING = 1e-3


def dense_gauss_newton(fun, loss_fn, params, damping):
    """(G + damping * max_eig(G) I)^-1 g with G = J^T H J from jax.jacfwd and jax.hessian of the loss."""
    flat, unravel = ravel_pytree(params)
    outputs = fun(params)
    out_flat, unravel_out = ravel_pytree(outputs)
    jac = jax.jacfwd(lambda t: ravel_pytree(fun(unravel(t)))[0])(flat)
    hess = jax.hessian(lambda o: loss_fn(unravel_out(o)))(out_flat)
    ggn = jac.T @ hess @ jac
    ggn = 0.5 * (ggn + ggn.T)
    eigenvalues = jnp.linalg.eigvalsh(ggn)
    grad = jax.grad(lambda t: loss_fn(fun(unravel(t))))(flat)
    step = jnp.linalg.solve(ggn + damping * eigenvalues[-1] * jnp.eye(flat.size), grad)
    return step, grad, ggn, unravel


def mlp_problem(seed=0, batch=12, inputs=3, hidden=4, classes=3):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {
        "layers": [
            {"w": jax.random.normal(keys[0], (inputs, hidden)), "b": 0.1 * jax.random.normal(keys[1], (hidden,))},
            (jax.random.normal(keys[2], (hidden, classes)),),
        ]
    }
    x = jax.random.normal(keys[3], (batch, inputs))
    targets = jax.random.normal(keys[4], (batch, classes))
    labels = jnp.arange(batch) % classes

    def fun(p):
        first, (w2,) = p["layers"]
        return jnp.tanh(x @ first["w"] + first["b"]) @ w2

    return params, fun, targets, labels


def mse_loss(targets):
    return lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, axis=-1))


def ce_loss(labels):
    return lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def log_cosh_loss(targets):
    # Not covered by either closed form: its output Hessian is diagonal but not constant.
    return lambda y: jnp.sum(jnp.log(jnp.cosh(y - targets))) / 7.0


def n_params(params):
    return ravel_pytree(params)[0].size


@pytest.mark.parametrize(
    "loss, make_loss",
    [("mse", lambda t, l: mse_loss(t)), ("ce", lambda t, l: ce_loss(l)), ("exact", lambda t, l: log_cosh_loss(t))],
)
def test_full_rank_orthonormal_equals_dense_damped_gauss_newton(loss, make_loss):
    params, fun, targets, labels = mlp_problem()
    loss_fn = make_loss(targets, labels)
    n = n_params(params)
    step = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=n, damping=DAMPING, curvature=loss, sampler="orthonormal"
    )
    value, direction, info = jax.jit(step)(jax.random.key(3), params)
    reference, grad, ggn, _ = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    got = ravel_pytree(direction)[0]
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-8 * np.abs(reference).max())
    np.testing.assert_allclose(value, loss_fn(fun(params)), rtol=1e-12)
    np.testing.assert_allclose(info.top_eigenvalue, jnp.linalg.eigvalsh(ggn)[-1], rtol=1e-8)
    assert jax.tree_util.tree_structure(direction) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize("sampler", ["normal", "orthonormal"])
@pytest.mark.parametrize("loss", ["mse", "ce", "exact"])
def test_sketch_and_directional_derivatives_are_projections(sampler, loss):
    """With K < n: info.directional_derivatives = V^T grad and info.curvature = V^T G V."""
    params, fun, targets, labels = mlp_problem(seed=1)
    loss_fn = {"mse": mse_loss(targets), "ce": ce_loss(labels), "exact": log_cosh_loss(targets)}[loss]
    key = jax.random.key(11)
    k = 7
    value, direction, info = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=k, damping=DAMPING, curvature=loss, sampler=sampler
    )(key, params)
    tangents = jax.vmap(lambda v: ravel_pytree(v)[0])(_tangents.sample(key, params, k, sampler))
    _, grad, ggn, unravel = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    np.testing.assert_allclose(info.directional_derivatives, tangents @ grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info.curvature, tangents @ ggn @ tangents.T, rtol=1e-9, atol=1e-12)
    # The direction is V (V^T G V + lambda I)^-1 V^T g, computed here with a dense solve.
    small = tangents @ ggn @ tangents.T
    lam = DAMPING * jnp.linalg.eigvalsh(small)[-1]
    expected = tangents.T @ jnp.linalg.solve(small + lam * jnp.eye(k), tangents @ grad)
    np.testing.assert_allclose(ravel_pytree(direction)[0], expected, rtol=1e-7, atol=1e-12)
    # Descent direction.
    assert float(ravel_pytree(direction)[0] @ grad) > 0


def test_tangent_samplers_are_normalised_and_orthonormal():
    params, *_ = mlp_problem()
    normal = jax.vmap(lambda v: ravel_pytree(v)[0])(_tangents.sample(jax.random.key(0), params, 9, "normal"))
    np.testing.assert_allclose(jnp.linalg.norm(normal, axis=1), 1.0, rtol=1e-12)
    ortho = jax.vmap(lambda v: ravel_pytree(v)[0])(_tangents.sample(jax.random.key(0), params, 9, "orthonormal"))
    np.testing.assert_allclose(ortho @ ortho.T, jnp.eye(9), atol=1e-12)


def test_key_forms_and_determinism():
    params, fun, targets, _ = mlp_problem()
    step = sofo.value_and_sofo_grad(fun, mse_loss(targets), tangent_size=5)
    _, typed, _ = step(jax.random.key(4), params)
    _, legacy, _ = step(jax.random.PRNGKey(4), params)
    _, seed, _ = step(4, params)
    _, again, _ = step(jax.random.key(4), params)
    _, other, _ = step(jax.random.key(5), params)
    for a, b in [(typed, legacy), (typed, seed), (typed, again)]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(ravel_pytree(typed)[0], ravel_pytree(other)[0])


def test_jit_and_vmap_over_keys():
    params, fun, targets, _ = mlp_problem()
    step = sofo.value_and_sofo_grad(fun, mse_loss(targets), tangent_size=6)
    keys = jax.random.split(jax.random.key(0), 3)
    values, directions, infos = jax.jit(jax.vmap(step, in_axes=(0, None)))(keys, params)
    for i in range(3):
        value, direction, info = step(keys[i], params)
        np.testing.assert_allclose(values[i], value, rtol=1e-12)
        np.testing.assert_allclose(
            ravel_pytree(jax.tree_util.tree_map(lambda d, i=i: d[i], directions))[0],
            ravel_pytree(direction)[0],
            rtol=1e-9,
            atol=1e-12,
        )
        np.testing.assert_allclose(infos.top_eigenvalue[i], info.top_eigenvalue, rtol=1e-9)


def test_time_major_and_pytree_outputs_match_dense_reference():
    keys = jax.random.split(jax.random.key(2), 4)
    params = {"w": jax.random.normal(keys[0], (3, 2)), "v": jax.random.normal(keys[1], (3,))}
    x = jax.random.normal(keys[2], (5, 4, 3))  # (T, B, features)
    t_seq = jax.random.normal(keys[3], (5, 4, 2))

    def fun(p):
        return {"seq": jnp.tanh(x @ p["w"]), "scalar_per_row": jnp.sin(x[0] @ p["v"])}

    def loss_fn(out):
        # Each leaf's mse convention: 0.5 * mean over its leading axis of the sum over the rest.
        seq = 0.5 * jnp.mean(jnp.sum((out["seq"] - t_seq) ** 2, axis=(1, 2)))
        row = 0.5 * jnp.mean((out["scalar_per_row"] - 1.0) ** 2)
        return seq + row

    n = n_params(params)
    _, direction, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=n, damping=DAMPING, curvature="mse", sampler="orthonormal"
    )(0, params)
    reference, *_ = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-6)


def test_ce_on_time_major_logits_matches_dense_reference():
    keys = jax.random.split(jax.random.key(3), 3)
    params = jax.random.normal(keys[0], (3, 4))
    x = jax.random.normal(keys[1], (6, 5, 3))
    labels = jax.random.randint(keys[2], (6, 5), 0, 4)

    def fun(w):
        return x @ w

    def loss_fn(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))

    _, direction, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=12, damping=DAMPING, curvature="ce", sampler="orthonormal"
    )(1, params)
    reference, *_ = dense_gauss_newton(fun, loss_fn, params, DAMPING)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-6)


def test_zero_curvature_stays_finite():
    params = {"w": jnp.ones((3, 2))}
    x = jnp.zeros((4, 3))  # zero inputs: zero output tangents, zero curvature, zero gradient
    step = sofo.value_and_sofo_grad(lambda p: x @ p["w"], mse_loss(jnp.ones((4, 2))), tangent_size=4)
    value, direction, info = jax.jit(step)(0, params)
    assert np.isfinite(value)
    np.testing.assert_array_equal(direction["w"], 0.0)
    assert info.top_eigenvalue == 0.0
    # A loss linear in the outputs: gradient but no curvature at all.
    linear = sofo.value_and_sofo_grad(lambda p: p["w"] * 2.0, jnp.sum, tangent_size=4, curvature="exact")
    _, direction, _ = linear(0, params)
    assert np.all(np.isfinite(direction["w"]))
    grad = jax.grad(lambda p: jnp.sum(p["w"] * 2.0))(params)["w"]
    assert float(jnp.sum(direction["w"] * grad)) > 0


def test_exact_clips_negative_curvature():
    """A concave loss: the sketch is negative definite, the clipped solve still gives a finite descent step."""
    params = jnp.array([0.3, -0.2, 0.5])
    step = sofo.value_and_sofo_grad(lambda p: p, lambda y: -jnp.sum(y**2) + jnp.sum(y), tangent_size=3,
                                    sampler="orthonormal", curvature="exact")
    _, direction, info = step(0, params)
    assert info.top_eigenvalue < 0
    assert np.all(np.isfinite(direction))
    grad = jax.grad(lambda y: -jnp.sum(y**2) + jnp.sum(y))(params)
    assert float(direction @ grad) > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_low_precision_params_keep_their_dtype(dtype):
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros((2,), jnp.float32)}
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3) / 10
    fun = lambda p: (x.astype(p["w"].dtype) @ p["w"]).astype(jnp.float32) + p["b"]  # noqa: E731
    value, direction, info = jax.jit(sofo.value_and_sofo_grad(fun, mse_loss(jnp.ones((4, 2))), tangent_size=4))(
        0, params
    )
    assert direction["w"].dtype == dtype and direction["b"].dtype == jnp.float32
    assert info.curvature.dtype == jnp.float32
    assert all(np.all(np.isfinite(np.asarray(d, np.float32))) for d in jax.tree_util.tree_leaves(direction))


BAD_CONFIG = [
    (dict(curvature="l2"), ValueError, "curvature='l2'.*'exact', 'mse', 'ce'"),
    (dict(sampler="uniform"), ValueError, "sampler='uniform'.*'normal', 'layerwise', 'balanced', 'orthonormal'"),
    (dict(tangent_size=0), ValueError, "tangent_size must be a positive int.*got 0"),
    (dict(tangent_size=-3), ValueError, "tangent_size.*got -3"),
    (dict(tangent_size=4.0), ValueError, "tangent_size.*got 4.0"),
    (dict(tangent_size=True), ValueError, "tangent_size.*got True"),
    (dict(damping=-1e-3), ValueError, "damping.*got -0.001"),
    (dict(damping=float("nan")), ValueError, "damping.*got nan"),
    (dict(damping=float("inf")), ValueError, "damping.*got inf"),
    (dict(damping=True), ValueError, "damping.*got True"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CONFIG)
@pytest.mark.parametrize("front", ["plain", "scan"])
def test_bad_configuration_raises_at_construction(kwargs, error, match, front):
    build = sofo.value_and_sofo_grad if front == "plain" else sofo.value_and_sofo_grad_scan
    with pytest.raises(error, match=match):
        build(lambda *a: a, lambda *a: 0.0, **kwargs)


def test_bad_params_and_keys_raise_before_any_work():
    calls = []

    def fun(p):
        calls.append(1)
        return p["w"]

    step = sofo.value_and_sofo_grad(fun, jnp.sum, tangent_size=2)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        step(0, {"w": jnp.ones(3), "n": jnp.arange(3)})
    with pytest.raises(TypeError, match=r"params\['flag'\] has dtype bool"):
        step(0, {"w": jnp.ones(3), "flag": jnp.array(True)})
    with pytest.raises(ValueError, match="no array leaves"):
        step(0, {})
    with pytest.raises(ValueError, match="holds no numbers"):
        step(0, {"w": jnp.ones((0,))})
    with pytest.raises(ValueError, match="orthonormal.*tangent_size <= the number of parameters"):
        sofo.value_and_sofo_grad(fun, jnp.sum, tangent_size=4, sampler="orthonormal")(0, {"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="key must be"):
        step("seed", {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="key must be"):
        step(jnp.zeros((3,), jnp.uint32), {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="single PRNG key"):
        step(jax.random.split(jax.random.key(0), 2), {"w": jnp.ones(3)})
    assert calls == []


def test_bad_model_and_loss_outputs():
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match="fun must return floating arrays"):
        sofo.value_and_sofo_grad(lambda p: jnp.arange(3), jnp.sum, tangent_size=2)(0, params)
    with pytest.raises(TypeError, match="holds no arrays"):
        sofo.value_and_sofo_grad(lambda p: None, lambda y: 0.0, tangent_size=2)(0, params)
    with pytest.raises(TypeError, match="loss_fn must return a floating scalar.*shape \\(3,\\)"):
        sofo.value_and_sofo_grad(lambda p: p["w"], lambda y: y, tangent_size=2)(0, params)
    with pytest.raises(ValueError, match="class axis"):
        sofo.value_and_sofo_grad(lambda p: jnp.sum(p["w"]), lambda y: y, tangent_size=2, curvature="ce")(0, params)


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_tangent_chunks_give_the_same_direction(chunk):
    params, fun, targets, labels = mlp_problem(seed=4)
    kwargs = dict(tangent_size=13, damping=DAMPING, curvature="ce")
    _, whole, info = jax.jit(sofo.value_and_sofo_grad(fun, ce_loss(labels), **kwargs))(2, params)
    _, chunked, info_chunked = jax.jit(
        sofo.value_and_sofo_grad(fun, ce_loss(labels), tangent_chunk_size=chunk, **kwargs)
    )(2, params)
    np.testing.assert_allclose(info_chunked.curvature, info.curvature, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ravel_pytree(chunked)[0], ravel_pytree(whole)[0], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4"])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match=f"tangent_chunk_size must be None .* got {bad!r}"):
        sofo.value_and_sofo_grad(jnp.sin, jnp.sum, tangent_chunk_size=bad)


def test_bad_tangent_sharding():
    with pytest.raises(TypeError, match="tangent_sharding must be None or a jax.sharding.NamedSharding"):
        sofo.value_and_sofo_grad(jnp.sin, jnp.sum, tangent_sharding="k")
