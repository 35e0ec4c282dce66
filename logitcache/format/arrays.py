"""The arrays a capture writes into a shard: the token arrays every cache has, the hidden states, and
the distribution arrays of its encoding (``encodings``). Names, specs and chunking are in ``specs``,
dtype rules in ``dtypes``; both are re-exported here."""

from __future__ import annotations

from .dtypes import bf16_bits_to_float32, count_dtype, float32_to_bf16_bits, id_dtype
from .encodings import encoding_from
from .specs import (SELECTED, ATTENTION_GROUP, BEHAVIOUR_LOGPROB, DIST_GROUP, ENTROPY, FULL_LOGPROBS, HIDDEN_DTYPES, HIDDEN_GROUP,
                    LOGPROB_DTYPES, TARGET_LOGPROB, TOKENS, TOPK_IDS, TOPK_LOGPROBS, ArraySpec, chunk_rows,
                    token_spec)

__all__ = [
    "ArraySpec", "array_specs", "chunk_rows", "absolute_layer", "hidden_name", "id_dtype", "count_dtype",
    "bf16_bits_to_float32", "float32_to_bf16_bits", "TOKENS", "TOPK_IDS", "TOPK_LOGPROBS", "ENTROPY",
    "TARGET_LOGPROB", "BEHAVIOUR_LOGPROB", "SELECTED", "FULL_LOGPROBS", "HIDDEN_GROUP", "DIST_GROUP", "LOGPROB_DTYPES",
    "HIDDEN_DTYPES", "ATTENTION_GROUP", "attention_name", "attention_layers",
]


def absolute_layer(layer: int, num_layers: int) -> int:
    """Hidden-state numbering (Hugging Face ``hidden_states``): -1 is layer ``num_layers``, the final
    hidden state after the norm; negative layers count back from it. Not range-checked."""
    return layer + num_layers + 1 if layer < 0 else layer


def hidden_name(layer: int) -> str:
    return f"{HIDDEN_GROUP}/{layer}"


def attention_name(block: int, part: str) -> str:
    """``attn/<block>_q`` or ``attn/<block>_k`` (1.5): decoder block ``block``'s queries or keys."""
    return f"{ATTENTION_GROUP}/{block}_{part}"


def attention_layers(specs) -> list[int]:
    """The decoder blocks whose queries and keys a cache stores (its ``attn/<block>_q`` arrays), ascending."""
    return sorted(int(n.split("/")[1][:-2]) for n in specs if n.startswith(ATTENTION_GROUP + "/") and n.endswith("_q"))


def array_specs(vocab_size: int, top_k: int, logprob_dtype: str, hidden_layers: list[int],
                hidden_size: int, hidden_dtype: str, encoding: dict | None = None,
                behaviour: bool = False, attention: dict[int, tuple[int, int, int]] | None = None,
                selected: bool = False) -> dict[str, ArraySpec]:
    """The arrays a capture with these settings writes, in storage order: ``tokens``, the encoding's
    distribution arrays (``encoding``: the recorded ``capture.encoding``; None = topk), ``entropy``,
    ``target_logprob``, ``behaviour_logprob`` when ``behaviour`` (1.4: score inputs that carry the
    sampling policy's log-probabilities), the hidden layers, then (1.5) per decoder block of
    ``attention`` ({block: (query heads, KV heads, head_dim)}) its queries and keys in ``hidden_dtype``;
    (1.6) ``selected`` when the capture stored the distribution on chosen rows only (--positions-from)."""
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
    if selected:
        specs.append(token_spec(SELECTED, "uint8", True, "1 where the teacher's distribution is stored on this row, 0 "
                                "where the capture left it out (--positions-from): such a row has no entries"))
    for layer in hidden_layers:
        storage = "uint16" if hidden_dtype == "bfloat16" else hidden_dtype
        specs.append(ArraySpec(hidden_name(layer), hidden_dtype, storage, (hidden_size,), 0, hidden_dtype == "float32",
                               f"hidden state at this position, layer index {layer} (0 = embeddings)"))
    storage = "uint16" if hidden_dtype == "bfloat16" else hidden_dtype
    for block, (heads, kv_heads, head_dim) in sorted((attention or {}).items()):
        for part, n, what in (("q", heads, "queries"), ("k", kv_heads, "keys")):
            specs.append(ArraySpec(attention_name(block, part), hidden_dtype, storage, (n, head_dim), 0,
                                   hidden_dtype == "float32",
                                   f"attention {what} of decoder block {block} at this position, per head, after the "
                                   "rotary embedding (softmax(q k^T / sqrt(head_dim)) over a sample's earlier "
                                   "positions is the block's attention)"))
    return {s.name: s for s in specs}
