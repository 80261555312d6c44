"""The benchmark problems: data generated in code (or shipped by scikit-learn), models, losses.

Every problem is either feed-forward (`fun(params) -> outputs`, `loss_fn(outputs) -> scalar`) or
recurrent (`cell(params, z, x) -> (z_new, y)` run over time-major `xs`, with `step_loss(y_t, ys_t)`
summed over time). The losses are written in the exact forms of the engine's curvature shortcuts
(`mse`: 0.5 * mean over the batch of the summed squared error; `ce`: mean softmax cross-entropy), so
SOFO's curvature sketch is the exact Gauss-Newton matrix of the objective, restricted to the tangents.

Sizes come in two flavours: `quick=True` (seconds on a 2-core CPU) and `quick=False` (a GPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One optimisation problem and the settings the suite runs it with.

    Attributes:
      name, title: short key (used on the command line) and a readable title.
      params: the initial parameters (a pytree of float32 arrays).
      curvature: the engine's `loss=` form that is exact for this objective ("mse" or "ce").
      fun, loss_fn: the feed-forward model and loss (None for recurrent problems).
      cell, step_loss, z0, xs, ys: the recurrent model (None for feed-forward problems).
      iterations: optimisation steps per run.
      tangent_sizes: SOFO's K values (the first one is the headline).
      damping: SOFO's (and the exact Gauss-Newton step's) relative damping.
      sampler: SOFO's tangent sampler ("orthonormal" or "normal", see `sofo.value_and_sofo_grad`).
      learning_rates: the grid searched per optimizer.
      gauss_newton: whether to run the dense damped Gauss-Newton step (only done up to a few thousand
        parameters, see `optimizers.GAUSS_NEWTON_MAX_PARAMS`).
      reference: an optional (label, loss) line drawn on the plots (an optimum or a baseline).
      metrics: optional `metrics(params) -> dict` reported for the best run (e.g. test accuracy).
      notes: one sentence on what is learnt.
    """

    name: str
    title: str
    params: Any
    curvature: str
    iterations: int
    tangent_sizes: tuple[int, ...]
    damping: float
    learning_rates: dict[str, tuple[float, ...]]
    sampler: str = "normal"
    fun: Callable | None = None
    loss_fn: Callable | None = None
    cell: Callable | None = None
    step_loss: Callable | None = None
    z0: Any = None
    xs: Any = None
    ys: Any = None
    gauss_newton: bool = False
    reference: tuple[str, float] | None = None
    metrics: Callable[[Any], dict] | None = None
    notes: str = ""

    @property
    def recurrent(self) -> bool:
        return self.cell is not None

    @property
    def size(self) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(self.params))

    def outputs(self, params):
        """The model's outputs: for recurrent problems the time-major stack of every y_t."""
        if not self.recurrent:
            return self.fun(params)
        _, ys = jax.lax.scan(lambda z, x: self.cell(params, z, x), self.z0, self.xs)
        return ys

    def output_loss(self, outputs):
        """The objective as a function of `outputs(params)`."""
        if not self.recurrent:
            return self.loss_fn(outputs)
        return jnp.sum(jax.vmap(self.step_loss)(outputs, self.ys))

    def objective(self, params):
        """The loss that every optimizer minimises (for recurrent problems: summed over time)."""
        return self.output_loss(self.outputs(params))


# --- losses in the engine's exact forms ---------------------------------------------------------------


def mse(y, target):
    """0.5 * mean over the leading (batch) axis of the squared error summed over the rest."""
    return 0.5 * jnp.sum((y - target) ** 2) / y.shape[0]


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


# --- a vanilla (leaky, rate) RNN -----------------------------------------------------------------------


def rnn_init(key, hidden, inputs, outputs, gain=0.9):
    """W ~ gain * N(0, 1/N) (stable at init); input and readout weights 1/sqrt(fan-in)."""
    kw, ku, kc = jax.random.split(key, 3)
    params = {
        "W": gain * jax.random.normal(kw, (hidden, hidden), jnp.float32) / np.sqrt(hidden),
        "U": jax.random.normal(ku, (hidden, inputs), jnp.float32) / np.sqrt(inputs),
        "b": jnp.zeros((hidden,), jnp.float32),
        "C": jax.random.normal(kc, (outputs, hidden), jnp.float32) / np.sqrt(hidden),
        "d": jnp.zeros((outputs,), jnp.float32),
    }
    # float32 whatever jax_enable_x64 says (a numpy float64 scalar would promote under x64).
    return {name: value.astype(jnp.float32) for name, value in params.items()}


