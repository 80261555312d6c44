"""Writes the notebooks in this folder from the cell sources below, without outputs.

    python notebooks/build_notebooks.py

Edit the cells here and regenerate rather than editing the .ipynb files by hand, so that the stored
notebooks stay output-free and reviewable. `tests/test_notebooks.py` executes every notebook.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


SETUP = '''
import os

# On a small CPU, LAPACK's threads (jax's CPU eigh) fight XLA's own: keep one (set before jax/numpy load).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sofo

BACKEND = jax.default_backend()  # "cpu", "gpu" or "tpu"
ACCELERATOR = BACKEND in ("gpu", "tpu")
print(f"jax {jax.__version__}, sofo {sofo.__version__}, backend {BACKEND.upper()}: {jax.devices()}")
'''

TUTORIAL = [
    md(
        """
# SOFO tutorial: the engine, an optax loop, a recurrent network

SOFO (Yu, Xia, Ma, Lengyel & Hennequin, NeurIPS 2024) takes a damped Gauss-Newton step inside a random
K-dimensional subspace of parameter space, using forward-mode derivatives only:

1. draw K tangents v_1 ... v_K;
2. push them through the model in one batched `jvp`: the output tangents JV;
3. the K directional derivatives of the loss, Vᵀ∇L, and the K x K curvature (JV)ᵀ H_L (JV);
4. solve the damped K x K system and map back: h = V (G̃ + λ I)⁻¹ Vᵀ∇L. Then params ← params − lr · h.

No backward pass is needed, so a recurrent network can be trained with memory constant in the number
of time steps. This notebook runs in seconds on a CPU and uses larger sizes on a GPU or TPU.
"""
    ),
    code(SETUP),
    code(
        """
# Sizes: seconds on a CPU, larger on an accelerator.
HIDDEN = 256 if ACCELERATOR else 32     # MLP width and RNN size
TANGENTS = 128 if ACCELERATOR else 32   # K
STEPS = 300 if ACCELERATOR else 40      # optimisation steps per loop
TIME = 1000 if ACCELERATOR else 100     # RNN time steps
"""
    ),
    md(
        """
## 1. The engine: `sofo.value_and_sofo_grad`

`sofo.value_and_sofo_grad(fun, loss_fn, ...)` returns a pure function `f(key, params) -> (value,
direction, info)`. The default curvature, `"exact"`, uses the Hessian of `loss_fn` itself, so any loss
works; here the loss is `0.5 * mean over the batch of the summed squared error`, the form the fast path
`curvature="mse"` assumes (it is checked against `loss_fn` every step; `"ce"` is the softmax
cross-entropy one).
"""
    ),
    code(
        """
kx, k1, k2 = jax.random.split(jax.random.key(0), 3)
x = jax.random.uniform(kx, (256, 1), minval=-3.0, maxval=3.0)
y = jnp.sin(2.0 * x) + 0.1 * x**2
params = {
    "w1": jax.random.normal(k1, (1, HIDDEN)),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, 1)) / jnp.sqrt(HIDDEN),
    "b2": jnp.zeros(1),
}


def fun(p):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss_fn(out):
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


sofo_step = jax.jit(sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=TANGENTS, damping=1e-3, curvature="mse"))
value, direction, info = sofo_step(jax.random.key(1), params)
print("loss", float(value))
print("direction has the parameters' structure:", jax.tree.map(jnp.shape, direction))
print("top curvature eigenvalue", float(info.top_eigenvalue))
print("K directional derivatives", info.directional_derivatives.shape, "K x K curvature", info.curvature.shape)
"""
    ),
    md(
        """
With K = n orthonormal tangents the subspace is the whole space, and SOFO's direction is the exact
damped Gauss-Newton step (G + λ max_eig(G) I)⁻¹ ∇L. A dense check with `jax.jacfwd`:
"""
    ),
    code(
        """
from jax.flatten_util import ravel_pytree

