"""DistillKit's compressed top-k log-probabilities, read and written with numpy alone.

Decoded from DistillKit 1.0's public source (arcee-ai/DistillKit at a61c2e7:
``distillkit/compression/{config,bitpack,monotonic_logprobs,compressor}.py``); written here anew. A row
(one token position) of k log-probabilities, sorted descending, is stored as two byte strings:

``bytepacked_indices``: the k token ids in that order, each as its ``b = ceil(log2 d)`` low bits, most
significant bit first, ids end to end, the last byte padded with zero bits: ``ceil(k * b / 8)`` bytes.
Ids 5 and 3 at b = 3 are ``101 011 00`` = ``0xAC``.

``compressed_logprobs``: ``logprob_bytes`` bytes, in this order, every float little endian:

    exact_k values in exact_dtype       the first exact_k (delta-coded if delta_encoding) values as they are
    len(terms) coefficients, term_dtype a least-squares fit c of the other t = k - exact_k values,
                                        v_i ~ sum_j c_j X_j(x_i), x_i = i (i = 0..t-1), or i / (t - 1) with
                                        normalize_t; X_j(x) = x ** j for an integer term j, sqrt(x), exp(x)
    per residual bin: scale, then       the residuals v - fit of the next num_elements values, each as
      num_elements codes packed as ids   round(r / scale) + 2^(bits-1) in `bits` bits (1 bit: +-scale)

Values without a residual bin have residual 0. Decoding (what DistillKit's trainer computes) adds the
fit (in term_dtype) and the residuals (rounded to exact_dtype), concatenates the exact values, and with
``delta_encoding`` takes the cumulative sum (in float32, the result rounded to exact_dtype). torch's
dtype promotion decides the dtype of each step; ``decompress_logprobs`` reproduces it, so its values
equal DistillKit's up to the float32 rounding of the polynomial's evaluation order.

``compress_logprobs`` is our encoder: it fits the polynomial in float64 and sizes the residuals against
the fit exactly as the decoder evaluates it, so a decoder sees the best values the configuration allows
(DistillKit's own encoder fits in float32). The 1-bit residual code is the sign (DistillKit's decoder
reads 0 as -scale and 1 as +scale). Shapes: ``(N, k)`` values, ``(N, bytes)`` uint8 rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format.dtypes import bf16_bits_to_float32, float32_to_bf16_bits
from ..format.errors import InputError

FOLLOWS = "DistillKit 1.0 (github.com/arcee-ai/DistillKit a61c2e7): sample_logits_vllm.py's output"
CONFIG_FILE = "compression_config.yaml"
IGNORE = -100                                        # labels of rows that are not trained

FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")
SVD_TOL = 1e-5          # singular values below this are dropped from the least-squares solve (DistillKit's)


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int

    @property
    def bytes(self) -> int:
        return FLOAT_BYTES[self.scale_dtype] + math.ceil(self.element_bits * self.num_elements / 8)


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's ``DistributionQuantizationConfig``: its fields, defaults and checks. ``d`` is the
    vocabulary the ids index (their bit width is ``ceil(log2 d)``), ``k`` the values per row."""

    d: int
    k: int
    exact_k: int
    residual_bins: tuple[ResidualBin, ...]
    exact_dtype: str = "float32"
    polynomial_terms: tuple[int | str, ...] | None = None
    term_dtype: str = "float32"
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False
    where: str = field(default="the compression config", compare=False)

    # ---- sizes --------------------------------------------------------------------------------------
    @property
    def index_bits(self) -> int:
        """ceil(log2 d), exactly (DistillKit computes it in float32, the same for every d below 2^24)."""
        return (self.d - 1).bit_length()

    @property
    def index_bytes(self) -> int:
        return math.ceil(self.k * self.index_bits / 8)

    @property
    def terms(self) -> tuple[int | str, ...]:
        return tuple(self.polynomial_terms or ())

    @property
    def logprob_bytes(self) -> int:
        return (self.exact_k * FLOAT_BYTES[self.exact_dtype] + len(self.terms) * FLOAT_BYTES[self.term_dtype]
                + sum(b.bytes for b in self.residual_bins))

    @property
    def row_bytes(self) -> int:
        """Bytes per token position: log-probs and ids."""
        return self.logprob_bytes + self.index_bytes

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """As DistillKit writes it (``model_dump(mode="json")``: its compression_config.yaml)."""
        return {"d": self.d, "k": self.k, "exact_k": self.exact_k, "exact_dtype": self.exact_dtype,
                "polynomial_terms": None if self.polynomial_terms is None else list(self.polynomial_terms),
                "term_dtype": self.term_dtype,
                "residual_bins": [{"scale_dtype": b.scale_dtype, "element_bits": b.element_bits,
                                   "num_elements": b.num_elements} for b in self.residual_bins],
                "delta_encoding": self.delta_encoding, "error_diffusion": self.error_diffusion,
                "normalize_t": self.normalize_t}

    @classmethod
    def from_dict(cls, d: Any, where: str = "the compression config") -> "CompressionConfig":
        """Parse and check as DistillKit does (its required fields, defaults and rules); a problem is an
        error naming ``where`` and the field."""
        def bad(msg: str):
            raise InputError(f"{where}: {msg}")

        if not isinstance(d, dict):
            bad(f"expected a mapping of DistillKit's compression fields, got {type(d).__name__}")
        for key in ("d", "k", "exact_k", "residual_bins"):
            if key not in d:
                bad(f"missing field {key!r} (DistillKit requires d, k, exact_k and residual_bins)")

        def integer(name, value, lo, hi=None):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                bad(f"{name} must be an integer {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {value!r}")
            return value

        def dtype(name, value):
            if value not in FLOAT_BYTES:
                bad(f"{name} must be one of {', '.join(FLOAT_BYTES)}, got {value!r}")
            return value

        def flag(name, value):
            if not isinstance(value, bool):
                bad(f"{name} must be true or false, got {value!r}")
            return value

        terms = d.get("polynomial_terms")
        if terms is not None:
            if not isinstance(terms, list):
                bad(f"polynomial_terms must be a list of integers and {'/'.join(SPECIAL_TERMS)}, got {terms!r}")
            for t in terms:
                if not (t in SPECIAL_TERMS or (isinstance(t, int) and not isinstance(t, bool))):
                    bad(f"polynomial_terms: {t!r} is neither an integer power nor one of {', '.join(SPECIAL_TERMS)}")
            terms = tuple(terms)
        raw_bins = d["residual_bins"]
        if not isinstance(raw_bins, list):
            bad(f"residual_bins must be a list, got {raw_bins!r}")
        bins = []
        for i, b in enumerate(raw_bins):
            if not isinstance(b, dict) or {"scale_dtype", "element_bits", "num_elements"} - set(b):
                bad(f"residual_bins[{i}] must have scale_dtype, element_bits and num_elements, got {b!r}")
            bins.append(ResidualBin(dtype(f"residual_bins[{i}].scale_dtype", b["scale_dtype"]),
                                    integer(f"residual_bins[{i}].element_bits", b["element_bits"], 1, 64),
                                    integer(f"residual_bins[{i}].num_elements", b["num_elements"], 1)))
        cfg = cls(d=integer("d", d["d"], 2, 1 << 24), k=integer("k", d["k"], 1), exact_k=integer("exact_k", d["exact_k"], 0),
                  residual_bins=tuple(bins), exact_dtype=dtype("exact_dtype", d.get("exact_dtype", "float32")),
                  polynomial_terms=terms, term_dtype=dtype("term_dtype", d.get("term_dtype", "float32")),
                  delta_encoding=flag("delta_encoding", d.get("delta_encoding", True)),
                  error_diffusion=flag("error_diffusion", d.get("error_diffusion", False)),
                  normalize_t=flag("normalize_t", d.get("normalize_t", False)), where=where)
        if cfg.k < cfg.exact_k:
            bad(f"k ({cfg.k}) must be >= exact_k ({cfg.exact_k})")
        if cfg.exact_k < cfg.k and not cfg.terms and not cfg.residual_bins:
            bad("exact_k < k needs polynomial_terms or residual_bins for the other values")
        if sum(b.num_elements for b in bins) > cfg.k - cfg.exact_k:
            bad(f"the residual bins hold {sum(b.num_elements for b in bins)} values, more than k - exact_k = "
                f"{cfg.k - cfg.exact_k}")
        return cfg


