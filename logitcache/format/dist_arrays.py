"""How each encoding of the teacher's distribution is stored in a shard (format 1.2, ``dist/``), and
its parameters as ``capture.encoding`` in the manifest records them.

``encodings`` holds the maths (array in, array out); this module names the stored arrays, declares
their specs (dtype, fill, which count array indexes an entry array) and turns a shard's rows into
them and back. Rows whose distribution was not captured hold count 0 and NaN tails: no entries.
"""

from __future__ import annotations

import numpy as np

from . import encodings
from .arrays import FULL_LOGPROBS, ArraySpec, id_dtype
from .encodings import (EncodingError, SampledRows, SparseRows, TargetRows, decode_adaptive, decode_compact,
                        decode_hybrid, decode_sampled, decode_topk, encode_adaptive, encode_compact, max_abs_error,
                        pack_hybrid, pack_sampled)

ENCODINGS = ("topk", "adaptive", "compact", "sampled", "hybrid", "full")
# what --top-k means and defaults to, per encoding (the k of topk, the cap of the adaptive ones)
DEFAULT_TOP_K = {"topk": 64, "adaptive": 128, "compact": 64, "sampled": 1, "hybrid": 16, "full": 64}
# parameters and their defaults; the CLI flag that sets each
PARAMS = {
    "topk": {},
    "adaptive": {"top_p": 0.99},
    "compact": {"top_p": 0.99, "bits": 8, "lo": -16.0},
    "sampled": {"draws": 64, "temperature": 1.0},
    "hybrid": {"bits": 10, "lo": -16.0, "draws": 64},
    "full": {},
}
FLAGS = {"top_p": "--keep-mass", "bits": "--bits", "draws": "--draws", "temperature": "--proposal-temperature"}
# encodings whose capture needs the full distribution on the device (draws or every value)
NEEDS_FULL_DISTRIBUTION = ("sampled", "hybrid", "full")
# the forward-KL / cross-entropy estimators are the only losses these support
ESTIMATED = ("sampled", "hybrid")

# stored name of each array ``encodings.encode_*`` returns
_STORED = {
    "adaptive": {"ids": "dist/ids", "logprobs": "dist/logprobs", "counts": "dist/counts", "tail": "dist/tail"},
    "compact": {"ids": "dist/ids", "codes": "dist/codes", "counts": "dist/counts", "tail": "dist/tail"},
    "sampled": {"ids": "dist/ids", "counts": "dist/draw_counts", "row_counts": "dist/counts",
                "logprobs": "dist/logprobs", "log_z": "dist/log_z"},
    "hybrid": {"ids": "dist/ids", "codes": "dist/codes", "counts": "dist/counts", "tail": "dist/tail",
               "tail_ids": "dist/tail_ids", "tail_counts": "dist/tail_draw_counts", "tail_row_counts": "dist/tail_counts"},
}


def resolve_encoding(name: str, **given) -> dict:
    """``{"name": ..., <params>}`` with defaults filled in; a parameter the encoding does not take, or a
    bad value, is an error naming its CLI flag. ``given`` values of None mean "not given"."""
    if name not in ENCODINGS:
        raise EncodingError(f"--encoding: {name!r} is not one of {', '.join(ENCODINGS)}")
    given = {k: v for k, v in given.items() if v is not None}
    for key in given:
        if key not in FLAGS:
            raise EncodingError(f"unknown encoding parameter {key!r}")
        if key not in PARAMS[name]:
            takes = [n for n in ENCODINGS if key in PARAMS[n]]
            raise EncodingError(f"{FLAGS[key]} applies to --encoding {'/'.join(takes)}, not {name}")
    enc = {"name": name, **PARAMS[name], **given}
    if "top_p" in enc and not 0 < float(enc["top_p"]) <= 1:
        raise EncodingError(f"--keep-mass must be in (0, 1], got {enc['top_p']}")
    if "bits" in enc and not (isinstance(enc["bits"], int) and 2 <= enc["bits"] <= 16):
        raise EncodingError(f"--bits must be an int in [2, 16], got {enc['bits']!r}")
    if "draws" in enc and not (isinstance(enc["draws"], int) and 1 <= enc["draws"] <= 0xFFFF):
        raise EncodingError(f"--draws must be an int in [1, 65535], got {enc['draws']!r}")
    if "temperature" in enc and not float(enc["temperature"]) >= 1:
        raise EncodingError(f"--proposal-temperature must be >= 1 (below 1 the importance weights are unbounded), "
                            f"got {enc['temperature']}")
    return enc


