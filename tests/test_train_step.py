"""Train step: accumulation == big batch, sharded == single device, frozen untouched,
optimizer groups, non-finite steps skipped."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vlm_jax import losses, partition, sharding, testing
from d2vlm_jax.models.d2vlm import D2VLM, init_variables
from d2vlm_jax.train import optimizer as optim_lib
from d2vlm_jax.train.step import init_state, make_train_step

OPTIM = dict(lr=1e-3, lora_lr=3e-3, warmup_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)


@functools.lru_cache(maxsize=None)
def setup():
    config = testing.tiny_d2vlm_config()
    batch = testing.random_batch(config, seed=5, batch=4, rejected=1)
    params = sharding.unbox(init_variables(config, jax.random.key(0), batch))["params"]
    params = jax.tree.map(lambda x: x + 0.02, params)
    trainable, frozen = partition.split(params, partition.D2VLM_TRAINABLE)
    return config, batch, trainable, frozen


def run_step(micro, stage="fpo", mesh=None, config=None, loss=losses.LossConfig()):
    """One step with plain SGD: the update is linear in the gradient, so comparing params
    compares gradients (Adam's first step, ~sign(g), would amplify float noise of ~0 grads).
    ``config``: a variant of the tiny config with the same parameter tree (layout choices)."""
    base, batch, trainable, frozen = setup()
    config = config or base
    tx, schedules = optax.sgd(0.5), None
    step = make_train_step(D2VLM(config), loss, tx, stage=stage, micro_batches=micro, schedules=schedules)
    state = init_state(trainable, tx, jax.random.key(1))
    if mesh is None:
        return jax.jit(step)(state, frozen, batch)
    abstract = jax.eval_shape(lambda: init_variables(config, jax.random.key(0), batch))
    shard = sharding.shardings_for(abstract, mesh, config.llm.sharding_rules)["params"]
    t_shard, f_shard = partition.split(shard, partition.D2VLM_TRAINABLE)
    with jax.set_mesh(mesh):
        # host copies: the step donates its state, which must not alias the cached params
        state = init_state(jax.device_put(jax.tree.map(np.array, trainable), t_shard), tx, jax.random.key(1))
        fn = jax.jit(step, donate_argnums=0)
        return fn(state, jax.device_put(frozen, f_shard), sharding.host_batch_to_global(batch, mesh))


TOKEN = losses.LossConfig(normalization="token")


def test_gradient_accumulation_equals_one_big_batch():
    """Accumulation == one big batch in the token-mean form (``loss.normalization="token"``)."""
    s1, m1 = run_step(1, loss=TOKEN)
    s4, m4 = run_step(4, loss=TOKEN)
    np.testing.assert_allclose(m4["loss/total"], m1["loss/total"], rtol=1e-5)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch_sample_normalization():
    """The same equality for the authors' per-sample form (``loss.normalization="sample"``),
    which really differs from the token-mean form on this batch."""
    sample = losses.LossConfig(normalization="sample")
    s1, m1 = run_step(1, loss=sample)
    s4, m4 = run_step(4, loss=sample)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, m_token = run_step(1, loss=TOKEN)
    assert abs(float(m_token["loss/lm"]) - float(m1["loss/lm"])) > 1e-4


def test_step_on_2x2x2_mesh_equals_single_device():
    s1, m1 = run_step(1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s8, m8 = run_step(1, mesh=mesh)
    np.testing.assert_allclose(m8["loss/total"], m1["loss/total"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(s8.params))


def test_v5e_layout_frames_over_every_device_and_chunked_tower_equals_single_device():
    """The v5e plan's layout (configs/d2vlm_phi3_v5e.py): the video encoder's frames split over
    data x fsdp x tensor, the vision tower in chunks. Same step as one device, unchanged."""
    base = setup()[0]
    rules = sharding.rules_with({"frames": ("data", "fsdp", "tensor")})
    config = dataclasses.replace(
        base, llm=dataclasses.replace(base.llm, sharding_rules=rules),
        video=dataclasses.replace(base.video, vision=dataclasses.replace(base.video.vision, frame_chunks=3)))
    s1, m1 = run_step(1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})   # 4 x 6 frames: 3 per device
    s8, m8 = run_step(1, mesh=mesh, config=config)
    np.testing.assert_allclose(m8["loss/total"], m1["loss/total"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_only_trainable_groups_have_optimizer_state_and_lrs_differ():
    _, _, trainable, frozen = setup()
    tx, schedules = optim_lib.make_optimizer(OPTIM, total_steps=10)
    state = init_state(trainable, tx, jax.random.key(0))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim > 0)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    assert n_state == 2 * n_train  # Adam mu + nu for trainable leaves only
    assert n_frozen > 0
    labels = jax.tree_util.tree_map_with_path(lambda p, _: optim_lib.group_of(jax.tree_util.keystr(p)
                                                                             .replace("']['", "/").strip("[]'")),
                                              trainable)
    assert "lora" in jax.tree.leaves(labels) and "base" in jax.tree.leaves(labels)
    assert float(schedules["lora"](5)) == 3 * float(schedules["base"](5))


def test_frozen_params_unchanged_and_nonfinite_step_skipped():
    config, batch, trainable, frozen = setup()
    tx, _ = optim_lib.make_optimizer(OPTIM, total_steps=10)
    step = jax.jit(make_train_step(D2VLM(config), losses.LossConfig(), tx, stage="sft"))
    state = init_state(trainable, tx, jax.random.key(1))
    frozen_before = jax.tree.map(np.array, frozen)
    new_state, metrics = step(state, frozen, batch)
    assert float(metrics["finite"]) == 1.0 and int(new_state.step) == 1
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(trainable))]
    assert any(changed)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim else x, state.params)
    bad_state = state.replace(params=bad)
    after, m = step(bad_state, frozen, batch)
    assert float(m["finite"]) == 0.0 and int(after.step) == 0
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(bad_state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weight_decay_mask_excludes_vectors():
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    tx, _ = optim_lib.make_optimizer({**OPTIM, "lr": 0.0, "lora_lr": 0.0, "weight_decay": 0.5}, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # lr 0 => no change at all; with lr > 0 only the matrix decays
    assert float(optax.tree.norm(updates)) == 0.0
    tx, _ = optim_lib.make_optimizer({**OPTIM, "weight_decay": 0.5, "warmup_ratio": 0.0}, total_steps=10)
    state = tx.init(params)
    updates, state = tx.update(zeros, state, params)
    updates, state = tx.update(zeros, state, params)
    assert float(jnp.abs(updates["bias"]).max()) == 0.0 and float(jnp.abs(updates["w"]).max()) > 0.0
