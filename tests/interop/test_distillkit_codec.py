"""DistillKit's codec, numpy side: bytes written out by hand decode to values computed by hand, so a
mistake made the same way in our encoder and decoder cannot pass; then encoder -> decoder round trips."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from logitcache.format.errors import InputError
from logitcache.interop.distillkit_codec import (CompressionConfig, compress_logprobs, decompress_logprobs,
                                                 pack_bits, unpack_bits)


def config(**fields) -> CompressionConfig:
    return CompressionConfig.from_dict({"d": 1000, "residual_bins": [], "delta_encoding": False, **fields})


def bits_to_bytes(bits: str) -> np.ndarray:
    """A bit string written out by hand (spaces for reading) -> its bytes, most significant bit first."""
    bits = bits.replace(" ", "")
    return np.frombuffer(int(bits, 2).to_bytes(len(bits) // 8, "big"), dtype=np.uint8)


def test_ids_pack_most_significant_bit_first_and_end_to_end():
    np.testing.assert_array_equal(pack_bits(np.array([[5, 3]]), 3), [[0xAC]])          # 101 011 00
    # 1000, 1, 65535 at 17 bits (ceil(log2 100000)), then 5 zero bits of padding: 7 bytes
    want = bits_to_bytes("00000001111101000" "00000000000000001" "01111111111111111" "00000")
    np.testing.assert_array_equal(pack_bits(np.array([[1000, 1, 65535]]), 17)[0], want)
    np.testing.assert_array_equal(unpack_bits(want[None], 17, 3), [[1000, 1, 65535]])
    x = np.random.default_rng(0).integers(0, 2 ** 53, size=(4, 37))
    for b in (1, 7, 18, 53):
        v = x % (1 << b)
        np.testing.assert_array_equal(unpack_bits(pack_bits(v, b), b, 37).astype(np.int64), v)
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\^3\)"):
        pack_bits(np.array([[8]]), 3)
    with pytest.raises(ValueError, match="3 values of 17 bits need 7 bytes, got 6"):
        unpack_bits(want[None, :6], 17, 3)


def test_exact_values_then_a_polynomial_decode_as_computed_by_hand():
    cfg = config(k=4, exact_k=1, exact_dtype="float32", polynomial_terms=[0, 1], term_dtype="float32")
    row = np.frombuffer(struct.pack("<3f", -0.5, -1.0, -2.0), dtype=np.uint8)          # exact, c0, c1
    assert cfg.logprob_bytes == 12
    # -0.5, then c0 + c1 * i at i = 0, 1, 2
    np.testing.assert_array_equal(decompress_logprobs(row[None], cfg), [[-0.5, -1.0, -3.0, -5.0]])
    cfg = config(k=3, exact_k=0, polynomial_terms=["sqrt"], normalize_t=True)
    row = np.frombuffer(struct.pack("<f", -2.0), dtype=np.uint8)
    np.testing.assert_allclose(decompress_logprobs(row[None], cfg), [[0.0, -2 * 0.5 ** 0.5, -2.0]], rtol=1e-7)


def test_residual_bins_and_bfloat16_deltas_decode_as_computed_by_hand():
    # a 4-bit bin, scale 0.25: codes 6, 4, 0 are (code - 8) * 0.25; packed 0110 0100 0000 + 4 zero bits
    cfg = config(k=3, exact_k=0, residual_bins=[{"scale_dtype": "float32", "element_bits": 4, "num_elements": 3}])
    row = np.frombuffer(struct.pack("<f", 0.25) + bytes([0x64, 0x00]), dtype=np.uint8)
    np.testing.assert_array_equal(decompress_logprobs(row[None], cfg), [[-0.5, -1.0, -2.0]])
    # a 1-bit bin reads 1 as +scale, 0 as -scale
    cfg = config(k=2, exact_k=0, residual_bins=[{"scale_dtype": "float32", "element_bits": 1, "num_elements": 2}])
    row = np.frombuffer(struct.pack("<f", 0.5) + bytes([0b10000000]), dtype=np.uint8)
    np.testing.assert_array_equal(decompress_logprobs(row[None], cfg), [[0.5, -0.5]])
    # bfloat16 (the upper half of float32, little endian) deltas -1, -0.5, -0.25 sum to -1, -1.5, -1.75
    cfg = config(k=3, exact_k=3, exact_dtype="bfloat16", delta_encoding=True)
    row = np.frombuffer(bytes([0x80, 0xBF, 0x00, 0xBF, 0x80, 0xBE]), dtype=np.uint8)
    np.testing.assert_array_equal(decompress_logprobs(row[None], cfg), [[-1.0, -1.5, -1.75]])


def test_sizes_of_the_documented_configurations():
    recommended = CompressionConfig.from_dict({"d": 151936, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16",
                                               "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"], "term_dtype": "float32",
                                               "residual_bins": [], "delta_encoding": False})
    assert recommended.index_bits == 18 and recommended.logprob_bytes == 16 * 2 + 6 * 4
    assert recommended.index_bytes == 128 * 18 // 8 and recommended.row_bytes == 344
    budget = CompressionConfig.from_dict({"d": 151936, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16",
                                          "polynomial_terms": [0, 1, "sqrt"], "residual_bins": []})
    assert budget.logprob_bytes == 2 + 12 and budget.index_bytes == 113 and budget.row_bytes == 127
    assert budget.delta_encoding and not budget.error_diffusion       # DistillKit's defaults when not given
    assert CompressionConfig.from_dict(recommended.to_dict()) == recommended
    assert CompressionConfig.from_dict({"d": 65536, "k": 1, "exact_k": 1, "residual_bins": []}).index_bits == 16
    assert CompressionConfig.from_dict({"d": 65537, "k": 1, "exact_k": 1, "residual_bins": []}).index_bits == 17


@pytest.mark.parametrize("fields, words", [
    ({"k": 4, "exact_k": 1}, "missing field 'residual_bins'"),
    ({"k": 4, "exact_k": 5, "residual_bins": []}, r"k \(4\) must be >= exact_k \(5\)"),
    ({"k": 4, "exact_k": 1, "residual_bins": []}, "exact_k < k needs polynomial_terms or residual_bins"),
    ({"k": 4, "exact_k": 1, "residual_bins": [{"scale_dtype": "float32", "element_bits": 65, "num_elements": 3}]},
     r"residual_bins\[0\].element_bits must be an integer in 1..64, got 65"),
    ({"k": 4, "exact_k": 1, "residual_bins": [{"scale_dtype": "float32", "element_bits": 4, "num_elements": 4}]},
     "the residual bins hold 4 values, more than k - exact_k = 3"),
    ({"k": 4, "exact_k": 4, "exact_dtype": "float8", "residual_bins": []}, "exact_dtype must be one of"),
    ({"k": 4, "exact_k": 1, "polynomial_terms": [0, "log"], "residual_bins": []}, "polynomial_terms: 'log' is neither"),
])
def test_bad_configurations_name_the_field(fields, words):
    with pytest.raises(InputError, match=f"cfg.yaml: {words}"):
        CompressionConfig.from_dict({"d": 1000, **fields}, where="cfg.yaml")


def zipf_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, k) descending log-probs p_i ~ (i + 1)^-a, a in [0.5, 2.5], scaled to a mass of 0.7..0.99."""
    rng = np.random.default_rng(seed)
    p = (np.arange(k)[None, :] + 1.0) ** -rng.uniform(0.5, 2.5, size=(n, 1))
    return np.log(p / p.sum(1, keepdims=True) * rng.uniform(0.7, 0.99, size=(n, 1))).astype(np.float32)