flat, unravel = ravel_pytree(params)
n = flat.size
jacobian = jax.jacfwd(lambda t: fun(unravel(t)).ravel())(flat)  # (outputs, n)
ggn = jacobian.T @ jacobian / x.shape[0]                        # J^T H_L J with H_L = I / B
grad = jax.grad(lambda t: loss_fn(fun(unravel(t))))(flat)
damping = 1e-3
dense = jnp.linalg.solve(ggn + damping * jnp.linalg.eigvalsh(ggn)[-1] * jnp.eye(n), grad)

full = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=n, damping=damping, sampler="orthonormal")
_, h, _ = jax.jit(full)(jax.random.key(2), params)
error = float(jnp.linalg.norm(ravel_pytree(h)[0] - dense) / jnp.linalg.norm(dense))
print(f"n = {n} parameters; relative difference to the dense Gauss-Newton step: {error:.1e}")
assert error < 5e-2
"""
    ),
    md("A hand-written loop: a fresh key (fresh tangents) every step, `params - lr * direction`."),
    code(
        """
p = params
losses_loop = []
for i in range(STEPS):
    value, direction, _ = sofo_step(jax.random.key(100 + i), p)
    p = jax.tree.map(lambda a, d: a - 1.0 * d, p, direction)
    losses_loop.append(float(value))
print(f"loss {losses_loop[0]:.4f} -> {float(loss_fn(fun(p))):.2e} in {STEPS} SOFO steps (K={TANGENTS}, n={n})")
"""
    ),
    md(
        """
## 2. The optax front: `optax.chain(sofo.scale_by_sofo(...), optax.sgd(lr))`

`sofo.scale_by_sofo` keeps the PRNG key in its state (fresh tangents each step) and the last loss value. Its
`update` takes the model and the loss as keyword arguments; the incoming updates are ignored (`None`).
Any optax transform can follow it (momentum, schedules, clipping). Here it is side by side with Adam.
"""
    ),
    code(
        """
sofo_opt = optax.chain(sofo.scale_by_sofo(tangent_size=TANGENTS, damping=1e-3, curvature="mse", key=0), optax.sgd(1.0))


@jax.jit
def sofo_train_step(p, state):
    updates, state = sofo_opt.update(None, state, p, fun=fun, loss_fn=loss_fn)
    return optax.apply_updates(p, updates), state  # state[0] is the SofoState: key, count, value, ...


@jax.jit
def adam_train_step(p, state, lr):  # lr is traced: one compilation serves the whole grid
    value, grads = jax.value_and_grad(lambda q: loss_fn(fun(q)))(p)
    updates, state = optax.adam(lr).update(grads, state, p)
    return optax.apply_updates(p, updates), state, value


p, state, sofo_losses = params, sofo_opt.init(params), []
for _ in range(STEPS):
    p, state = sofo_train_step(p, state)
    sofo_losses.append(float(state[0].value))  # the loss before this step

adam_losses = {}
for lr in (1e-3, 3e-3, 1e-2, 3e-2):
    p, state, adam_losses[lr] = params, optax.adam(lr).init(params), []
    for _ in range(STEPS):
        p, state, value = adam_train_step(p, state, lr)
        adam_losses[lr].append(float(value))
best_lr = min(adam_losses, key=lambda lr: np.nan_to_num(adam_losses[lr][-1], nan=np.inf))
print(f"after {STEPS} steps: SOFO {sofo_losses[-1]:.2e}, best Adam (lr {best_lr:g}) {adam_losses[best_lr][-1]:.2e}")

plt.figure(figsize=(5, 3.2))
plt.semilogy(sofo_losses, label=f"SOFO K={TANGENTS}")
plt.semilogy(adam_losses[best_lr], "--", label=f"Adam lr={best_lr:g}")
plt.xlabel("step"); plt.ylabel("loss"); plt.legend(); plt.tight_layout(); plt.show()
"""
    ),
    md(
        """
Classification uses `curvature="ce"` (softmax cross-entropy over the last axis). With minibatches, build
`fun` and `loss_fn` inside the jitted step as closures over the batch:
"""
    ),
    code(
        """
from sklearn.datasets import load_digits

