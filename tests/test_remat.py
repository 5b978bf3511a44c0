"""Activation checkpointing (`remat`): same loss and gradients, same parameter tree, and the
compiled gradient really recomputes (the jaxpr carries a checkpoint/remat primitive)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmzoo.models import ConfigError, build, get_config, init

TINY = {
    "gpt": get_config("gpt-tiny", n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=16),
    "llama": get_config("llama-tiny", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                        max_len=16),
    "encdec": get_config("transformer-seq2seq", n_encoder_layers=2, n_decoder_layers=2,
                         d_model=32, n_heads=4, d_ff=64, max_len=16),
}


def _loss_fn(config):
    model = build(config)
    rs = np.random.RandomState(0)
    if config.family == "lm":
        toks = jnp.asarray(rs.randint(0, 256, (2, 9)), jnp.int32)
        args, targets = (toks[:, :-1],), toks[:, 1:]
    else:
        src = jnp.asarray(rs.randint(0, 256, (2, 7)), jnp.int32)
        tgt = jnp.asarray(rs.randint(0, 256, (2, 9)), jnp.int32)
        args, targets = (src, tgt[:, :-1]), tgt[:, 1:]

    def loss(params):
        logits = model.apply({"params": params}, *args)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()
    return loss


def _has_checkpoint(fn, *args) -> bool:
    """Whether the jaxpr of fn (nested jaxprs included, as printed) has a remat primitive."""
    text = str(jax.make_jaxpr(fn)(*args))
    return re.search(r"\b(checkpoint|remat2?)\[", text) is not None


@pytest.mark.parametrize("family", list(TINY))
def test_remat_keeps_loss_gradients_and_parameter_tree(family):
    base = TINY[family]
    params = init(base, 0)
    want_loss, want_grads = jax.value_and_grad(_loss_fn(base))(params)
    for policy in ("full", "dots"):
        config = base.replace(remat=policy)
        # the same parameter tree: checkpoints and Hugging Face import are unaffected
        assert jax.tree.structure(init(config, 0)) == jax.tree.structure(params)
        loss, grads = jax.value_and_grad(_loss_fn(config))(params)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     grads, want_grads)


@pytest.mark.parametrize("family", ["llama", "encdec"])
def test_remat_puts_a_checkpoint_in_the_gradient(family):
    params = init(TINY[family], 0)

    def remat_in_grad(policy):
        return _has_checkpoint(jax.grad(_loss_fn(TINY[family].replace(remat=policy))), params)
    assert not remat_in_grad("none")
    assert remat_in_grad("full") and remat_in_grad("dots")


def test_remat_value_is_checked():
    with pytest.raises(ConfigError, match="remat must be one of"):
        TINY["gpt"].replace(remat="some")
