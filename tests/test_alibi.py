"""ALiBi slopes and biases against values written out from MosaicML's formula."""

import numpy as np
import pytest

from jaxtrain.layers.attention import alibi_bias, alibi_slopes


def test_slopes_8_heads_are_powers_of_one_half():
    expected = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    np.testing.assert_allclose(alibi_slopes(8), expected, rtol=1e-7)


def test_slopes_12_heads_interleave_the_16_head_list():
    # 16-head slopes are 2^(-i/2), i = 1..16; the odd-indexed ones (2^-1 .. 2^-8) come first,
    # then the even-indexed ones (2^-0.5, 2^-1.5, ...) until 12 heads are filled
    expected = [
        1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256,
        2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5,
    ]  # fmt: skip
    np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-6)


def test_slopes_32_heads_are_quarter_power_steps():
    expected = [2 ** (-i / 4) for i in range(1, 33)]
    np.testing.assert_allclose(alibi_slopes(32), expected, rtol=1e-6)
    assert alibi_slopes(32)[3] == pytest.approx(0.5)
    assert alibi_slopes(32)[-1] == pytest.approx(1 / 256)


def test_slopes_with_other_bias_max():
    # alibi_bias_max 16 with 8 heads: 2^(-2i)
    np.testing.assert_allclose(alibi_slopes(8, alibi_bias_max=16), [4.0**-i for i in range(1, 9)], rtol=1e-6)
    # alibi_bias_max 4 with 4 heads: 2^-1 .. 2^-4
    np.testing.assert_allclose(alibi_slopes(4, alibi_bias_max=4), [1 / 2, 1 / 4, 1 / 8, 1 / 16], rtol=1e-7)
    # 6 heads, bias max 4: N = 8 slopes 2^(-i/2); interleaved [2^-1, 2^-2, 2^-3, 2^-4, 2^-0.5, 2^-1.5]
    np.testing.assert_allclose(
        alibi_slopes(6, alibi_bias_max=4), [1 / 2, 1 / 4, 1 / 8, 1 / 16, 2**-0.5, 2**-1.5], rtol=1e-6
    )


def test_causal_bias_is_slope_times_key_offset():
    bias = alibi_bias(2, 4)  # slopes 1/16 and 1/256 for 2 heads (2^(-8i/2))
    assert bias.shape == (2, 1, 4)
    np.testing.assert_allclose(bias[0, 0], [-3 / 16, -2 / 16, -1 / 16, 0.0], rtol=1e-7)
    np.testing.assert_allclose(bias[1, 0], [-3 / 256, -2 / 256, -1 / 256, 0.0], rtol=1e-7)


def test_full_bias_is_minus_slope_times_distance():
    bias = alibi_bias(1, 3, full=True)  # one head: slope 2^-8
    expected = -np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]]) / 256
    np.testing.assert_allclose(bias[0], expected, rtol=1e-7)


def test_causal_and_full_forms_give_the_same_masked_softmax():
    length, heads = 6, 4
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(heads, length, length))
    causal = np.tril(np.ones((length, length), bool))

    def masked_softmax(s):
        s = np.where(causal, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(
        masked_softmax(scores + alibi_bias(heads, length)),
        masked_softmax(scores + alibi_bias(heads, length, full=True)),
        atol=1e-6,
    )