def _count_dtype(max_count: int) -> str:
    """The count dtype the encoders write (``encodings._count_dtype``), as a spec names it."""
    return encodings._count_dtype(max_count).name


def dist_specs(enc: dict, vocab_size: int, logprob_dtype: str, top_k: int) -> list[ArraySpec]:
    """Specs of the ``dist/`` arrays of an encoding (none for topk)."""
    name, ids, nan = enc["name"], id_dtype(vocab_size), float("nan")
    if name == "topk":
        return []
    if name == "full":
        return [ArraySpec(FULL_LOGPROBS, logprob_dtype, logprob_dtype, (vocab_size,), nan, logprob_dtype == "float32",
                          "log-softmax (T=1) of every id of the vocabulary: the whole next-token distribution")]
    entry = lambda n, dt, exact, meaning, fill=0, index="dist/counts": ArraySpec(n, dt, dt, (), fill, exact, meaning,
                                                                                 index)
    token = lambda n, dt, exact, meaning, fill=0: ArraySpec(n, dt, dt, (), fill, exact, meaning)
    if name in ("adaptive", "compact", "hybrid"):
        k_cap = top_k
        code_dt = "uint8" if enc.get("bits", 8) <= 8 else "uint16"
        head = {"adaptive": "the smallest set of most probable ids with mass >= top_p, at most k",
                "compact": "the smallest set of most probable ids with mass >= top_p, at most k, log-prob >= lo",
                "hybrid": "the k most probable ids with log-prob >= lo (the exact head)"}[name]
        out = [token("dist/counts", _count_dtype(k_cap), True, f"entries of this token: {head}")]
        if name == "adaptive":
            out += [entry("dist/ids", ids, True, "ids, by descending log-probability"),
                    entry("dist/logprobs", logprob_dtype, logprob_dtype == "float32",
                          "log-softmax (T=1, full vocabulary) of those ids", nan)]
        else:
            err = max_abs_error(enc["bits"], enc["lo"])
            out += [entry("dist/ids", ids, True, "ids ascending within a token, delta-coded: first id, then gaps"),
                    entry("dist/codes", code_dt, False,
                          f"log-prob codes q in id order: logprob = lo + q * (-lo / (2^bits - 1)), "
                          f"bits={enc['bits']}, lo={enc['lo']}, |error| <= {err:.3g}")]
        out.append(token("dist/tail", "float32", True, "exact teacher mass outside this token's stored ids", nan))
        if name == "hybrid":
            d = _count_dtype(enc["draws"])
            out += [token("dist/tail_counts", d, True, "distinct ids drawn from the tail (p outside the head)"),
                    entry("dist/tail_ids", ids, True, "drawn tail ids ascending within a token, delta-coded",
                          index="dist/tail_counts"),
                    entry("dist/tail_draw_counts", d, True, "how many of the token's ceil(draws * tail) draws hit each",
                          index="dist/tail_counts")]
        return out
    if name == "sampled":
        d = _count_dtype(enc["draws"])
        out = [token("dist/counts", d, True, "distinct ids among this token's draws from the teacher"),
               entry("dist/ids", ids, True, "drawn ids ascending within a token, delta-coded: first id, then gaps"),
               entry("dist/draw_counts", d, True, "how many of the token's draws hit each id")]
        if enc["temperature"] != 1.0:
            out += [entry("dist/logprobs", logprob_dtype, logprob_dtype == "float32",
                          "teacher log-prob (T=1) of each drawn id, for the importance weights", nan),
                    token("dist/log_z", "float32", True, "logsumexp(logprobs / temperature) of the proposal", nan)]
        return out
    raise EncodingError(f"no arrays for encoding {name!r}")


