"""Encodings of a teacher's next-token distributions: one module, one registered class each.

``encoding_from(capture.encoding)`` gives the object that knows everything about a cache's encoding
(``base.Encoding``): its parameters, arrays, device extras, encoder, decoder and capabilities. The
maths of each (``encode_*`` / ``decode_*``, array in / array out) is importable from here too; the
decoded forms are ``SparseRows``, ``SampledRows`` and ``TargetRows`` (``rows``). Choices and their
numbers: ``benchmarks/results/encodings.md``; the stored layout: docs/format.md, "Encodings".
"""

from ..errors import EncodingError
# registration, in the order the capture help lists them (each module registers its class on import)
from . import topk  # noqa: F401,I001
from . import adaptive  # noqa: F401,I001
from . import compact  # noqa: F401,I001
from . import sampled  # noqa: F401,I001
from . import hybrid  # noqa: F401,I001
from . import full  # noqa: F401,I001
from .adaptive import decode_adaptive, encode_adaptive
from .base import (DEFAULT_ENCODING, FLAGS, LEGACY_ENCODING, REGISTRY, Encoding, ExtraSpec, Param, encoding_class,
                   encoding_from, names, register, resolve_encoding)
from .coding import (delta_decode, delta_encode, max_abs_error, payload_bytes, quantization_step, select_topk,
                     unique_per_row)
from .compact import decode_compact, encode_compact
from .hybrid import decode_hybrid, encode_hybrid, pack_hybrid
from .rows import SampledRows, SparseRows, TargetRows, as_targets
from .sampled import decode_sampled, encode_sampled, pack_sampled, sample_draws
from .topk import decode_topk, encode_topk

__all__ = [
    "Encoding", "ExtraSpec", "Param", "REGISTRY", "FLAGS", "DEFAULT_ENCODING", "LEGACY_ENCODING", "register", "names",
    "encoding_class", "encoding_from",
    "resolve_encoding", "EncodingError", "SparseRows", "SampledRows", "TargetRows", "as_targets", "select_topk",
    "encode_topk", "decode_topk", "encode_adaptive", "decode_adaptive", "encode_compact", "decode_compact",
    "quantization_step", "max_abs_error", "sample_draws", "encode_sampled", "pack_sampled", "decode_sampled",
    "encode_hybrid", "pack_hybrid", "decode_hybrid", "delta_encode", "delta_decode", "unique_per_row",
    "payload_bytes",
]
