"""Peak compiled memory of one SOFO step vs `tangent_chunk_size` (a table; no timing).

    python -m benchmarks.chunking [--quick]

A deep MLP (the forward pass's intermediates for K tangents dominate) and a vanilla RNN through the scan
engine. Memory is XLA's compiled temp-buffer size (`memory_analysis().temp_size_in_bytes`), which is
deterministic for a given program and backend.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

import sofo


def mlp_step(width, depth, batch, k, chunk):
    keys = jax.random.split(jax.random.key(0), depth + 2)
    params = [jax.random.normal(keys[i], (width, width)) / jnp.sqrt(width) for i in range(depth)]
    x = jax.random.normal(keys[-2], (batch, width))
    t = jax.random.normal(keys[-1], (batch, width))

    def fun(p):
        h = x
        for w in p:
            h = jnp.tanh(h @ w)
        return h

    step = sofo.value_and_sofo_grad(
        fun, lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)), tangent_size=k, tangent_chunk_size=chunk
    )
    return jax.jit(step).lower(jax.random.key(0), params)


def rnn_step(n, batch, steps, k, chunk):
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"rec": jax.random.normal(keys[0], (n, n)) / jnp.sqrt(n), "inp": jax.random.normal(keys[1], (n, 3))}

    def cell(p, z, x):
        z = jnp.tanh(z @ p["rec"].T + x @ p["inp"].T)
        return z, z[:, :3]

    step = sofo.value_and_sofo_grad_scan(
        cell, lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)), tangent_size=k, tangent_chunk_size=chunk
    )
    xs = jnp.zeros((steps, batch, 3))
    return jax.jit(step).lower(jax.random.key(0), params, jnp.zeros((batch, n)), xs, xs)


def temp_mb(lowered):
    analysis = lowered.compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models")
    args = parser.parse_args(argv)
    k = 128
    width, depth, batch = (256, 4, 128) if args.quick else (1024, 8, 256)
    n, rnn_batch = (128, 64) if args.quick else (512, 128)
    print(f"# peak temp memory vs tangent_chunk_size (K={k}); {platform.machine()}, "
          f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print(f"{'chunk':>8} | {'MLP %dx%d B=%d (MB)' % (depth, width, batch):>24} | {'RNN N=%d B=%d (MB)' % (n, rnn_batch):>22}")
    for chunk in (None, 64, 32, 16, 8):
        mlp = temp_mb(mlp_step(width, depth, batch, k, chunk))
        rnn = temp_mb(rnn_step(n, rnn_batch, 50, k, chunk))
        print(f"{str(chunk or 'all'):>8} | {mlp:>24.1f} | {rnn:>22.1f}")


if __name__ == "__main__":
    main()