digits = load_digits()
images = jnp.asarray((digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-6), jnp.float32)
labels = jnp.asarray(digits.target)
k1, k2 = jax.random.split(jax.random.key(3))
mlp = {"w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0, "b1": jnp.zeros(HIDDEN),
       "w2": jax.random.normal(k2, (HIDDEN, 10)) / jnp.sqrt(HIDDEN), "b2": jnp.zeros(10)}


def logits_of(p, xb):
    return jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def cross_entropy(logits, yb):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1))


classifier = optax.chain(sofo.scale_by_sofo(tangent_size=TANGENTS, damping=1e-3, curvature="ce", key=1), optax.sgd(1.0))


@jax.jit
def classifier_step(p, state, xb, yb):
    updates, state = classifier.update(
        None, state, p, fun=lambda q: logits_of(q, xb), loss_fn=lambda logits: cross_entropy(logits, yb)
    )
    return optax.apply_updates(p, updates), state


state, p, batch = classifier.init(mlp), mlp, 256
order = np.random.default_rng(0).permutation(len(labels))
for i in range(STEPS):
    idx = order[(i * batch) % (len(labels) - batch):][:batch]
    p, state = classifier_step(p, state, images[idx], labels[idx])
accuracy = float(jnp.mean(jnp.argmax(logits_of(p, images), -1) == labels))
print(f"digits: last minibatch loss {float(state[0].value):.3f}, accuracy on all 1797 images {accuracy:.3f}")
"""
    ),
    md(
        """
## 3. Recurrent networks: `sofo.value_and_sofo_grad_scan`

For `cell(params, z, x) -> (z_new, y)` run over time-major inputs, the scan engine carries the K
tangents of the latent state through `lax.scan` and accumulates the directional derivatives and the
K x K curvature step by step. Nothing is stored per time step, so memory does not grow with T. The loss
is `sum_t loss_fn(y_t, ys[t])`.

The task: a vanilla RNN must produce a sine wave whose frequency is given as a constant input.
"""
    ),
    code(
        """
BATCH = 16


def rnn_params(key, hidden):
    kw, ku, kc = jax.random.split(key, 3)
    return {"W": 0.9 * jax.random.normal(kw, (hidden, hidden)) / jnp.sqrt(hidden),
            "U": jax.random.normal(ku, (hidden, 1)), "b": jnp.zeros(hidden),
            "C": jax.random.normal(kc, (1, hidden)) / jnp.sqrt(hidden)}


def cell(p, z, x):
    z_new = 0.8 * z + 0.2 * jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])
    return z_new, z_new @ p["C"].T


def step_loss(y_t, target_t):  # 0.5 * mean over the batch: the 'mse' form, per time step
    return 0.5 * jnp.sum((y_t - target_t) ** 2) / y_t.shape[0]


def sine_task(time_steps, batch=BATCH, seed=0):
    freq = jax.random.uniform(jax.random.key(seed), (batch, 1), minval=0.02, maxval=0.1)
    t = jnp.arange(time_steps, dtype=jnp.float32)[:, None, None]
    xs = jnp.broadcast_to(10.0 * freq, (time_steps, batch, 1))      # time-major inputs
    ys = jnp.sin(2 * jnp.pi * freq * t)                              # time-major targets
    return jnp.zeros((batch, HIDDEN)), xs, ys


rnn = rnn_params(jax.random.key(4), HIDDEN)
z0, xs, ys = sine_task(TIME)
scan_step = jax.jit(sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=TANGENTS, damping=1e-3))
value, direction, info = scan_step(jax.random.key(5), rnn, z0, xs, ys)
print(f"T={TIME}: loss {float(value):.3f}, top curvature eigenvalue {float(info.top_eigenvalue):.3g}")
"""
    ),
    md(
        """
With the same key, `sofo.value_and_sofo_grad` on the unrolled rollout (all T outputs, batch-major, the
summed loss) draws the same tangents and returns the same direction; it just keeps the K output
tangents of every time step, so its memory grows with T.
"""
    ),
    md(
        """
