"""The Pallas kernels for the step's products with the state (run in Pallas' interpreter
on the CPU) against float64 einsums."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from msrnn_jax.fast import kernels


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("block", [None, 8])
@pytest.mark.parametrize("mma", [False, True, None])
def test_kernels_read_one_layer_of_the_whole_buffer(G, block, mma):
    rng = np.random.default_rng(G)
    L, B, H, C, D = 3, 2, 2, 48, 16
    q = jnp.asarray(rng.normal(size=(B, H, G, D)), jnp.float32)
    w = jnp.asarray(rng.random((B, H, G, C)), jnp.bfloat16)
    K = jnp.asarray(rng.normal(size=(L, B, H, C, D)), jnp.bfloat16)
    V = jnp.asarray(rng.normal(size=(L, B, H, C, D)), jnp.bfloat16)
    f64 = lambda a: np.asarray(a, np.float64)
    # the tensor-core product takes the query in the state's dtype (block 8 is too small
    # for it and falls back to the exact-f32 products)
    tensor_cores = (G >= 2 if mma is None else mma) and block != 8
    q_in = q.astype(K.dtype) if tensor_cores else q
    for layer in range(L):
        s = kernels.slot_scores(q, K, layer, block=block, mma=mma)
        m = kernels.slot_mix(w, V, layer, block=block, mma=mma)
        assert s.shape == (B, H, G, C) and s.dtype == jnp.float32 and m.shape == (B, H, G, D)
        np.testing.assert_allclose(np.asarray(s), np.einsum("bhgd,bhcd->bhgc", f64(q_in), f64(K[layer])),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m), np.einsum("bhgc,bhcd->bhgd", f64(w), f64(V[layer])),
                                   rtol=1e-5, atol=1e-5)


def test_slot_block_is_the_largest_dividing_power_of_two():
    assert kernels.slot_block(4128) == 32  # 129 x 32, the full cache of the benchmarks
    assert kernels.slot_block(512) == 256 and kernels.slot_block(512, limit=64) == 64
    assert kernels.slot_block(48) == 16 and kernels.slot_block(7) == 1


def test_tensor_cores_for_grouped_queries_only():
    assert kernels._choose(1, 256, None, None) == (1, False, None)  # MHA: multiply-and-sum
    assert kernels._choose(4, 256, None, None) == (16, True, 8)     # GQA: padded to 16 rows
    assert kernels._choose(4, 8, None, None) == (4, False, None)    # too few slots for a dot
    assert kernels._choose(1, 64, True, 4) == (16, True, 4)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("G,mma", [(1, False), (4, True), (4, False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_read_an_8bit_state_in_place(kind, G, mma, dtype):
    """8-bit slots (codes and a scale per slot) read in place: the products equal the
    float64 products with the slots dequantized: on tensor cores to `dtype`, as
    `Quantized.dequantize(dtype)` gives them (the einsum path's numbers), in the float32
    multiply-and-sum exactly (codes times scale)."""
    from msrnn_jax.core.state import Quantized
    rng = np.random.default_rng(G + 10 * mma)
    L, B, H, C, D = 3, 2, 2, 48, 16
    q = jnp.asarray(rng.normal(size=(B, H, G, D)), dtype)
    w = jnp.asarray(rng.random((B, H, G, C)), dtype)
    # slots of unequal magnitudes, so that a scale applied to the wrong slot shows
    K = Quantized.of(jnp.asarray(rng.normal(size=(L, B, H, C, D)) * rng.uniform(0.1, 9, (L, B, H, C, 1))), kind)
    V = Quantized.of(jnp.asarray(rng.normal(size=(L, B, H, C, D)) * rng.uniform(0.1, 9, (L, B, H, C, 1))), kind)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    read = dtype if mma else jnp.float32
    for layer in range(L):
        s = kernels.slot_scores(q, K, layer, mma=mma)
        m = kernels.slot_mix(w, V, layer, mma=mma)
        assert s.shape == (B, H, G, C) and s.dtype == jnp.float32 and m.shape == (B, H, G, D)
        np.testing.assert_allclose(np.asarray(s), np.einsum("bhgd,bhcd->bhgc", f64(q), f64(K[layer].dequantize(read))),
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(m), np.einsum("bhgc,bhcd->bhgd", f64(w), f64(V[layer].dequantize(read))),
                                   rtol=1e-5, atol=1e-4)
