"""The format's name and version, and the rule for which versions a reader accepts.

Policy (docs/format.md, "Versioning"): a MINOR bump only adds (new optional arrays, columns or
manifest fields that old readers may ignore); a MAJOR bump changes the meaning or layout of
something that exists. Readers accept every minor version of their own major.
"""

from .errors import FormatError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = "1.6"

# What each minor version added (docs/format.md, "Versioning"). 1.0 readers read 1.1 caches: they
# ignore the manifest sections below and never look under derived/.
MINOR_ADDITIONS = {
    "1.1": "manifest sections `derived` (materialised per-sample and per-token tables under derived/) "
           "and `provenance` (where an exported cache came from); cache fingerprint; selection files",
    "1.2": "`capture.encoding` and the `dist/` arrays of the adaptive, compact, sampled, hybrid and full "
           "encodings (entry arrays with an `index`); a 1.1 reader reads topk caches of 1.2 and must refuse "
           "others (they have no topk_ids)",
    "1.3": "integrity: a crc32c codec after the compressor of every array, shard records' `metadata_checksum` "
           "and `samples_checksum`, Parquet page checksums, the manifest's own `checksum`, inputs' `content`; "
           "fingerprint recipe 2 (covers capture.encoding and the array specs); names that become paths "
           "follow fixed patterns. 1.2 readers read 1.3 caches (zarr-python verifies the crc32c codec)",
    "1.4": "`behaviour_logprob` array, score inputs as token ids, manifest `rollout` (on-policy rounds); "
           "1.3 readers read 1.4 caches: they ignore both",
    "1.5": "`attn/<block>_q` and `attn/<block>_k` arrays (attention queries and keys per head, after the rotary "
           "embedding: attention transfer); 1.4 readers read 1.5 caches and ignore them",
    "1.6": "caches imported from another tool (`logitcache import`): `provenance.imported_from`, and arrays whose "
           "spec says `exact: false` (entropy NaN on every row where a top-k cannot give it); and positions chosen "
           "before storing (capture --positions-from): the `selected` array, the manifest section `positions` "
           "and the samples columns `positions_rule`, `positions_kept`, `positions_share`, the teacher's distribution stored on chosen rows only. 1.5 readers read 1.6 caches: they ignore the new "
           "fields; left-out rows of ragged encodings have no entries (no distribution, as they already read them), "
           "those of topk and full hold NaN log-probabilities, which their loss refuses by name: never silently wrong",
}


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor = text.split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        raise FormatError(f"format_version {text!r} is not of the form MAJOR.MINOR") from None


def at_least(text: str, minimum: str) -> str:
    """The later of two versions of one major (a manifest that gains a 1.1 section becomes 1.1)."""
    return max(text, minimum, key=parse_version)


def check_readable(text: str, where: str) -> None:
    """Refuse a cache whose major version this code does not know."""
    major, _ = parse_version(text)
    ours, _ = parse_version(FORMAT_VERSION)
    if major != ours:
        raise FormatError(
            f"{where}: format_version {text} is not readable by this logitcache "
            f"(reads {ours}.x); install a logitcache release that reads {major}.x"
        )
