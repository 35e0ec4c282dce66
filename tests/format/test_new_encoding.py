"""Adding an encoding is one module: this one. ``codes_topk``, registered here at test time only,
stores the k most probable ids as they are with uint8 log-scale codes and the exact tail, fixed width
(not ragged); the conformance class then holds it to everything the built-in encodings satisfy, from
the round trip to a captured cache, the loader, the losses, export and training. Its "entry in
docs/format.md" is ``read_codes_topk`` below: the zarr + numpy reader a user would be given."""

import numpy as np
import pytest

from logitcache.format.dtypes import id_dtype
from logitcache.format.encodings import REGISTRY, Encoding, Param, SparseRows, register
from logitcache.format.encodings.base import dist, inner
from logitcache.format.specs import token_spec
from tests.format.conformance import EncodingTests

LO = -32.0


class CodesTopK(Encoding):
    """k ids per token as they are, log-probs as ``bits``-bit codes on [LO, 0], the exact tail."""

    name = "codes_topk"
    params = (Param("bits", 8, "--bits", lambda b: None if b in (8, 16) else "must be 8 or 16"),)
    default_top_k = 8
    ragged = False
    stores_tail = True
    summary = "k ids + 8-bit log-scale codes + exact tail (a test-only encoding)"

    def step(self) -> float:
        return -LO / (2 ** self["bits"] - 1)

    def specs(self, vocab_size, logprob_dtype, top_k):
        ids = id_dtype(vocab_size)
        codes = "uint8" if self["bits"] == 8 else "uint16"
        return [token_spec(dist("ids"), ids, True, "the k most probable ids, rank order", 0, (top_k,)),
                token_spec(dist("codes"), codes, False, f"log-prob = {LO} + code * step", 0, (top_k,)),
                token_spec(dist("tail"), "float32", True, "exact mass outside the ids", float("nan"))]

    def value_tolerance(self, value_dtype):
        return self.step() / 2, 0.0

    def extras(self, top_k, vocab_size):
        from logitcache.format.encodings.adaptive import TAIL_EXTRA

        return [TAIL_EXTRA]

    def encode(self, top_k, vocab_size, ids, logprobs, tail, extras, value_dtype):
        codes = np.rint((np.clip(logprobs[:, :top_k], LO, 0.0) - LO) / self.step())
        rest = np.exp(logprobs[:, top_k:].astype(np.float64)).sum(1)
        return {dist("ids"): ids[:, :top_k], dist("codes"): codes, dist("tail"): tail + rest}

    def decode(self, arrays, vocab_size):
        a = inner(arrays)
        n, k = a["ids"].shape
        lp = LO + a["codes"].astype(np.float64) * self.step()
        return SparseRows(a["ids"].reshape(-1).astype(np.int64), lp.reshape(-1).astype(np.float32),
                          np.full(n, k, dtype=np.int64), a["tail"].astype(np.float32))


def read_codes_topk(manifest, g, j):
    """The teacher's distribution at token row j with zarr + numpy alone: (ids, probs, tail)."""
    bits = manifest["capture"]["encoding"]["bits"]
    lp = LO + g["dist/codes"][j].astype(np.float64) * (-LO / (2 ** bits - 1))
    return g["dist/ids"][j].astype(np.int64), np.exp(lp), float(g["dist/tail"][j])


class TestEncodingCodesTopK(EncodingTests):
    encoding_name = "codes_topk"
    capture_flags = dict(top_k=6)
    bad_flags = [(dict(bits=12), "--bits must be 8 or 16"), (dict(draws=3), "--draws applies to")]
    reader = staticmethod(read_codes_topk)
    in_docs = False

    @pytest.fixture(scope="class", autouse=True)
    def registered(self):
        register(CodesTopK)
        yield
        del REGISTRY[CodesTopK.name]


def test_it_is_registered_only_while_its_tests_run():
    assert "codes_topk" not in REGISTRY