# ---- bits ---------------------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integers in [0, 2^bits) -> (..., ceil(n * bits / 8)) uint8: each value's bits, most
    significant first, values end to end, zero bits after the last (DistillKit's ``pack_to_bytes``)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    v = np.asarray(values)
    if v.size and (int(v.min()) < 0 or (bits < 64 and int(v.max()) >> bits)):
        raise ValueError(f"values must be in [0, 2^{bits}), got {int(v.min())}..{int(v.max())}")
    v = v.astype(np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    b = ((v[..., None] >> shifts) & np.uint64(1)).astype(np.uint8)        # (..., n, bits)
    return np.packbits(b.reshape(*v.shape[:-1], -1), axis=-1)


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of ``pack_bits``: (..., m) uint8 -> (..., n) uint64 (the first n * bits bits)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    data = np.asarray(data, dtype=np.uint8)
    if data.shape[-1] * 8 < n * bits:
        raise ValueError(f"{n} values of {bits} bits need {math.ceil(n * bits / 8)} bytes, got {data.shape[-1]}")
    b = np.unpackbits(data, axis=-1)[..., :n * bits].reshape(*data.shape[:-1], n, bits)
    out = np.zeros((*data.shape[:-1], n), dtype=np.uint64)
    for i in range(bits):                                                   # most significant bit first
        out = (out << np.uint64(1)) | b[..., i].astype(np.uint64)
    return out


# ---- floats as torch stores them ------------------------------------------------------------------------
def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (nearest even), returned as float64 holding exactly those values."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x
    if dtype == "bfloat16":
        return bf16_bits_to_float32(float32_to_bf16_bits(x.astype(np.float32))).astype(np.float64)
    with np.errstate(over="ignore"):
        return x.astype(np.float16 if dtype == "float16" else np.float32).astype(np.float64)


def promote(a: str, b: str) -> str:
    """torch's result dtype of an operation on floats of dtypes a and b."""
    if a == b:
        return a
    if "float64" in (a, b):
        return "float64"
    return "float32"                       # float32 with anything smaller; float16 with bfloat16


def to_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """(N, m) values (already representable in dtype) -> (N, m * size) uint8, little endian."""
    n = x.shape[0]
    if dtype == "bfloat16":
        raw = float32_to_bf16_bits(np.asarray(x, np.float32)).astype("<u2")
    else:
        raw = np.asarray(x).astype({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype])
    return np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)


def from_bytes(b: np.ndarray, dtype: str) -> np.ndarray:
    """The inverse of ``to_bytes``, as float64."""
    b = np.ascontiguousarray(b, dtype=np.uint8)
    if dtype == "bfloat16":
        return bf16_bits_to_float32(b.view("<u2").astype(np.uint16)).astype(np.float64)
    return b.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(np.float64)


# ---- the polynomial -----------------------------------------------------------------------------------
def design_matrix(cfg: CompressionConfig, t: int, dtype: str) -> np.ndarray:
    """(t, len(terms)) the terms at the t positions, each rounded to ``dtype`` (float64 values)."""
    pts = rounded(np.linspace(0.0, 1.0, t) if cfg.normalize_t else np.arange(t, dtype=np.float64), dtype)
    cols = []
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for term in cfg.terms:
            col = np.sqrt(pts) if term == "sqrt" else np.exp(pts) if term == "exp" else pts ** term
            cols.append(rounded(col, dtype))
    return np.stack(cols, axis=-1) if cols else np.zeros((t, 0))


def evaluate_fit(coeffs: np.ndarray, cfg: CompressionConfig, t: int) -> np.ndarray:
    """(N, t) the polynomial with (N, m) coefficients at the t positions, computed as DistillKit's decoder
    does in term_dtype (each product rounded, then the rounded sum)."""
    x = design_matrix(cfg, t, cfg.term_dtype)                              # (t, m)
    with np.errstate(over="ignore", invalid="ignore"):
        prod = rounded(x[None, :, :] * coeffs[:, None, :], cfg.term_dtype)    # (N, t, m)
        return rounded(prod.sum(-1), cfg.term_dtype)


def least_squares(values: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """(N, m) coefficients of the least-squares fit of (N, t) values, in float64 (dropping singular
    values below DistillKit's tolerance, as its solver does: rank-deficient fits of few points work)."""
    x = design_matrix(cfg, values.shape[1], "float64")
    if not np.isfinite(x).all():
        raise InputError(f"{cfg.where}: the polynomial terms {list(cfg.terms)} are not finite at the positions "
                         f"0..{values.shape[1] - 1} (exp of large positions overflows: set normalize_t; a negative "
                         "power is infinite at 0)")
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    s_inv = np.where(s > SVD_TOL, 1.0 / np.where(s > SVD_TOL, s, 1.0), 0.0)
    pinv = (vh.T * s_inv) @ u.T                                             # (m, t)
    return values @ pinv.T


# ---- decode -------------------------------------------------------------------------------------------
def decompress_logprobs(data: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """(N, logprob_bytes) uint8 -> (N, k) float32 log-probs, as DistillKit's trainer decodes them."""
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != cfg.logprob_bytes:
        raise ValueError(f"rows of {cfg.logprob_bytes} bytes expected, got shape {data.shape}")
    n, out_dtype, pos = data.shape[0], cfg.exact_dtype, 0
    width = cfg.exact_k * FLOAT_BYTES[out_dtype]
    exact = from_bytes(data[:, pos:pos + width], out_dtype)
    pos += width
    coeffs = None
    if cfg.terms:
        width = len(cfg.terms) * FLOAT_BYTES[cfg.term_dtype]
        coeffs = from_bytes(data[:, pos:pos + width], cfg.term_dtype)
        pos += width
    t = cfg.k - cfg.exact_k
    parts, res_dtype = [], None
    for b in cfg.residual_bins:
        scale = from_bytes(data[:, pos:pos + FLOAT_BYTES[b.scale_dtype]], b.scale_dtype)       # (N, 1)
        pos += FLOAT_BYTES[b.scale_dtype]
        width = math.ceil(b.element_bits * b.num_elements / 8)
        codes = unpack_bits(data[:, pos:pos + width], b.element_bits, b.num_elements)
        pos += width
        step_dtype = promote("float32", b.scale_dtype)
        if b.element_bits == 1:
            level = codes.astype(np.float64) * 2.0 - 1.0
        else:
            level = rounded(codes.astype(np.float64) - 2.0 ** (b.element_bits - 1), "float32")
        parts.append(rounded(level * scale, step_dtype))
        res_dtype = step_dtype if res_dtype is None else promote(res_dtype, step_dtype)
    residual = np.zeros((n, t))
    if parts:
        r = np.concatenate(parts, axis=1)
        residual[:, :r.shape[1]] = r
    residual = rounded(residual, out_dtype)                                 # residual.to(out_dtype)
    if coeffs is not None:
        approx_dtype = promote(cfg.term_dtype, out_dtype)
        approx = rounded(evaluate_fit(coeffs, cfg, t) + residual, approx_dtype)
    else:
        approx_dtype, approx = out_dtype, residual
    values = np.concatenate([exact, approx], axis=1)
    if cfg.delta_encoding:                       # cumsum of .float(), accumulated wide, then .to(out_dtype)
        values = rounded(rounded(np.cumsum(rounded(values, "float32"), axis=1), "float32"), out_dtype)
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


# ---- encode -------------------------------------------------------------------------------------------
def _diffuse_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round each column to ``dtype`` carrying the rounding error into the next (error diffusion)."""
    out = np.empty_like(values)
    carry = np.zeros(values.shape[0])
    for i in range(values.shape[1]):
        cur = values[:, i] + carry
        out[:, i] = rounded(cur, dtype)
        carry = cur - out[:, i]
    return out


def _quantize_bin(r: np.ndarray, b: ResidualBin, diffuse: bool, carry: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale (N, 1) in scale_dtype, codes (N, n), the carried error): the codes DistillKit's decoder maps
    nearest to the residuals ``r`` (N, n)."""
    top = 1.0 if b.element_bits == 1 else 2.0 ** (b.element_bits - 1)
    peak = np.abs(r).max(axis=1, keepdims=True)
    scale = rounded(np.where(peak == 0, 1.0, peak / top), b.scale_dtype)
    scale = np.where(scale == 0, 1.0, scale)        # residuals below the scale dtype's smallest value: code 0
    lo, hi = (0.0, 1.0) if b.element_bits == 1 else (-top, top - 1)
    codes = np.empty(r.shape, dtype=np.uint64)
    for i in range(r.shape[1]):
        cur = r[:, i] / scale[:, 0] + (carry if diffuse else 0.0)
        level = np.where(cur >= 0, 1.0, -1.0) if b.element_bits == 1 else np.clip(np.rint(cur), lo, hi)
        if diffuse:
            carry = cur - level
        codes[:, i] = ((level + 1) / 2 if b.element_bits == 1 else level - lo).astype(np.uint64)
    return scale, codes, carry


def compress_logprobs(values: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """(N, k) finite log-probs sorted descending -> (N, logprob_bytes) uint8."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != cfg.k:
        raise ValueError(f"(N, {cfg.k}) values expected, got shape {v.shape}")
    if cfg.delta_encoding:
        deltas = np.concatenate([v[:, :1], np.diff(v, axis=1)], axis=1)
        v = _diffuse_to(deltas, "float32") if cfg.error_diffusion else rounded(deltas, "float32")
    chunks = [to_bytes(rounded(v[:, :cfg.exact_k], cfg.exact_dtype), cfg.exact_dtype)]
    rest = v[:, cfg.exact_k:]
    if cfg.terms:
        coeffs = rounded(least_squares(rest, cfg), cfg.term_dtype)
        chunks.append(to_bytes(coeffs, cfg.term_dtype))
        rest = rest - evaluate_fit(coeffs, cfg, rest.shape[1])
    carry, at = np.zeros(v.shape[0]), 0
    for b in cfg.residual_bins:
        scale, codes, carry = _quantize_bin(rest[:, at:at + b.num_elements], b, cfg.error_diffusion, carry)
        chunks += [to_bytes(scale, b.scale_dtype), pack_bits(codes, b.element_bits)]
        at += b.num_elements
    return np.concatenate(chunks, axis=1).astype(np.uint8)


def load_config(url: str, storage_options: dict | None, vocab: int | None = None) -> CompressionConfig:
    """A compression config from YAML: DistillKit's ``compression_config.yaml`` (the fields at the top), or
    a DistillKit training config (``teacher: logprob_compressor: ...``). ``vocab`` fills a missing ``d``."""
    import fsspec
    import yaml

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = yaml.safe_load(f.read())
    except FileNotFoundError:
        raise InputError(f"{url}: no such compression config (DistillKit's capture writes {CONFIG_FILE} beside "
                         "its parquet files; give it with --compression-config)") from None
    except yaml.YAMLError as e:
        raise InputError(f"{url}: not YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        data = (data.get("teacher") or {}).get("logprob_compressor") or data.get("logprob_compressor") or data
    if isinstance(data, dict) and "d" not in data and vocab is not None:
        data = {**data, "d": vocab}
    return CompressionConfig.from_dict(data, where=url)
