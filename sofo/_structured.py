"""Structured (low-rank) tangents: K JVPs in which a weight matrix's tangent stays factored.

A tangent dW = A B^T of a weight matrix W (m x n, A: m x r, B: n x r) gives dW.h = A (B^T h) at
O(r (m + n)) per column of h instead of O(m n). XLA does not find this for a materialised A B^T, so
`jvp` evaluates the model's jaxpr itself, with the K tangents batched: a parameter's `LowRank` tangent
is kept factored through `transpose`, `convert_element_type` and `dot_general` (where it is an operand
contracted over one axis), and materialised (A B^T, dense) before any other use, where the primitive's
own JVP rule runs, batched over K. The result equals `vmap(jvp)` with the materialised tangents, up to
float rounding (the products are associated differently).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

# jax.extend.core.DropVar in current jax; jax.core.DropVar at the declared floor (jax 0.4.31)
_DROP_VAR = getattr(jex.core, "DropVar", None) or jax.core.DropVar


class LowRank(NamedTuple):
    """K tangents of one 2-D parameter, tangent k = a[k] @ b[k].T; a: (K, m, r), b: (K, n, r)."""

    a: jax.Array
    b: jax.Array


class Split(NamedTuple):
    """K tangents as `head` (the first m, dense: remembered directions) then `tail` (the rest, structured)."""

    head: Any
    tail: Any


def _is_lowrank(x) -> bool:
    return isinstance(x, LowRank)


def is_structured(tangents: Any) -> bool:
    """Whether a tangents pytree holds factored leaves (then `push` replaces the dense vmap(jvp))."""
    if isinstance(tangents, Split):
        return True
    return any(_is_lowrank(leaf) for leaf in jax.tree_util.tree_leaves(tangents, is_leaf=_is_lowrank))


def materialise(tangents: Any) -> Any:
    """The dense tangents: each `LowRank` leaf as the (K, m, n) array of a[k] @ b[k].T; a Split joined."""
    if isinstance(tangents, Split):
        head, tail = tangents.head, materialise(tangents.tail)
        return jax.tree_util.tree_map(lambda h, t: jnp.concatenate([h, t.astype(h.dtype)]), head, tail)
    return jax.tree_util.tree_map(
        lambda v: _dense(v) if _is_lowrank(v) else v, tangents, is_leaf=_is_lowrank
    )


def _dense(v: LowRank) -> jax.Array:
    return jnp.einsum("kmr,knr->kmn", v.a, v.b)


def combine(tangents: Any, coefficients: jax.Array) -> Any:
    """sum_k c_k v_k in `coefficients`' dtype, a `LowRank` leaf as (A diag(c)) B^T over all K r columns
    at once (the K matrices a[k] @ b[k].T are never formed)."""
    if isinstance(tangents, Split):
        count = jax.tree_util.tree_leaves(tangents.head)[0].shape[0]
        head = combine(tangents.head, coefficients[:count])
        tail = combine(tangents.tail, coefficients[count:])
        return jax.tree_util.tree_map(jnp.add, head, tail)
    dtype = coefficients.dtype

    def leaf(v):
        if _is_lowrank(v):
            return jnp.einsum("kmr,k,knr->mn", v.a.astype(dtype), coefficients, v.b.astype(dtype))
        return jnp.tensordot(coefficients, v.astype(dtype), axes=1)

    return jax.tree_util.tree_map(leaf, tangents, is_leaf=_is_lowrank)


# --- the interpreter -------------------------------------------------------------------------------


_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _bind(eqn, args):
    bound = eqn.primitive.get_bind_params(eqn.params)
    # jax >= 0.7 returns the params; older versions return (subfuns, params).
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _dense_rule(eqn, primals, tangents):
    """The primitive's own JVP, batched over the K (dense) tangents; zero tangents stay unbatched."""
    tangents = [_dense(t) if _is_lowrank(t) else t for t in tangents]
    moving = [i for i, t in enumerate(tangents) if t is not None]

    def f(*xs):
        args = list(primals)
        for i, x in zip(moving, xs):
            args[i] = x
        return _bind(eqn, args)

    def one(*ts):
        return jax.jvp(f, [primals[i] for i in moving], list(ts))

    outs, out_tangents = jax.vmap(one, out_axes=(None, 0))(*[tangents[i] for i in moving])
    return outs, [t if _inexact(o) else None for o, t in zip(outs, out_tangents)]


