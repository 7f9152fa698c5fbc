"""Padding the query and key runs of one attention call to a kernel's length multiple."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to_multiple(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, multiple: int):
    """Pads T and S up to multiples of ``multiple``.

    q float[B, T, H, D]; k, v float[B, S, Hkv, D]; mask bool[B, T, S]. Added keys are zeros
    and masked everywhere; each added query row sees key 0 only (no row is ever empty), and
    its output is dropped by the caller (``out[:, :T]``). Returns the padded
    ``(q, k, v, mask)``.
    """
    t, s = q.shape[1], k.shape[1]
    t_pad, s_pad = round_up(t, multiple), round_up(s, multiple)
    if (t_pad, s_pad) == (t, s):
        return q, k, v, mask
    widths = lambda n, extra: [(0, 0), (0, extra - n)] + [(0, 0)] * 2  # noqa: E731
    q = jnp.pad(q, widths(t, t_pad))
    k, v = jnp.pad(k, widths(s, s_pad)), jnp.pad(v, widths(s, s_pad))
    mask = jnp.pad(mask, [(0, 0), (0, t_pad - t), (0, s_pad - s)])
    added_row = (jnp.arange(t_pad) >= t)[:, None] & (jnp.arange(s_pad) == 0)[None, :]
    return q, k, v, mask | added_row[None]
