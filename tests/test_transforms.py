"""sofo.transforms: the brainstate/brainpy return table, against jax.grad / jacfwd / hessian and the engine.

Every reference is computed independently here: a pure function of the documented `diff` layout
(states only -> their values in grad_states' structure; arguments only -> args[argnums]; both ->
(state values, argument values)) differentiated by jax, or `sofo.value_and_sofo_grad` with the same key.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
from sofo import transforms as T
from sofo.transforms import State

W0 = jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3]])
B0 = jnp.array([0.05, -0.1])
X = jnp.array([0.7, -1.2, 0.4])
Y = jnp.array([1.5, -0.5])
KEY = jax.random.key(7)
K = 4


def model(w, b, x, y):
    """A small model with outputs of shape (2,) (the leading axis is the batch for 'mse')."""
    return jnp.tanh(w @ x + b) * y


def scalar(out):
    return jnp.sum(out**2)


def sofo_loss(out):
    return 0.5 * jnp.mean((out - 0.3) ** 2)


TRANSFORMS = ("grad", "jacfwd", "hessian", "sofo_grad")


def make_states():
    return State(W0, name="W"), State(B0, name="b")


def grad_states_for(mode, w, b):
    return {None: None, "single": w, "list": [w, b], "tuple": (w, b), "dict": {"W": w, "b": b}}[mode]


def expected_diff(mode, argnums):
    """The documented layout of the returned gradients, built from the raw arrays."""
    var = {None: None, "single": W0, "list": [W0, B0], "tuple": (W0, B0), "dict": {"W": W0, "b": B0}}[mode]
    if argnums is None and mode is None:
        argnums = 0
    arg = {None: None, 0: X, (0, 1): (X, Y)}[argnums]
    if mode is None:
        return arg
    return var if argnums is None else (var, arg)


def evaluate(d, mode, argnums):
    """model(...) with W, b, x, y taken from a `diff` laid out as in `expected_diff`."""
    w, b, x, y = W0, B0, X, Y
    if argnums is None and mode is None:
        argnums = 0
    if mode is None:
        var, arg = None, d
    elif argnums is None:
        var, arg = d, None
    else:
        var, arg = d
    if mode == "single":
        w = var
    elif mode in ("list", "tuple"):
        w, b = var
    elif mode == "dict":
        w, b = var["W"], var["b"]
    if argnums == 0:
        x = arg
    elif argnums == (0, 1):
        x, y = arg
    return model(w, b, x, y)


def build(kind, fun, **kw):
    if kind == "sofo_grad":
        return T.sofo_grad(fun, sofo_loss, tangent_size=K, key=KEY, **kw)
    return getattr(T, kind)(fun, **kw)


@functools.lru_cache(maxsize=None)
def reference(kind, mode, argnums):
    """(grads, value) from jax / the engine on the pure function of diff."""
    d = expected_diff(mode, argnums)
    if kind == "sofo_grad":
        _, direction, _ = sofo.value_and_sofo_grad(
            lambda p: evaluate(p, mode, argnums), sofo_loss, tangent_size=K
        )(KEY, d)
        # sofo_grad's value is what fun returns (the model output), as brainstate's sofo_grad returned it.
        return direction, evaluate(d, mode, argnums)
    out = (lambda p: evaluate(p, mode, argnums)) if kind == "jacfwd" else (
        lambda p: scalar(evaluate(p, mode, argnums))
    )
    return getattr(jax, kind)(out)(d), out(d)


def assert_tree_close(actual, expected, rtol=1e-9, atol=1e-11):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert jnp.shape(a) == jnp.shape(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# Every row of the table (arg_grads, var_grads, (var_grads, arg_grads); argnums as an int and as a
# tuple), each with and without has_aux and return_value, for every transform. The other structures of
# grad_states (single State, list, tuple, dict) go through the same wrapper and are checked with `grad`.
ROWS = [(None, None), ("dict", None), ("tuple", (0, 1))]
STRUCTURE_ROWS = [(None, (0, 1)), ("single", None), ("list", 0), ("dict", 0), ("tuple", None)]
CASES = [(kind, *row) for kind in TRANSFORMS for row in ROWS] + [("grad", *row) for row in STRUCTURE_ROWS]


@pytest.mark.parametrize("kind,mode,argnums", CASES)
@pytest.mark.parametrize("has_aux,return_value", list(itertools.product((False, True), repeat=2)))
def test_return_table(kind, mode, argnums, has_aux, return_value):
    w, b = make_states()

    def fun(x, y):
        out = model(w.value, b.value, x, y)
        result = out if kind in ("jacfwd", "sofo_grad") else scalar(out)
        return (result, {"pre": w.value @ x}) if has_aux else result

    kw = dict(grad_states=grad_states_for(mode, w, b), argnums=argnums, return_value=return_value)
    if has_aux:
        kw["has_aux"] = True
    result = build(kind, fun, **kw)(X, Y)

    grads, value = reference(kind, mode, argnums)
    expected = (grads,)
    if return_value:
        expected += (value,)
    if has_aux:
        expected += ({"pre": W0 @ X},)
    expected = expected[0] if len(expected) == 1 else expected
    assert_tree_close(result, expected)
    # The states hold their concrete values again.
    assert w.value is W0 and b.value is B0


# --- the seeds' documented examples -------------------------------------------------------------------


def test_seed_example_sum_of_squares():
    f = lambda x: jnp.sum(x**2)  # noqa: E731
    x = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(T.grad(f)(x), 2 * x)
    grads, value = T.grad(f, return_value=True)(x)
    np.testing.assert_allclose(grads, 2 * x)
    np.testing.assert_allclose(value, 14.0)
    np.testing.assert_allclose(T.hessian(f)(x), 2 * jnp.eye(3))
    np.testing.assert_allclose(T.jacfwd(lambda x: x**2)(x), jnp.diag(2 * x))


def test_seed_example_weight_and_bias_states():
    weight, bias = State(W0, name="weight"), State(B0, name="bias")

    def loss(x):
        return jnp.sum((weight.value @ x + bias.value) ** 2)

    ref = jax.grad(lambda p, x: jnp.sum((p["weight"] @ x + p["bias"]) ** 2), argnums=(0, 1))(
        {"weight": W0, "bias": B0}, X
    )
    var_grads = T.grad(loss, grad_states={"weight": weight, "bias": bias})(X)
    assert_tree_close(var_grads, ref[0])
    var_grads, arg_grads = T.grad(loss, grad_states={"weight": weight, "bias": bias}, argnums=0)(X)
    assert_tree_close((var_grads, arg_grads), ref)


def test_seed_example_aux_and_return_value():
    weight = State(W0)

    def loss(x):
        pred = weight.value @ x
        return jnp.sum(pred**2), pred

    grads, value, aux = T.grad(loss, grad_states=weight, has_aux=True, return_value=True)(X)
    np.testing.assert_allclose(grads, jax.grad(lambda w: jnp.sum((w @ X) ** 2))(W0))
    np.testing.assert_allclose(value, jnp.sum((W0 @ X) ** 2))
    np.testing.assert_allclose(aux, W0 @ X)


def test_decorator_form_and_single_argnums_tuple():
    weight = State(W0)

    @T.grad(grad_states=weight, argnums=(1,))
    def loss(scale, x):
        return scale * jnp.sum((weight.value @ x) ** 2)

    var_grads, arg_grads = loss(2.0, X)
    ref_w, ref_x = jax.grad(lambda w, x: 2.0 * jnp.sum((w @ x) ** 2), argnums=(0, 1))(W0, X)
    np.testing.assert_allclose(var_grads, ref_w)
    assert isinstance(arg_grads, tuple) and len(arg_grads) == 1
    np.testing.assert_allclose(arg_grads[0], ref_x)


def test_public_names():
    assert sofo.sofo_grad is T.sofo_grad
    assert sofo.State is T.State
    assert sofo.transforms is T


# --- states written inside the function ---------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_written_states_hold_new_concrete_values(kind):
    w, b = make_states()
    counter, last = State(jnp.zeros(())), State(jnp.zeros(2))

    def fun(x):
        out = model(w.value, b.value, x, Y)
        counter.value = counter.value + 1
        last.value = out  # depends on the traced state
        w.value = w.value * 0.5  # a grad state written too
        return out if kind in ("jacfwd", "sofo_grad") else scalar(out)

    build(kind, fun, grad_states=[w, b])(X)
    for state in (counter, last, w):
        assert not isinstance(state.value, jax.core.Tracer)
    np.testing.assert_allclose(counter.value, 1.0)
    np.testing.assert_allclose(last.value, model(W0, B0, X, Y))
    np.testing.assert_allclose(w.value, 0.5 * W0)
    assert b.value is B0


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_states_restored_on_exception(kind):
    w, b = make_states()
    other = State(jnp.ones(3))

    def fun(x):
        other.value = other.value + w.value[0]
        w.value = jnp.zeros_like(w.value)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        build(kind, fun, grad_states=[w, b])(X)
    assert w.value is W0 and b.value is B0
    np.testing.assert_array_equal(other.value, jnp.ones(3))


def test_state_restored_when_error_comes_after_the_trace():
    w = State(W0)
    written = State(jnp.zeros(()))

    def fun(x):
        written.value = jnp.sum(x)
        return jnp.sum(jnp.sqrt(w.value @ x))  # NaN gradient: sqrt of negative entries

    with pytest.raises(FloatingPointError):
        T.grad(fun, grad_states=w, debug_nan=True)(X)
    assert w.value is W0
    np.testing.assert_array_equal(written.value, 0.0)


def test_writes_under_jit_are_refused_and_restored():
    w = State(W0)
    counter = State(jnp.zeros(()))

    def fun(x):
        counter.value = counter.value + 1
        return jnp.sum((w.value @ x) ** 2)

    with pytest.raises(RuntimeError, match="tracer"):
        jax.jit(lambda x: T.grad(fun, grad_states=w)(x))(X)
    assert counter.value is not None and not isinstance(counter.value, jax.core.Tracer)
    np.testing.assert_array_equal(counter.value, 0.0)
    assert w.value is W0


def test_nested_transforms_with_writes():
    w = State(W0)
    calls = State(jnp.zeros(()))

    def inner(x):
        calls.value = calls.value + 1
        return jnp.sum(jnp.tanh(w.value @ x) ** 2)

    def outer(x):
        g = T.grad(inner)(x)  # differentiates x while w is traced by the outer grad
        return jnp.sum(g**2)

    result = T.grad(outer, grad_states=w)(X)
    ref = jax.grad(lambda wv: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.tanh(wv @ x) ** 2))(X) ** 2))(W0)
    np.testing.assert_allclose(result, ref, rtol=1e-10)
    assert not isinstance(calls.value, jax.core.Tracer)
    np.testing.assert_allclose(calls.value, 1.0)
    assert w.value is W0


# --- check_states ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_check_states_names_the_unread_state(kind):
    w, b = make_states()
    unused = State(jnp.ones(2), name="unused")

    def fun(x):
        out = model(w.value, b.value, x, Y)
        return out if kind in ("jacfwd", "sofo_grad") else scalar(out)

    with pytest.raises(ValueError, match=r"grad_states\['extra'\].*'unused'.*check_states=False"):
        build(kind, fun, grad_states={"W": w, "extra": unused})(X)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_check_states_false_gives_zeros(kind):
    w, b = make_states()
    unused = State(jnp.ones(2), name="unused")

    def fun(x):
        out = model(w.value, b.value, x, Y)
        return out if kind in ("jacfwd", "sofo_grad") else scalar(out)

    result = build(kind, fun, grad_states={"W": w, "extra": unused}, check_states=False)(X)
    if kind == "sofo_grad":
        # The unread state is left out of the engine's params and gets a zero direction.
        _, ref, _ = sofo.value_and_sofo_grad(lambda p: model(p["W"], B0, X, Y), sofo_loss, tangent_size=K)(
            KEY, {"W": W0}
        )
        # Two separately compiled programs: XLA may order the reductions differently, and the damped K x K
        # solve (damping 1e-5 of the top eigenvalue) amplifies that round-off by up to 1 / damping = 1e5,
        # so ~1e-16 * 1e5 * K; jax 0.12 lands at 1.1e-10. 1e-8 keeps a 100x margin and still catches any
        # real difference (a wrong tangent or scale is off by O(1)).
        np.testing.assert_allclose(result["W"], ref["W"], rtol=1e-8)
        np.testing.assert_array_equal(result["extra"], jnp.zeros(2))
        return
    fn = lambda p: model(p["W"], B0, X, Y) + 0 * jnp.sum(p["extra"])  # noqa: E731
    ref = getattr(jax, kind)(fn if kind == "jacfwd" else (lambda p: scalar(fn(p))))({"W": W0, "extra": jnp.ones(2)})
    assert_tree_close(result, ref)
    assert not jnp.any(jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(result["extra"])]))


# --- jit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_under_jit_with_read_only_states(kind):
    w, b = make_states()

    def fun(x, y):
        out = model(w.value, b.value, x, y)
        return out if kind in ("jacfwd", "sofo_grad") else scalar(out)

    if kind == "sofo_grad":
        # Under jit the key is a traced value: build the transform inside the step with it.
        @jax.jit
        def step(key, x, y):
            g = T.sofo_grad(fun, sofo_loss, grad_states={"W": w, "b": b}, argnums=0, tangent_size=K, key=key)
            return g(x, y)

        result = step(KEY, X, Y)
    else:
        result = jax.jit(getattr(T, kind)(fun, grad_states={"W": w, "b": b}, argnums=0))(X, Y)
    grads, _ = reference(kind, "dict", 0)
    # jit and eager round differently; the K x K solve amplifies that for sofo_grad.
    assert_tree_close(result, grads, rtol=1e-8, atol=1e-10)
    assert w.value is W0 and b.value is B0


# --- keys -----------------------------------------------------------------------------------------------


def _sofo_fun():
    w = State(W0)
    return w, (lambda x: model(w.value, B0, x, Y))


def test_explicit_key_is_honoured():
    w, fun = _sofo_fun()
    engine = sofo.value_and_sofo_grad(lambda p: model(p, B0, X, Y), sofo_loss, tangent_size=K)
    for key in (11, jax.random.key(11), jax.random.PRNGKey(11)):
        direction = T.sofo_grad(fun, sofo_loss, grad_states=w, tangent_size=K, key=key)(X)
        np.testing.assert_allclose(direction, engine(key, W0)[1], rtol=1e-10)


def test_default_keys_are_fresh_and_seedable():
    w, fun = _sofo_fun()
    g = T.sofo_grad(fun, sofo_loss, grad_states=w, tangent_size=K)
    T.seed(123)
    first, second = g(X), g(X)
    assert not np.allclose(first, second)  # never silently the same tangents
    T.seed(123)
    np.testing.assert_array_equal(g(X), first)  # the sequence is reproducible
    np.testing.assert_array_equal(g(X), second)
    # Each call's direction is the engine's for some key: check the first against the documented
    # sequence (seed n -> jax.random.key(n), split once per call).
    T.seed(123)
    _, expected_key = jax.random.split(jax.random.key(123))
    _, ref, _ = sofo.value_and_sofo_grad(lambda p: model(p, B0, X, Y), sofo_loss, tangent_size=K)(expected_key, W0)
    np.testing.assert_allclose(g(X), ref, rtol=1e-10)


def test_default_key_under_jit_asks_for_key():
    w, fun = _sofo_fun()
    g = T.sofo_grad(fun, sofo_loss, grad_states=w, tangent_size=K)
    with pytest.raises(RuntimeError, match="key="):
        jax.jit(g)(X)
    assert w.value is W0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        T.seed(bad)


# --- SOFO exactness against the dense damped Gauss-Newton step -------------------------------------------


def test_sofo_grad_full_rank_is_the_damped_gauss_newton_step():
    damping = 1e-3
    w, b = State(W0, name="W"), State(B0, name="b")
    xs = jnp.array([[0.7, -1.2, 0.4], [0.2, 0.5, -0.9], [-1.0, 0.3, 0.8], [0.4, 0.4, 0.1]])
    targets = jnp.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.6], [0.2, 0.0]])
    scale0 = jnp.array(1.3)

    def fun(scale, inputs):
        return scale * jnp.tanh(inputs @ w.value.T + b.value)  # (batch 4, 2)

    def loss_fn(out):
        return 0.5 * jnp.mean(jnp.sum((out - targets) ** 2, axis=-1))

    params = ({"W": W0, "b": B0}, scale0)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    n = flat.size  # 6 + 2 + 1 = 9

    g = T.sofo_grad(
        fun, loss_fn, grad_states={"W": w, "b": b}, argnums=0, return_value=True, sampler="orthonormal",
        tangent_size=n, damping=damping, key=5,
    )
    direction, value = jax.jit(g)(scale0, xs)  # jit: one compile instead of many eager ones

    def flat_model(theta):
        (p, s) = unravel(theta)
        return (s * jnp.tanh(xs @ p["W"].T + p["b"])).ravel()

    @jax.jit
    def dense_step(theta):
        jac = jax.jacfwd(flat_model)(theta)  # (8, n)
        gradient = jax.grad(lambda t: loss_fn(flat_model(t).reshape(4, 2)))(theta)
        ggn = jac.T @ jac / 4  # mse: H_L = I / B, B = 4
        top = jnp.linalg.eigvalsh(ggn)[-1]
        return jnp.linalg.solve(ggn + damping * top * jnp.eye(n), gradient)

    dense = dense_step(flat)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(direction)[0], dense, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(value, flat_model(flat).reshape(4, 2), rtol=1e-12)  # fun's output
    assert jax.tree_util.tree_structure(direction) == jax.tree_util.tree_structure(params)


# --- brainpy migration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_grad_vars_alias_and_dyn_vars(kind):
    w, b = make_states()

    def fun(x):
        out = model(w.value, b.value, x, Y)
        return out if kind in ("jacfwd", "sofo_grad") else scalar(out)

    expected = build(kind, fun, grad_states=[w, b])(X)
    assert_tree_close(build(kind, fun, grad_vars=[w, b])(X), expected)
    with pytest.warns(DeprecationWarning, match="dyn_vars has no effect"):
        transformed = build(kind, fun, grad_vars=[w, b], dyn_vars={"W": w})
    assert_tree_close(transformed(X), expected)
    with pytest.raises(TypeError, match="not both"):
        build(kind, fun, grad_states=[w], grad_vars=[b])
    with pytest.raises(ValueError, match=r"reduce_axes=\('batch',\) is not supported"):
        build(kind, fun, grad_vars=[w, b], reduce_axes=("batch",))
    assert_tree_close(build(kind, fun, grad_vars=[w, b], reduce_axes=())(X), expected)


# --- unit_aware -------------------------------------------------------------------------------------------


def test_unit_aware_without_brainunit_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "brainunit", None)  # makes `import brainunit` fail
    for kind in ("grad", "jacfwd", "hessian"):
        with pytest.raises(ImportError, match=r"pip install 'sofo\[units\]'"):
            getattr(T, kind)(lambda x: jnp.sum(x**2), unit_aware=True)


def test_unit_aware_gradients_carry_units():
    u = pytest.importorskip("brainunit")
    x = jnp.array([1.0, 2.0, 3.0]) * u.meter
    weight = State(jnp.array([0.5, -1.0, 2.0]) * u.second)

    def energy(x):
        return u.math.sum(weight.value * x**2)

    var_grads, arg_grads = T.grad(energy, grad_states=weight, argnums=0, unit_aware=True)(x)
    assert u.get_unit(arg_grads) == u.meter * u.second
    assert u.get_unit(var_grads) == u.meter**2
    np.testing.assert_allclose(u.get_mantissa(arg_grads), 2 * jnp.array([0.5, -1.0, 2.0]) * jnp.array([1.0, 2, 3]))
    np.testing.assert_allclose(u.get_mantissa(var_grads), jnp.array([1.0, 4.0, 9.0]))
    jac = T.jacfwd(lambda x: weight.value * x, unit_aware=True)(x)
    assert u.get_unit(jac) == u.second
    np.testing.assert_allclose(u.get_mantissa(jac), jnp.diag(jnp.array([0.5, -1.0, 2.0])))
    hess = T.hessian(energy, unit_aware=True)(x)
    assert u.get_unit(hess) == u.second
    np.testing.assert_allclose(u.get_mantissa(hess), 2 * jnp.diag(jnp.array([0.5, -1.0, 2.0])))


# --- debug_nan ---------------------------------------------------------------------------------------------


def test_debug_nan_names_the_first_nan_leaf():
    w, b = State(jnp.ones(2), name="w"), State(jnp.array([-1.0, 1.0]), name="b")

    def fun(x):
        return jnp.sum(w.value * x) + jnp.sum(jnp.sqrt(b.value))

    with pytest.raises(FloatingPointError, match=r"var_grads\['b'\] holds NaN"):
        T.grad(fun, grad_states={"w": w, "b": b}, debug_nan=True)(X[:2])
    with pytest.raises(FloatingPointError, match=r"arg_grads\[1\] holds NaN"):
        T.grad(lambda a, c: jnp.sum(a) + jnp.sum(jnp.sqrt(c)), argnums=(0, 1), debug_nan=True)(X, -X)
    # Without debug_nan the NaN comes back silently, as from jax.grad.
    assert jnp.isnan(T.grad(fun, grad_states=b)(X[:2])).any()
    # A finite gradient passes.
    np.testing.assert_allclose(T.grad(lambda x: jnp.sum(x**2), debug_nan=True)(X), 2 * X)


def test_debug_nan_under_jit_raises_when_run():
    with pytest.raises(Exception, match=r"arg_grads holds NaN"):
        jax.block_until_ready(jax.jit(T.grad(lambda x: jnp.sum(jnp.sqrt(x)), debug_nan=True))(-X))


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize(
    "grad_states,where",
    [
        (jnp.ones(3), r"grad_states is a ArrayImpl"),
        ([State(jnp.ones(3)), jnp.ones(2)], r"grad_states\[1\] is a ArrayImpl"),
        ({"a": State(jnp.ones(3)), "b": None}, r"grad_states\['b'\] is a NoneType"),
    ],
)
def test_non_state_grad_states_is_a_type_error(kind, grad_states, where):
    with pytest.raises(TypeError, match=where + r".*not a sofo\.State.*Wrap the value in sofo\.State"):
        build(kind, lambda x: jnp.sum(x), grad_states=grad_states)


@pytest.mark.parametrize("kind", TRANSFORMS)
def test_bad_argnums(kind):
    with pytest.raises(ValueError, match=r"argnums=-1 holds the negative index -1.*Count positions from 0"):
        build(kind, lambda x: jnp.sum(x), argnums=-1)
    with pytest.raises(ValueError, match=r"negative index -2"):
        build(kind, lambda x: jnp.sum(x), argnums=(0, -2))
    with pytest.raises(TypeError, match=r"argnums must be an int or a tuple of ints"):
        build(kind, lambda x: jnp.sum(x), argnums=True)
    with pytest.raises(ValueError, match="repeats"):
        build(kind, lambda x: jnp.sum(x), argnums=(0, 0))
    with pytest.raises(ValueError, match="selects no argument"):
        build(kind, lambda x: jnp.sum(x), argnums=())
    calls = []
    transformed = build(kind, lambda x, y: calls.append(1) or jnp.sum(x * y), argnums=(0, 2))
    with pytest.raises(ValueError, match=r"argnums=\(0, 2\) selects positional argument 2.*called with 2"):
        transformed(X, X)
    assert calls == []  # raised before any work


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("returned", ["scalar", "triple"])
def test_has_aux_without_a_pair_is_a_type_error(kind, returned):
    w = State(W0)
    seen = State(jnp.zeros(()))

    def fun(x):
        seen.value = seen.value + 1
        out = w.value @ x if kind in ("jacfwd", "sofo_grad") else jnp.sum(w.value @ x)
        return out if returned == "scalar" else (out, 1.0, 2.0)

    with pytest.raises(TypeError, match=r"has_aux=True\) expects fun to return a pair.*set has_aux=False"):
        build(kind, fun, grad_states=w, has_aux=True)(X)
    np.testing.assert_array_equal(seen.value, 0.0)
    assert w.value is W0


def test_other_bad_inputs():
    w = State(W0)
    with pytest.raises(TypeError, match="needs a function"):
        T.grad(3.0)
    with pytest.raises(ValueError, match="appears twice"):
        T.grad(lambda: jnp.sum(w.value), grad_states=[w, w])
    with pytest.raises(ValueError, match="holds no State"):
        T.grad(lambda: jnp.sum(w.value), grad_states=[])
    with pytest.raises(TypeError, match="has_aux must be True or False"):
        T.jacfwd(lambda x: x, has_aux="yes")
    with pytest.raises(TypeError, match="needs loss_fn"):
        T.sofo_grad(lambda x: x, None)
    with pytest.raises(ValueError, match="tangent_size"):
        T.sofo_grad(lambda x: x, sofo_loss, tangent_size=0)
    with pytest.raises(TypeError, match=r"args\[0\] has dtype int.*Cast it"):
        T.sofo_grad(lambda x: x * 1.0, sofo_loss, key=0)(jnp.arange(3))
    with pytest.raises(TypeError, match=r"grad_states\['n'\]\['count'\] has dtype int"):
        n = State({"count": jnp.arange(2)})
        T.sofo_grad(lambda: n.value["count"] * 1.0 + w.value[0, :2], sofo_loss, grad_states={"w": w, "n": n}, key=0)()
    with pytest.raises(TypeError, match="holds a value, not a State"):
        State(w)


@pytest.mark.parametrize("front", ["sofo_grad", "sofo_grad_scan"])
def test_sofo_fronts_pass_tangent_chunks_to_the_engine(front):
    """Chunked and whole tangents give the same direction; the engine is the independent reference."""
    keys = jax.random.split(jax.random.key(5), 4)
    params = {"w": jax.random.normal(keys[0], (3, 4)), "u": jax.random.normal(keys[1], (4, 4)) / 2}
    x = jax.random.normal(keys[2], (6, 5, 3))
    y = jax.random.normal(keys[3], (6, 5, 4))
    step_loss = lambda out, t: 0.5 * jnp.mean(jnp.sum((out - t) ** 2, -1))  # noqa: E731
    kwargs = dict(tangent_size=9, damping=1e-3, key=4)
    if front == "sofo_grad":
        model = lambda p: jnp.tanh(x[0] @ p["w"] @ p["u"])  # noqa: E731
        whole = sofo.sofo_grad(model, lambda o: step_loss(o, y[0]), **kwargs)(params)
        chunked = sofo.sofo_grad(model, lambda o: step_loss(o, y[0]), tangent_chunk_size=2, **kwargs)(params)
        _, reference, _ = sofo.value_and_sofo_grad(lambda p: model(p), lambda o: step_loss(o, y[0]),
                                                   tangent_size=9, damping=1e-3)(4, params)
    else:
        cell = lambda p, z, xt: (jnp.tanh(xt @ p["w"] + z @ p["u"]),) * 2  # noqa: E731
        z0 = jnp.zeros((5, 4))
        whole = T.sofo_grad_scan(cell, step_loss, **kwargs)(params, z0, x, y)
        chunked = T.sofo_grad_scan(cell, step_loss, tangent_chunk_size=2, **kwargs)(params, z0, x, y)
        _, reference, _ = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=9, damping=1e-3)(
            4, params, z0, x, y
        )
    for a, b, r in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole),
                       jax.tree_util.tree_leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(b, r, rtol=1e-12, atol=1e-14)
