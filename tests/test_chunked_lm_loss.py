"""Chunked LM log-probabilities: same values and gradients as the full-vocabulary logits,
without their memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vlm_jax import losses, objective, partition, testing
from d2vlm_jax.models.d2vlm import D2VLM, chunked_token_logp

TOL = 1e-5


def direct_token_logp(logits_fn, hidden, targets):
    logp = jax.nn.log_softmax(logits_fn(hidden), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_chunked_equals_direct_values_and_gradients():
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 37, 16, 50                       # 37 tokens: chunks of 8 pad the last one
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

    def run(fn):
        def loss(hidden, kernel):
            return jnp.sum(fn(lambda x: x @ kernel, hidden, targets) * w)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, kernel)

    ref_val, ref_grads = run(direct_token_logp)
    for chunk in (1, 8, 37, 64):
        val, grads = run(lambda f, h, tg: chunked_token_logp(f, h, tg, chunk))
        assert abs(float(val - ref_val)) <= TOL * abs(float(ref_val))
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=TOL, atol=TOL)


def test_chunked_backward_never_holds_all_logits():
    """Compiled gradient temporaries: the full program holds [B, T, V] float32 logits (and
    their softmax); the chunked one a few chunks' worth ([B, chunk, V] logits, their softmax
    in the backward, and the [B, T, D] hidden-state gradient)."""
    b, t, d, v, chunk = 2, 512, 32, 4096, 64
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)

    def temp_bytes(fn):
        loss = lambda h, k: jnp.sum(fn(lambda x: x @ k, h, targets))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, kernel).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes(direct_token_logp)
    chunked = temp_bytes(lambda f, h, tg: chunked_token_logp(f, h, tg, chunk))
    logits_bytes, chunk_bytes = b * t * v * 4, b * chunk * v * 4
    print(f"gradient temporaries: full {full / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB "
          f"(all logits {logits_bytes / 2**20:.1f} MiB)")
    assert full >= logits_bytes
    assert chunked <= 3 * chunk_bytes < logits_bytes


@pytest.mark.slow
def test_model_loss_and_gradients_with_chunked_logits_equal_full():
    """FPO: the chosen branch's L_lm and the rejected branches' text log-likelihoods."""
    stage = "fpo"
    config = testing.tiny_d2vlm_config(layers=2)
    batch = testing.random_batch(config, seed=1, rejected=2)
    params = testing.perturbed_params(config, batch)
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    results = {}
    for chunk in (0, 9):                              # 9 divides neither R = 14 nor C1 * R = 42
        model = D2VLM(dataclasses.replace(config, lm_logits_chunk=chunk))

        def f(trainable, model=model):
            return objective.loss_and_metrics(model, partition.merge(trainable, frozen), batch,
                                              losses.LossConfig(), stage=stage)
        results[chunk] = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)
    ((loss_full, m_full), g_full), ((loss_chunk, m_chunk), g_chunk) = results[0], results[9]
    assert abs(float(loss_chunk) - float(loss_full)) <= TOL * abs(float(loss_full))
    for k in m_full:
        assert abs(float(m_chunk[k]) - float(m_full[k])) <= TOL * max(abs(float(m_full[k])), 1.0), k
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_full))
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)))
    print(f"{stage}: chunked loss rel err {abs(float(loss_chunk) / float(loss_full) - 1):.2e}, "
          f"grad max abs err {err:.2e} (max |g| {scale:.2e})")
    assert err <= TOL * scale


def test_negative_chunk_is_a_config_error():
    config = testing.tiny_d2vlm_config()
    with pytest.raises(ValueError, match="lm_logits_chunk"):
        dataclasses.replace(config, lm_logits_chunk=-1)