def rnn_cell(alpha):
    """z' = (1 - alpha) z + alpha (W tanh(z) + U x + b),  y = C tanh(z') + d, on a batch z (B, N)."""

    def cell(params, z, x):
        z_new = (1 - alpha) * z + alpha * (jnp.tanh(z) @ params["W"].T + x @ params["U"].T + params["b"])
        return z_new, jnp.tanh(z_new) @ params["C"].T + params["d"]

    return cell


def _grid(quick, quick_values, full_values):
    return quick_values if quick else full_values


# --- 1. ill-conditioned linear regression --------------------------------------------------------------


def _sizes(quick, quick_sizes, full_sizes, overrides):
    sizes = dict(quick_sizes if quick else full_sizes)
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise TypeError(f"unknown size overrides {sorted(unknown)}; this task takes {sorted(sizes)}.")
    sizes.update(overrides)
    return sizes


def linear_regression(seed=0, quick=True, **overrides):
    """y = X W* with a rotated design whose Hessian X^T X / B has condition number 1e4 (eigenvalues
    log-spaced from 1 to 1e-4); the optimum is 0."""
    s = _sizes(quick, dict(inputs=32, outputs=4, batch=128, iterations=200, tangent_sizes=(32, 64)),
               dict(inputs=256, outputs=8, batch=1024, iterations=1000, tangent_sizes=(16, 64, 256)), overrides)
    inputs, outputs, batch = s["inputs"], s["outputs"], s["batch"]
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((batch, inputs)))
    right, _ = np.linalg.qr(rng.standard_normal((inputs, inputs)))
    singular = np.sqrt(batch) * np.logspace(0, -2, inputs)  # Hessian eigenvalues s^2 / B: 1 ... 1e-4
    x = jnp.asarray(left @ np.diag(singular) @ right.T, jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((inputs, outputs)), jnp.float32)
    targets = x @ w_true
    params = {"w": jnp.zeros((inputs, outputs), jnp.float32)}
    return Problem(
        name="linreg",
        title=f"Ill-conditioned linear regression (kappa=1e4, n={inputs * outputs})",
        params=params,
        curvature="mse",
        fun=lambda p: x @ p["w"],
        loss_fn=lambda y: mse(y, targets),
        iterations=s["iterations"],
        tangent_sizes=tuple(s["tangent_sizes"]),
        damping=1e-4,
        learning_rates={
            "sofo": _grid(quick, (1.0,), (0.5, 1.0)),
            "fgd": _grid(quick, (0.3, 1.0, 3.0), (0.1, 0.3, 1.0, 3.0)),
            "adam": _grid(quick, (0.3, 1.0, 3.0), (0.03, 0.1, 0.3, 1.0, 3.0)),
            "sgd": _grid(quick, (0.3, 1.0, 3.0), (0.1, 0.3, 1.0, 3.0)),
            "gn": (1.0,),
            "sofo_lm": (1.0,),  # sofo.sofo: the recommended learning rate, never tuned
        },
        gauss_newton=True,
        reference=("optimum", 0.0),
        notes="rotated design, Hessian eigenvalues log-spaced over 4 decades",
    )


# --- 2. Lorenz attractor --------------------------------------------------------------------------------


