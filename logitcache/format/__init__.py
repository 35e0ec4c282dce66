"""The cache format: the public contract. Imports nothing else of logitcache (numpy, pyarrow only)."""

from .arrays import ArraySpec, array_specs, bf16_bits_to_float32, id_dtype
from .errors import (ConfigMismatchError, CorruptCacheError, CorruptManifestError, CorruptShardError, FormatError,
                     InputError, LogitcacheError)
from .fingerprint import cache_fingerprint
from .manifest import (CaptureConfig, DerivedFile, DerivedTable, InputSpec, Manifest, PartInfo, Provenance,
                       ShardRecord, SkipRecord, TeacherInfo, TokenizerInfo)
from .samples import POSITIONS_COLUMNS, SAMPLE_COLUMNS, SAMPLES_SCHEMA, sample_id, samples_schema
from .version import FORMAT_NAME, FORMAT_VERSION

__all__ = [
    "ArraySpec", "array_specs", "bf16_bits_to_float32", "id_dtype", "ConfigMismatchError", "CorruptShardError",
    "CorruptCacheError", "CorruptManifestError",
    "FormatError", "InputError", "LogitcacheError", "CaptureConfig", "InputSpec", "Manifest", "PartInfo",
    "ShardRecord", "SkipRecord", "TeacherInfo", "TokenizerInfo", "SAMPLE_COLUMNS", "SAMPLES_SCHEMA", "POSITIONS_COLUMNS", "sample_id",
    "samples_schema",
    "FORMAT_NAME", "FORMAT_VERSION", "cache_fingerprint", "DerivedFile", "DerivedTable", "Provenance",
]
