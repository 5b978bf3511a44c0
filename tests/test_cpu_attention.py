"""fmzoo's fused CPU attention kernel (models/kernels/cpu_attention.cc) against the reference
formula: outputs and gradients, causal and not, grouped-query heads, sizes that are not
multiples of the kernel's blocks and vector width; under jit, vmap, pmap and a mesh; the
dispatcher's choice and its errors; a build that fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmzoo.models import attention as A
from fmzoo.models import cpu_attention as C
from fmzoo.models.registry import build, get_config

# Skipped only where there is no compiler at all: a build that fails is a test failure.
pytestmark = pytest.mark.skipif(C._compiler() is None, reason="no C++ compiler on this machine")


def _qkv(b, t, h, k, d, s=None, seed=0):
    rs = np.random.RandomState(seed)
    s = t if s is None else s
    return (jnp.asarray(rs.normal(size=shape), jnp.float32)
            for shape in ((b, t, h, d), (b, s, k, d), (b, s, k, d)))


def _reference(q, k, v, causal):
    mask = A.causal_mask(q.shape[1], k.shape[1]) if causal else None
    return A.scaled_dot_product_attention(q, k, v, mask)


@pytest.mark.parametrize("b,t,h,k,d,causal", [
    (2, 128, 4, 4, 32, True),   # gpt-tiny's shape: two full query blocks
    (2, 77, 4, 2, 12, True),    # grouped-query, ragged block, head dim not a multiple of 8
    (1, 150, 2, 1, 24, True),   # multi-query, three blocks, last one partial
    (3, 40, 4, 4, 16, False),   # full attention
])
def test_outputs_and_gradients_equal_the_reference(b, t, h, k, d, causal):
    q, kk, v = _qkv(b, t, h, k, d)
    w = jax.random.normal(jax.random.key(1), (b, t, h, d))  # a loss that weighs every output

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    fused = lambda q, k, v: C.cpu_attention(q, k, v, is_causal=causal)  # noqa: E731
    ref = lambda q, k, v: _reference(q, k, v, causal)  # noqa: E731
    np.testing.assert_allclose(jax.jit(fused)(q, kk, v), ref(q, kk, v), atol=2e-6, rtol=1e-5)
    got = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, kk, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, kk, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("t", [1, 3, 9])  # 1 and 3: cached decode's path, keys read in place
def test_fewer_queries_than_keys_with_padding(t):
    q, k, v = _qkv(2, t, 4, 2, 12, s=33)
    valid = np.ones((2, 33), bool)
    valid[0, 20:] = False  # a cache filled up to 20 in row 0
    mask = A.padding_mask(jnp.asarray(valid))
    fused = lambda q, k, v: C.cpu_attention(q, k, v, mask)  # noqa: E731
    ref = lambda q, k, v: A.scaled_dot_product_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
    loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()  # noqa: E731
    for g, r in zip(jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_a_long_context_beyond_the_kept_scratch_is_still_right():
    """S = 45000 keys: the backward's scratch (5 D S + 2 x 32 S floats) passes the 16 MB a
    pool thread keeps for reuse, so each task allocates its own; the result must not change."""
    q, k, v = _qkv(1, 5, 2, 1, 8, s=45000, seed=5)
    w = jax.random.normal(jax.random.key(6), q.shape)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * w).sum()  # noqa: E731
    fused = lambda q, k, v: C.cpu_attention(q, k, v)  # noqa: E731
    ref = lambda q, k, v: A.scaled_dot_product_attention(q, k, v)  # noqa: E731
    np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
    for g, r in zip(jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_causal_is_causal():
    """Changing the last token's key and value changes no earlier output."""
    q, k, v = _qkv(1, 70, 2, 2, 16)
    out = C.cpu_attention(q, k, v, is_causal=True)
    out2 = C.cpu_attention(q, k.at[:, -1].set(9.0), v.at[:, -1].set(-9.0), is_causal=True)
    np.testing.assert_array_equal(out[:, :-1], out2[:, :-1])
    assert not np.allclose(out[:, -1], out2[:, -1])


def test_vmap_pmap_and_a_mesh_give_the_same_result():
    q, k, v = _qkv(8, 64, 4, 4, 16, seed=2)
    want = _reference(q, k, v, True)
    fused = lambda q, k, v: C.cpu_attention(q, k, v, is_causal=True)  # noqa: E731
    split = [x.reshape(2, 4, *x.shape[1:]) for x in (q, k, v)]
    np.testing.assert_allclose(jax.vmap(fused)(*split).reshape(want.shape), want, atol=2e-6)
    per_device = [x.reshape(8, 1, *x.shape[1:]) for x in (q, k, v)]
    np.testing.assert_allclose(jax.pmap(fused)(*per_device).reshape(want.shape), want, atol=2e-6)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    spec = NamedSharding(mesh, P("data", None, "tensor", None))
    got = jax.jit(fused)(*(jax.device_put(x, spec) for x in (q, k, v)))
    np.testing.assert_allclose(got, want, atol=2e-6)