def encode_rows(enc: dict, top_k: int, vocab_size: int, cand_ids: np.ndarray, cand_logprobs: np.ndarray,
                extras: dict[str, np.ndarray], scored: np.ndarray, value_dtype: str = "float16") -> dict[str, np.ndarray]:
    """A shard's rows -> its ``dist/`` arrays. ``cand_*`` (N, K): top-K ids and float32 log-probs in rank
    order (garbage on rows not ``scored``); ``extras``: what the capture device computed beside them
    (``tail``; ``draws`` [+ ``draw_logprobs``, ``log_z``]; ``head_counts``, ``tail_draws``, ``tail_n``;
    ``full``), one row per token."""
    name, n = enc["name"], len(scored)
    if name == "topk":
        return {}
    if name == "full":
        return {FULL_LOGPROBS: extras["full"]}
    if n == 0:
        return {sp.name: np.zeros((0, *sp.row_shape), sp.storage_dtype)
                for sp in dist_specs(enc, vocab_size, value_dtype, top_k)}
    s = np.asarray(scored, dtype=bool)
    ids, lp = cand_ids[s], cand_logprobs[s].astype(np.float32)
    if "tail" in extras:
        tail = extras["tail"][s].astype(np.float64)
    else:   # an engine that returns only the top-k (vLLM): exact up to float32 rounding of the values
        tail = 1.0 - np.exp(lp.astype(np.float64)).sum(1)
    tail = np.clip(tail, 0.0, 1.0).astype(np.float32)
    if name == "adaptive":
        arrays = encode_adaptive(ids, lp, tail, vocab_size=vocab_size, top_p=enc["top_p"], k_max=top_k,
                                 value_dtype=value_dtype)
    elif name == "compact":
        arrays = encode_compact(ids, lp, tail, vocab_size=vocab_size, top_p=enc["top_p"], k_max=top_k,
                                bits=enc["bits"], lo=enc["lo"])
    elif name == "sampled":
        t = float(enc["temperature"])
        arrays = pack_sampled(extras["draws"][s], vocab_size=vocab_size, temperature=t,
                              draw_logprobs=extras["draw_logprobs"][s] if t != 1.0 else None,
                              log_z=extras["log_z"][s] if t != 1.0 else None, value_dtype=value_dtype)
    elif name == "hybrid":
        arrays = pack_hybrid(ids, lp, tail, head_counts=extras["head_counts"][s], tail_draws=extras["tail_draws"][s],
                             tail_n=extras["tail_n"][s], vocab_size=vocab_size, k_max=top_k, bits=enc["bits"],
                             lo=enc["lo"])
    else:
        raise EncodingError(f"no encoder for {name!r}")
    specs = {sp.name: sp for sp in dist_specs(enc, vocab_size, value_dtype, top_k)}
    out = {}
    for key, values in arrays.items():
        stored = _STORED[name][key]
        spec = specs[stored]
        if spec.per_entry:
            out[stored] = values.astype(spec.storage_dtype)
        else:                                       # back to one row per token, fill where not scored
            full = np.full(n, spec.fill, dtype=spec.storage_dtype)
            full[s] = values
            out[stored] = full
    return out


def decode_rows(enc: dict, arrays: dict[str, np.ndarray], vocab_size: int) -> SparseRows | SampledRows | TargetRows:
    """A token range's stored arrays (token arrays [a, b) and their entries) -> the decoded rows."""
    name = enc["name"]
    if name in ("topk", "full"):
        return decode_topk({"ids": arrays["topk_ids"], "logprobs": arrays["topk_logprobs"]})
    inner = {k: arrays[v] for k, v in _STORED[name].items() if v in arrays}
    if name == "adaptive":
        return decode_adaptive(inner)
    if name == "compact":
        return decode_compact(inner, vocab_size=vocab_size, bits=enc["bits"], lo=enc["lo"])
    if name == "sampled":
        return decode_sampled(inner, temperature=float(enc["temperature"]), vocab_size=vocab_size)
    return decode_hybrid(inner, vocab_size=vocab_size, bits=enc["bits"], lo=enc["lo"])


def stored_names(enc: dict) -> list[str]:
    """The stored arrays ``decode_rows`` reads."""
    name = enc["name"]
    if name in ("topk", "full"):
        return ["topk_ids", "topk_logprobs"]
    names = list(dict.fromkeys(_STORED[name].values()))
    if name == "sampled" and float(enc["temperature"]) == 1.0:
        names = [n for n in names if n not in ("dist/logprobs", "dist/log_z")]
    return names