Training with the optax front: pass `cell=`, `loss_fn=`, `z0=`, `xs=`, `ys=` instead of `fun=`. Adam
trains the same network by backpropagation through time for comparison.
"""
    ),
    code(
        """
rnn_opt = optax.chain(sofo.scale_by_sofo(tangent_size=TANGENTS, damping=1e-3, key=2), optax.sgd(1.0))


@jax.jit
def rnn_sofo_step(p, state):
    updates, state = rnn_opt.update(None, state, p, cell=cell, loss_fn=step_loss, z0=z0, xs=xs, ys=ys)
    return optax.apply_updates(p, updates), state


def bptt_loss(p):
    _, outs = jax.lax.scan(lambda z, x: cell(p, z, x), z0, xs)
    return jnp.sum(jax.vmap(step_loss)(outs, ys))


@jax.jit
def rnn_adam_step(p, state, lr):
    value, grads = jax.value_and_grad(bptt_loss)(p)
    updates, state = optax.adam(lr).update(grads, state, p)
    return optax.apply_updates(p, updates), state, value


def run_adam(lr):
    p, state, losses = rnn, optax.adam(lr).init(rnn), []
    for _ in range(STEPS):
        p, state, value = rnn_adam_step(p, state, lr)
        losses.append(float(value))
    return losses


p, state, rnn_sofo_losses = rnn, rnn_opt.init(rnn), []
for _ in range(STEPS):
    p, state = rnn_sofo_step(p, state)
    rnn_sofo_losses.append(float(state[0].value))
adam_runs = {lr: run_adam(lr) for lr in (3e-3, 1e-2, 3e-2)}
lr_best = min(adam_runs, key=lambda lr: np.nan_to_num(adam_runs[lr][-1], nan=np.inf))
print(f"after {STEPS} steps: SOFO {rnn_sofo_losses[-1]:.3f}, best Adam/BPTT (lr {lr_best:g}) {adam_runs[lr_best][-1]:.3f}")

plt.figure(figsize=(5, 3.2))
plt.semilogy(rnn_sofo_losses, label=f"SOFO K={TANGENTS} (scan)")
plt.semilogy(adam_runs[lr_best], "--", label=f"Adam/BPTT lr={lr_best:g}")
plt.xlabel("step"); plt.ylabel(f"loss (summed over T={TIME})"); plt.legend(); plt.tight_layout(); plt.show()
"""
    ),
    md(
        """