def _masks(b, t):
    """Left and right padding, and packed segments (which also hide the pads, segment 0)."""
    valid = np.ones((b, t), bool)
    valid[0, : t // 3] = False   # left-padded row
    valid[1, t - t // 4:] = False  # right-padded row
    seg = np.zeros((b, t), np.int32)
    seg[:, : t // 2], seg[:, t // 2: t - 3] = 1, 2
    return {"padding": A.padding_mask(jnp.asarray(valid)),
            "segments": A.segment_mask(jnp.asarray(seg), jnp.asarray(seg))}


@pytest.mark.parametrize("mask_name", ["padding", "segments"])
@pytest.mark.parametrize("causal", [True, False])
def test_masked_outputs_and_gradients_equal_the_reference(mask_name, causal):
    """Rows that see at least one key match the reference, and so do all gradients of a loss
    that, like the training losses, ignores the rows that see none."""
    b, t = 2, 83
    q, k, v = _qkv(b, t, 4, 2, 16, seed=3)
    mask = _masks(b, t)[mask_name]
    full = A.combine_masks(mask, A.causal_mask(t) if causal else None)
    sees = jnp.broadcast_to(full, (b, 1, t, t)).any(-1)[:, 0]  # [B, T]
    w = jax.random.normal(jax.random.key(4), (b, t, 4, 16)) * sees[:, :, None, None]

    fused = lambda q, k, v: A.dot_product_attention(q, k, v, mask, impl="cpu",  # noqa: E731
                                                    is_causal=causal)
    ref = lambda q, k, v: A.scaled_dot_product_attention(q, k, v, full)  # noqa: E731
    got, want = jax.jit(fused)(q, k, v), ref(q, k, v)
    np.testing.assert_allclose(got * sees[:, :, None, None], want * sees[:, :, None, None],
                               atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(sees)], 0.0)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * w).sum()  # noqa: E731
    for g, r in zip(jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_dispatch_sends_what_the_kernel_does_not_take_to_xla_and_refuses_what_it_cannot_run():
    q, k, v = _qkv(2, 20, 4, 2, 8, s=27)  # causal with T != S: the kernel does not take it
    want = A.dot_product_attention(q, k, v, impl="xla", is_causal=True)
    np.testing.assert_array_equal(A.dot_product_attention(q, k, v, impl="cpu", is_causal=True),
                                  want)
    with pytest.raises(ValueError, match="float32 only.*use 'auto' or 'xla'"):
        A.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), impl="cpu")
    with pytest.raises(ValueError, match="causal attention needs T == S"):
        C.cpu_attention(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="the same for every head"):
        C.cpu_attention(q, k, v, jnp.ones((2, 4, 20, 27), bool))


def test_auto_picks_the_kernel_on_one_cpu_device_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FMZOO_CPU_ATTENTION", raising=False)
    assert A.choose_impl("auto", jnp.float32, 32) == "xla"  # 8 simulated devices here
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert A.choose_impl("auto", jnp.float32, 32) == "cpu"  # the default on one device
    assert A.choose_impl("auto", jnp.bfloat16, 32) == "xla"
    monkeypatch.setenv("FMZOO_CPU_ATTENTION", "0")  # the off switch
    assert A.choose_impl("auto", jnp.float32, 32) == "xla"
    monkeypatch.setenv("FMZOO_CPU_ATTENTION", "1")
    assert A.choose_impl("auto", jnp.float32, 32) == "cpu"
    monkeypatch.setattr(C, "available", lambda: False)  # no compiler: XLA, no error
    monkeypatch.delenv("FMZOO_CPU_ATTENTION")
    assert A.choose_impl("auto", jnp.float32, 32) == "xla"
    monkeypatch.setenv("FMZOO_CPU_ATTENTION", "off")  # a value it does not know: said, not guessed
    with pytest.raises(ValueError, match="FMZOO_CPU_ATTENTION must be 0 .* or 1 .*got 'off'"):
        A.choose_impl("auto", jnp.float32, 32)


def test_a_model_with_the_kernel_trains_like_one_without():
    """gpt-tiny's loss and every parameter gradient match between 'cpu' and 'xla'."""
    base = get_config("gpt-tiny").replace(n_layers=2, max_len=64)
    toks = jax.random.randint(jax.random.key(0), (2, 48), 0, base.vocab_size)
    model_x, model_c = build(base.replace(attention_impl="xla")), \
        build(base.replace(attention_impl="cpu"))
    params = model_x.init(jax.random.key(1), toks)["params"]

    def loss(model):
        def f(p):
            logits = model.apply({"params": p}, toks)
            return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[
                jnp.arange(2)[:, None], jnp.arange(47)[None], toks[:, 1:]])
        return jax.jit(jax.value_and_grad(f))

    (lx, gx), (lc, gc) = loss(model_x)(params), loss(model_c)(params)
    np.testing.assert_allclose(lc, lx, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="failed"):
        C._build()
    assert not list((tmp_path / "fmzoo" / "kernels").glob("*.so"))  # nothing half-written