@pytest.mark.parametrize("fields, exact_tol, tail_tol", [
    # DistillKit's recommended configuration: bfloat16 exact values, a 6-term polynomial tail
    ({"exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"]}, 2.0 ** -8, 0.05),
    # + residuals of the tail in 8 and 4 bits: closer
    ({"exact_k": 16, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, 2, "sqrt"],
      "residual_bins": [{"scale_dtype": "float16", "element_bits": 8, "num_elements": 48},
                        {"scale_dtype": "bfloat16", "element_bits": 4, "num_elements": 64}]}, 2.0 ** -8, 0.02),
    # delta-coded float16 with error diffusion, no polynomial
    ({"exact_k": 8, "exact_dtype": "float16", "delta_encoding": True, "error_diffusion": True,
      "residual_bins": [{"scale_dtype": "float32", "element_bits": 6, "num_elements": 120}]}, 2.0 ** -9, 0.1),
    # everything exact in float32: the values themselves
    ({"exact_k": 128, "exact_dtype": "float32"}, 0.0, 0.0),
])
def test_encode_then_decode_stays_within_the_configurations_error(fields, exact_tol, tail_tol):
    cfg = config(k=128, **fields)
    v = zipf_rows(300, 128)
    data = compress_logprobs(v, cfg)
    assert data.shape == (300, cfg.logprob_bytes) and data.dtype == np.uint8
    err = np.abs(decompress_logprobs(data, cfg).astype(np.float64) - v)
    k = cfg.exact_k
    assert (err[:, :k] <= np.abs(v[:, :k]) * exact_tol + (8 * 2.0 ** -10 if cfg.delta_encoding else 0)).all()
    assert err[:, k:].max(initial=0) <= tail_tol, err[:, k:].max()