def lorenz_trajectories(count, steps, seed=0, dt=0.01, substeps=2, burn_in=2000):
    """`count` Lorenz-63 trajectories (sigma 10, rho 28, beta 8/3) of `steps` samples, RK4 in float64.

    Initial conditions are points on the attractor (after a burn-in); samples are `substeps * dt` apart.
    Returns (steps, count, 3), standardised per coordinate with the attractor's statistics.
    """

    def field(s):
        x, y, z = s[..., 0], s[..., 1], s[..., 2]
        return np.stack([10.0 * (y - x), x * (28.0 - z) - y, x * y - (8.0 / 3.0) * z], axis=-1)

    def rk4(s):
        k1 = field(s)
        k2 = field(s + 0.5 * dt * k1)
        k3 = field(s + 0.5 * dt * k2)
        k4 = field(s + dt * k3)
        return s + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)

    rng = np.random.default_rng(seed)
    state = rng.standard_normal((count, 3)) * 5 + np.array([0.0, 0.0, 25.0])
    for _ in range(burn_in + int(rng.integers(0, 500))):
        state = rk4(state)
    # Spread the starting points along the attractor: each trajectory runs on for its own extra time.
    offsets = rng.integers(0, 1000, size=count)
    for i in range(int(offsets.max())):
        moving = offsets > i
        state[moving] = rk4(state[moving])
    samples = []
    for _ in range(steps):
        samples.append(state.copy())
        for _ in range(substeps):
            state = rk4(state)
    traj = np.stack(samples)
    mean = np.array([0.0, 0.0, 23.5])
    std = np.array([7.9, 9.0, 8.6])
    return (traj - mean) / std


def lorenz(seed=0, quick=True, **overrides):
    """A vanilla RNN generates Lorenz trajectories: it sees the true state for the first `cue` steps,
    then runs autonomously and must predict the next state at every step."""
    s = _sizes(quick, dict(hidden=128, batch=32, steps=50, cue=5, iterations=150, tangent_sizes=(32,)),
               dict(hidden=128, batch=128, steps=200, cue=10, iterations=1000, tangent_sizes=(32, 128, 512)),
               overrides)
    hidden, batch, steps, cue = s["hidden"], s["batch"], s["steps"], s["cue"]
    traj = lorenz_trajectories(batch, steps + 1, seed=seed)
    visible = (np.arange(steps) < cue)[:, None, None]
    xs = jnp.asarray(traj[:-1] * visible, jnp.float32)
    ys = jnp.asarray(traj[1:], jnp.float32)
    params = rnn_init(jax.random.key(seed), hidden, 3, 3)
    return Problem(
        name="lorenz",
        title=f"Lorenz attractor, vanilla RNN (N={hidden}, T={steps})",
        params=params,
        curvature="mse",
        cell=rnn_cell(0.2),
        step_loss=mse,
        z0=jnp.zeros((batch, hidden), jnp.float32),
        xs=xs,
        ys=ys,
        iterations=s["iterations"],
        tangent_sizes=tuple(s["tangent_sizes"]),
        damping=1e-3,
        learning_rates={
            "sofo": _grid(quick, (1.0,), (0.5, 1.0)),
            "fgd": _grid(quick, (3e-4,), (3e-5, 1e-4, 3e-4, 1e-3)),
            "adam": _grid(quick, (0.001, 0.003, 0.01, 0.03), (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)),
            "sgd": _grid(quick, (3e-4, 1e-3, 3e-3), (1e-4, 3e-4, 1e-3, 3e-3)),
            "gn": (1.0,),
            "sofo_lm": (1.0,),  # sofo.sofo: the recommended learning rate, never tuned
        },
        gauss_newton=True,
        notes=f"cue of {cue} steps, then autonomous generation; targets standardised",
    )


# --- 3. 3-bit flip-flop ---------------------------------------------------------------------------------


def flipflop_data(count, steps, bits=3, rate=0.05, seed=0):
    """Inputs: on each channel, +-1 pulses at random times (probability `rate` per step). Targets: each
    channel holds the sign of its last pulse (0 before the first one). Time-major (steps, count, bits)."""
    rng = np.random.default_rng(seed)
    pulses = (rng.random((steps, count, bits)) < rate) * rng.choice([-1.0, 1.0], size=(steps, count, bits))
    targets = np.zeros_like(pulses)
    held = np.zeros((count, bits))
    for t in range(steps):
        held = np.where(pulses[t] != 0, pulses[t], held)
        targets[t] = held
    return pulses.astype(np.float32), targets.astype(np.float32)