def _factored_dot(v: LowRank, x, w_side: int, dimension_numbers, params):
    """The K tangents of dot_general(W, x) (w_side 0) or dot_general(x, W) (w_side 1) for dW = a b^T,
    or None when W is not a matrix contracted over exactly one axis with no batch axes."""
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    w_contract = contract_l if w_side == 0 else contract_r
    x_contract = contract_r if w_side == 0 else contract_l
    if batch_l or batch_r or len(w_contract) != 1 or v.a.ndim != 3:
        return None
    c = w_contract[0]
    factors = (v.a, v.b)  # factor of W's axis 0 (rows), of its axis 1 (columns)
    inner, outer = factors[c], factors[1 - c]
    kw = dict(precision=params.get("precision"), preferred_element_type=params.get("preferred_element_type"))

    def one(f_in, f_out):
        # W = f_in-axis contracted with x first (r columns), then expanded by the other factor.
        # The expansion by the other factor contracts only r: a sum of r broadcast products (XLA's CPU
        # dot is slow at a contraction of 1, and the products fuse with the adds that follow).
        if w_side == 1:  # out = [x free dims..., W's free axis]
            t = lax.dot_general(x, f_in, ((tuple(x_contract), (0,)), ((), ())), **kw)  # (x free..., r)
            return sum(t[..., j, None] * f_out[:, j] for j in range(f_out.shape[1]))
        t = lax.dot_general(f_in, x, (((0,), tuple(x_contract)), ((), ())), **kw)  # (r, x free...)
        expand = lambda j: f_out[:, j].reshape((-1,) + (1,) * (t.ndim - 1))  # noqa: E731
        return sum(expand(j) * t[j][None] for j in range(f_out.shape[1]))  # (W's free axis, x free...)

    return jax.vmap(one)(inner, outer)


def _dot_rule(eqn, primals, tangents):
    (out,) = _bind(eqn, primals)
    parts = []
    for side in (0, 1):
        t, other = tangents[side], primals[1 - side]
        if t is None:
            continue
        part = None
        if _is_lowrank(t):
            part = _factored_dot(t, other, side, eqn.params["dimension_numbers"], eqn.params)
            t = _dense(t) if part is None else t
        if part is None:
            if side == 0:
                part = jax.vmap(lambda d: _bind(eqn, [d, primals[1]])[0])(t)
            else:
                part = jax.vmap(lambda d: _bind(eqn, [primals[0], d])[0])(t)
        parts.append(part.astype(out.dtype))
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return [out], [total]


def _transpose_rule(eqn, primals, tangents):
    (out,) = _bind(eqn, primals)
    (t,) = tangents
    if tuple(eqn.params["permutation"]) == (1, 0):
        return [out], [LowRank(t.b, t.a)]
    return [out], [t]


def _convert_rule(eqn, primals, tangents):
    (out,) = _bind(eqn, primals)
    (t,) = tangents
    if not _inexact(out):
        return [out], [None]
    return [out], [LowRank(t.a.astype(out.dtype), t.b.astype(out.dtype))]


# Primitives that keep a LowRank operand factored (any other use materialises it first).
_LOWRANK_RULES = {
    "dot_general": _dot_rule,
    "transpose": _transpose_rule,
    "convert_element_type": _convert_rule,
    "copy": lambda eqn, p, t: (_bind(eqn, p), list(t)),
    "copy_p": lambda eqn, p, t: (_bind(eqn, p), list(t)),
}


def _eval(jaxpr, consts, primals, tangents):
    """Evaluates `jaxpr` on primals and K-batched tangents (None, a (K, ...) array, or LowRank)."""
    env: dict = {}

    def read(v):
        if isinstance(v, jex.core.Literal):
            return v.val, None
        return env[v]

    def write(v, primal, tangent):
        if not isinstance(v, _DROP_VAR):
            env[v] = (primal, tangent)

    for v, c in zip(jaxpr.constvars, consts):
        write(v, c, None)
    for v, p, t in zip(jaxpr.invars, primals, tangents):
        write(v, p, t)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        in_primals = [p for p, _ in ins]
        in_tangents = [t for _, t in ins]
        name = eqn.primitive.name
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")) if name in _CALLS else None
        if all(t is None for t in in_tangents):
            outs, out_tangents = _bind(eqn, in_primals), [None] * len(eqn.outvars)
        elif isinstance(sub, jex.core.ClosedJaxpr):  # a jitted sub-function: evaluated inline
            outs, out_tangents = _eval(sub.jaxpr, sub.consts, in_primals, in_tangents)
        elif name in _LOWRANK_RULES and any(_is_lowrank(t) for t in in_tangents):
            outs, out_tangents = _LOWRANK_RULES[name](eqn, in_primals, in_tangents)
        else:
            outs, out_tangents = _dense_rule(eqn, in_primals, in_tangents)
        for v, p, t in zip(eqn.outvars, outs, out_tangents):
            write(v, p, t)
    results = [read(v) for v in jaxpr.outvars]
    return [p for p, _ in results], [t for _, t in results]