Memory: XLA's compiled memory analysis gives the temporary memory of one step. The scan engine's does
not grow with T; backpropagation through time stores every step's activations. (`python -m
benchmarks.memory` measures this properly.)
"""
    ),
    code(
        """
def temp_bytes(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes


for T in (TIME, 4 * TIME):
    z0_T, xs_T, ys_T = sine_task(T)
    sofo_bytes = temp_bytes(sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=TANGENTS),
                            jax.random.key(0), rnn, z0_T, xs_T, ys_T)

    def bptt_T(p):
        _, outs = jax.lax.scan(lambda z, x: cell(p, z, x), z0_T, xs_T)
        return jnp.sum(jax.vmap(step_loss)(outs, ys_T))

    bptt_bytes = temp_bytes(jax.value_and_grad(bptt_T), rnn)
    if sofo_bytes is None or bptt_bytes is None:
        print("this backend does not report compiled memory")
        break
    print(f"T={T:5d}: SOFO scan temp {sofo_bytes / 1e6:7.2f} MB   BPTT temp {bptt_bytes / 1e6:7.2f} MB")
"""
    ),
    md(
        """
## Where next

* `python -m benchmarks --quick` compares plain SOFO and `sofo.sofo` with tuned Adam (BPTT) and forward
  gradient descent on three RNN tasks over several seeds; `benchmarks.ipynb` runs the same job here.
* `sofo.sofo(tangent_size=K)` is the configuration to start from: learning rate 1, damping adapted every
  step (Levenberg-Marquardt) and up to four remembered directions, with no per-task tuning. `tangent_size` trades
  cost per step for progress per step.
"""
    ),
]


BENCHMARKS = [
    md(
        """
# SOFO benchmarks

The main job of `python -m benchmarks`, in a notebook: on recurrent networks (the 3-bit flip-flop, a
Lorenz attractor generator and an adaptive Kalman filter over a long horizon), several seeds each, it
compares Adam (backprop through time, learning rate tuned on a grid), plain SOFO (the paper's algorithm:
fixed learning rate and damping), `sofo.sofo` (the recommended configuration: adaptive damping and
subspace memory, never tuned) and forward gradient descent (FGD: the same tangents, no curvature).

On a GPU or TPU this notebook runs the full sizes. On a CPU it runs a **smoke test** (one tiny task, a few
iterations) that only shows the pipeline: its numbers are not evidence either way. The CPU evidence is
`python -m benchmarks --quick` and its tables in BENCHMARKS.md.
"""
    ),
    code(
        SETUP
        + '''
import sys

from IPython.display import Image, Markdown, display

# The benchmarks package lives at the repository root (this notebook sits in notebooks/).
ROOT = os.path.abspath("..")
if os.path.isdir(os.path.join(ROOT, "benchmarks")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks import report, seeds
from benchmarks.cli import DEFAULT_TASKS, machine_description

OUT = os.environ.get("SOFO_NOTEBOOK_OUT", os.path.join(ROOT, "results", "notebook"))
os.makedirs(OUT, exist_ok=True)
print(machine_description())
'''
    ),
    code(
        """
if ACCELERATOR:
    QUICK, TASKS, SEEDS, SIZES = False, list(DEFAULT_TASKS), [0, 1, 2, 3, 4], {}  # as `python -m benchmarks`
else:
    # A CPU smoke test: one tiny task. `python -m benchmarks --quick` is the real CPU run.
    QUICK, TASKS, SEEDS = True, ["flipflop"], [0, 1]
    SIZES = {"flipflop": dict(hidden=16, batch=8, steps=30, iterations=20, tangent_sizes=(16,))}
METHODS = ["adam", "sofo", "sofo_lm", "fgd"]
"""
    ),
    code(
        """
results, comparisons = {}, []
for name in TASKS:
    start = time.perf_counter()
    problems, methods = seeds.run_task_seeds(name, quick=QUICK, seeds=SEEDS, kinds=METHODS,
                                             sizes=SIZES.get(name))
    results[name] = (problems[0], methods)
    comparisons += seeds.compare_seeds(methods)
    display(Markdown(f"### {problems[0].title}\\n\\n{len(SEEDS)} seeds ({time.perf_counter() - start:.0f} s)"
                     + ("" if ACCELERATOR else " - CPU smoke test, not evidence") + "\\n\\n"
                     + report.markdown_table(seeds.task_rows(methods))))
    path = os.path.join(OUT, f"{name}.png")
    report.plot_task_seeds(problems[0], methods, path, subtitle=f"{len(SEEDS)} seeds")
    display(Image(path))
"""
    ),
    md(
        """
## Summary

For each task and SOFO variant: time per step relative to Adam (compile excluded) and how many times
fewer iterations than Adam it needs to reach Adam's final loss, median over seeds (a seed where SOFO never
gets there counts as 0x). On a CPU the K tangents run one after another, so a step costs roughly K
forward passes; on an accelerator they run in parallel.
"""
    ),
    code(
        """
problems = {name: problem for name, (problem, _) in results.items()}
display(Markdown(report.markdown_table(seeds.summary_rows(comparisons, problems))))
path = os.path.join(OUT, "summary.png")
report.plot_summary_seeds(comparisons, path, subtitle=BACKEND.upper() + ("" if ACCELERATOR else ", smoke test"))
display(Image(path))
"""
    ),
]


def write(name: str, cells) -> str:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    path = os.path.join(HERE, name)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return path


if __name__ == "__main__":
    for name, cells in (("tutorial.ipynb", TUTORIAL), ("benchmarks.ipynb", BENCHMARKS)):
        print("wrote", write(name, cells))