def flipflop(seed=0, quick=True, **overrides):
    s = _sizes(quick, dict(hidden=64, batch=32, steps=100, iterations=150, tangent_sizes=(32,)),
               dict(hidden=128, batch=128, steps=500, iterations=1000, tangent_sizes=(32, 128, 512)), overrides)
    hidden, batch, steps = s["hidden"], s["batch"], s["steps"]
    xs, ys = flipflop_data(batch, steps, seed=seed)
    params = rnn_init(jax.random.key(seed + 1), hidden, 3, 3)
    return Problem(
        name="flipflop",
        title=f"3-bit flip-flop, vanilla RNN (N={hidden}, T={steps})",
        params=params,
        curvature="mse",
        cell=rnn_cell(0.5),
        step_loss=mse,
        z0=jnp.zeros((batch, hidden), jnp.float32),
        xs=jnp.asarray(xs),
        ys=jnp.asarray(ys),
        iterations=s["iterations"],
        tangent_sizes=tuple(s["tangent_sizes"]),
        damping=1e-2,
        learning_rates={
            "sofo": _grid(quick, (1.0,), (0.5, 1.0)),
            "fgd": _grid(quick, (1e-4,), (3e-5, 1e-4, 3e-4, 1e-3)),
            "adam": _grid(quick, (0.001, 0.003, 0.01, 0.03), (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)),
            "sgd": _grid(quick, (1e-4, 3e-4, 1e-3), (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
            "gn": (1.0,),
            "sofo_lm": (1.0,),  # sofo.sofo: the recommended learning rate, never tuned
        },
        notes="3 channels of sparse +-1 pulses (p=0.05 per step); outputs hold the last sign",
    )


# --- 4. long horizon: adaptive Kalman filter ------------------------------------------------------------


def kalman_data(count, steps, seed=0, a=0.98, hazard=0.01, noise_levels=(0.3, 2.0)):
    """A latent AR(1) process x' = a x + w (stationary variance 1) seen through noise whose level switches
    unannounced between `noise_levels` (hazard rate `hazard` per step).

    Returns time-major observations (steps, count, 1), latents (steps, count, 1), and the mean squared
    errors of two Kalman filters run on the same data: one told the current noise level (an oracle, a
    lower bound for any filter) and one with a fixed gain tuned to the average noise variance.
    """
    rng = np.random.default_rng(seed)
    process_var = 1 - a**2
    x = rng.standard_normal(count)
    level = rng.integers(0, 2, size=count)
    levels = np.asarray(noise_levels)
    obs, lat, noise = [], [], []
    for _ in range(steps):
        switch = rng.random(count) < hazard
        level = np.where(switch, 1 - level, level)
        sigma = levels[level]
        obs.append(x + sigma * rng.standard_normal(count))
        lat.append(x.copy())
        noise.append(sigma**2)
        x = a * x + np.sqrt(process_var) * rng.standard_normal(count)
    obs, lat, noise = np.stack(obs), np.stack(lat), np.stack(noise)

    def kalman(noise_var):
        mean, var, errors = np.zeros(count), np.ones(count), []
        for t in range(steps):
            gain = var / (var + noise_var[t])
            mean = mean + gain * (obs[t] - mean)
            var = (1 - gain) * var
            errors.append((mean - lat[t]) ** 2)
            mean, var = a * mean, a**2 * var + process_var
        return float(np.mean(errors))

    oracle = kalman(noise)
    fixed = kalman(np.full_like(noise, np.mean(levels**2)))
    return obs[..., None].astype(np.float32), lat[..., None].astype(np.float32), oracle, fixed


def kalman(seed=0, quick=True, **overrides):
    """An RNN must filter a latent from observations whose noise level switches without notice: the
    optimal gain depends on a noise level that has to be inferred from the last tens of steps."""
    s = _sizes(quick, dict(hidden=32, batch=32, steps=500, iterations=100, tangent_sizes=(32,)),
               dict(hidden=128, batch=128, steps=2000, iterations=1000, tangent_sizes=(32, 128, 512)), overrides)
    hidden, batch, steps = s["hidden"], s["batch"], s["steps"]
    obs, lat, oracle, fixed = kalman_data(batch, steps, seed=seed)
    params = rnn_init(jax.random.key(seed + 2), hidden, 1, 1)
    # Reference: the oracle Kalman filter's error in the objective's units (0.5 * mean_B, summed over T).
    oracle_loss = 0.5 * oracle * steps
    return Problem(
        name="kalman",
        title=f"Adaptive Kalman filter, vanilla RNN (N={hidden}, T={steps})",
        params=params,
        curvature="mse",
        cell=rnn_cell(0.5),
        step_loss=mse,
        z0=jnp.zeros((batch, hidden), jnp.float32),
        xs=jnp.asarray(obs),
        ys=jnp.asarray(lat),
        iterations=s["iterations"],
        tangent_sizes=tuple(s["tangent_sizes"]),
        damping=1e-3,
        learning_rates={
            "sofo": _grid(quick, (1.0,), (0.5, 1.0)),
            "fgd": _grid(quick, (3e-5,), (1e-5, 3e-5, 1e-4, 3e-4)),
            "adam": _grid(quick, (0.001, 0.003, 0.01, 0.03), (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)),
            "sgd": _grid(quick, (1e-4, 3e-4, 1e-3), (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)),
            "gn": (1.0,),
            "sofo_lm": (1.0,),  # sofo.sofo: the recommended learning rate, never tuned
        },
        reference=("oracle Kalman filter", oracle_loss),
        notes=(
            f"per-step MSE: oracle Kalman filter {oracle:.3f}, fixed-gain Kalman filter {fixed:.3f}, "
            f"predicting 0: 1.0"
        ),
    )


# --- 5. digits classification ---------------------------------------------------------------------------


def digits(seed=0, quick=True, **overrides):
    """sklearn's 8x8 digits (1797 images, shipped with scikit-learn), an MLP, full-batch cross-entropy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train = jnp.asarray((x_train - mean) / std, jnp.float32)
    x_test = jnp.asarray((x_test - mean) / std, jnp.float32)
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
    s = _sizes(quick, dict(hidden=32, iterations=100, tangent_sizes=(64,)),
               dict(hidden=256, iterations=1000, tangent_sizes=(32, 128, 512)), overrides)
    hidden = s["hidden"]
    k1, k2 = jax.random.split(jax.random.key(seed + 3))
    params = {
        "w1": jax.random.normal(k1, (64, hidden), jnp.float32) / 8.0,
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jax.random.normal(k2, (hidden, 10), jnp.float32) / np.sqrt(hidden),
        "b2": jnp.zeros((10,), jnp.float32),
    }

    def mlp(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def metrics(p):
        accuracy = jnp.mean(jnp.argmax(mlp(p, x_test), -1) == y_test)
        return {"test accuracy": float(accuracy)}

    return Problem(
        name="digits",
        title=f"Digits (sklearn), MLP 64-{hidden}-10, cross-entropy",
        params=params,
        curvature="ce",
        fun=lambda p: mlp(p, x_train),
        loss_fn=lambda logits: cross_entropy(logits, y_train),
        iterations=s["iterations"],
        tangent_sizes=tuple(s["tangent_sizes"]),
        damping=1e-3,
        learning_rates={
            "sofo": _grid(quick, (1.0,), (0.5, 1.0)),
            "fgd": _grid(quick, (1.0, 3.0), (0.1, 0.3, 1.0, 3.0)),
            "adam": _grid(quick, (0.03, 0.1, 0.3), (0.003, 0.01, 0.03, 0.1, 0.3)),
            "sgd": _grid(quick, (1.0, 3.0, 10.0), (0.1, 0.3, 1.0, 3.0, 10.0)),
            "gn": (1.0,),
            "sofo_lm": (1.0,),  # sofo.sofo: the recommended learning rate, never tuned
        },
        metrics=metrics,
        notes=f"{len(y_train)} training / {len(y_test)} test images, full batch",
    )


TASKS: dict[str, Callable[..., Problem]] = {
    "linreg": linear_regression,
    "lorenz": lorenz,
    "flipflop": flipflop,
    "kalman": kalman,
    "digits": digits,
}