def _zeros_tangent(size, primal):
    if _inexact(primal):
        return jnp.zeros((size,) + jnp.shape(primal), jnp.result_type(primal))
    return np.zeros((size,) + jnp.shape(primal), jax.dtypes.float0)


def jvp(fn, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
    """`vmap(lambda t: jvp(fn, primals, t), out_axes=(None, 0))(tangents)`, with LowRank leaves kept
    factored through the matmuls they enter. Returns (fn's outputs, their K tangents, dense)."""
    flat_primals, in_tree = jax.tree_util.tree_flatten(primals)
    flat_tangents = jax.tree_util.tree_leaves(tangents, is_leaf=_is_lowrank)
    size = flat_tangents[0].a.shape[0] if _is_lowrank(flat_tangents[0]) else flat_tangents[0].shape[0]
    closed, out_shape = jax.make_jaxpr(
        lambda *xs: fn(*jax.tree_util.tree_unflatten(in_tree, xs)), return_shape=True
    )(*flat_primals)
    flat_tangents = [t if _is_lowrank(t) or _inexact(p) else None for p, t in zip(flat_primals, flat_tangents)]
    outs, out_tangents = _eval(closed.jaxpr, closed.consts, flat_primals, flat_tangents)
    out_tangents = [
        _zeros_tangent(size, p) if t is None or not _inexact(p)
        else (_dense(t) if _is_lowrank(t) else t).astype(jnp.result_type(p))
        for p, t in zip(outs, out_tangents)
    ]
    out_tree = jax.tree_util.tree_structure(out_shape)
    return jax.tree_util.tree_unflatten(out_tree, outs), jax.tree_util.tree_unflatten(out_tree, out_tangents)


def _map_chunks(fn, primals, tangents, chunk):
    """The output tangents of `jvp`, `chunk` tangents at a time under `lax.map` (bounded memory)."""
    add_axis = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)  # noqa: E731
    return jax.lax.map(
        lambda ts: jax.tree_util.tree_map(lambda u: u[0], jvp(fn, primals, add_axis(ts))[1]),
        tangents,
        batch_size=chunk,
    )


def push(fn, primals: tuple, tangents: tuple, tangent_chunk_size: int | None = None) -> tuple[Any, Any]:
    """The engine's step 2 for structured tangents: fn's outputs and their K output tangents.

    `tangents[0]` (the parameters' tangents) may be a `Split`: its dense head (remembered directions)
    goes through the plain batched JVP, its structured tail through `jvp`; the other entries of
    `tangents` (e.g. latent-state tangents, K on the leading axis) are split to match.
    """
    params_tangents = tangents[0]
    if isinstance(params_tangents, Split):
        count = jax.tree_util.tree_leaves(params_tangents.head)[0].shape[0]
        rest = tangents[1:]
        head = (params_tangents.head,) + jax.tree_util.tree_map(lambda t: t[:count], rest)
        tail = (params_tangents.tail,) + jax.tree_util.tree_map(lambda t: t[count:], rest)
        dense = lambda *ts: jax.jvp(fn, primals, ts)  # noqa: E731
        if tangent_chunk_size is None:
            outputs, head_out = jax.vmap(dense, out_axes=(None, 0))(*head)
            _, tail_out = jvp(fn, primals, tail)
        else:
            outputs = fn(*primals)
            head_out = jax.lax.map(lambda ts: dense(*ts)[1], head, batch_size=tangent_chunk_size)
            tail_out = _map_chunks(fn, primals, tail, tangent_chunk_size)
        joined = jax.tree_util.tree_map(
            lambda h, t: jnp.concatenate([h, t]) if h.dtype != jax.dtypes.float0 else np.concatenate([h, t]),
            head_out,
            tail_out,
        )
        return outputs, joined
    size = jax.tree_util.tree_leaves(tangents)[0].shape[0]
    if tangent_chunk_size is None or tangent_chunk_size >= size:
        return jvp(fn, primals, tangents)
    return fn(*primals), _map_chunks(fn, primals, tangents, tangent_chunk_size)
