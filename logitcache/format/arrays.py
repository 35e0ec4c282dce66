"""The arrays a capture writes into a shard: the token arrays every cache has, the hidden states, and
the distribution arrays of its encoding (``encodings``). Names, specs and chunking are in ``specs``,
dtype rules in ``dtypes``; both are re-exported here."""

from __future__ import annotations

from .dtypes import bf16_bits_to_float32, count_dtype, float32_to_bf16_bits, id_dtype
from .encodings import encoding_from
from .specs import (BEHAVIOUR_LOGPROB, DIST_GROUP, ENTROPY, FULL_LOGPROBS, HIDDEN_DTYPES, HIDDEN_GROUP,
                    LOGPROB_DTYPES, TARGET_LOGPROB, TOKENS, TOPK_IDS, TOPK_LOGPROBS, ArraySpec, chunk_rows,
                    token_spec)

__all__ = [
    "ArraySpec", "array_specs", "chunk_rows", "absolute_layer", "hidden_name", "id_dtype", "count_dtype",
    "bf16_bits_to_float32", "float32_to_bf16_bits", "TOKENS", "TOPK_IDS", "TOPK_LOGPROBS", "ENTROPY",
    "TARGET_LOGPROB", "BEHAVIOUR_LOGPROB", "FULL_LOGPROBS", "HIDDEN_GROUP", "DIST_GROUP", "LOGPROB_DTYPES",
    "HIDDEN_DTYPES",
]


def absolute_layer(layer: int, num_layers: int) -> int:
    """Hidden-state numbering (Hugging Face ``hidden_states``): -1 is layer ``num_layers``, the final
    hidden state after the norm; negative layers count back from it. Not range-checked."""
    return layer + num_layers + 1 if layer < 0 else layer


def hidden_name(layer: int) -> str:
    return f"{HIDDEN_GROUP}/{layer}"


def array_specs(vocab_size: int, top_k: int, logprob_dtype: str, hidden_layers: list[int],
                hidden_size: int, hidden_dtype: str, encoding: dict | None = None,
                behaviour: bool = False) -> dict[str, ArraySpec]:
    """The arrays a capture with these settings writes, in storage order: ``tokens``, the encoding's
    distribution arrays (``encoding``: the recorded ``capture.encoding``; None = topk), ``entropy``,
    ``target_logprob``, ``behaviour_logprob`` when ``behaviour`` (1.4: score inputs that carry the
    sampling policy's log-probabilities), then the hidden layers."""
    nan = float("nan")
    ids = id_dtype(vocab_size)
    specs = [token_spec(TOKENS, ids, True, "token id at this position")]
    specs += encoding_from(encoding).specs(vocab_size, logprob_dtype, top_k)
    specs += [
        token_spec(ENTROPY, "float32", True, "exact entropy in nats of the full-vocabulary next-token distribution",
                   nan),
        token_spec(TARGET_LOGPROB, "float32", True, "log-probability of the actual next token tokens[j+1]", nan),
    ]
    if behaviour:
        specs.append(token_spec(BEHAVIOUR_LOGPROB, "float32", True,
                                "log-probability of tokens[j+1] under the policy that sampled the response (as given)",
                                nan))
    for layer in hidden_layers:
        storage = "uint16" if hidden_dtype == "bfloat16" else hidden_dtype
        specs.append(ArraySpec(hidden_name(layer), hidden_dtype, storage, (hidden_size,), 0, hidden_dtype == "float32",
                               f"hidden state at this position, layer index {layer} (0 = embeddings)"))
    return {s.name: s for s in specs}
