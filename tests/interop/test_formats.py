"""Every registered foreign format runs the conformance class (tests/interop/conformance.py), reading its
files back the way the tool does: DistillKit's parquet decoded row by row with the codec (itself checked
against hand-made bytes in test_distillkit_codec.py), axolotl's columns as its KD collator and loss align
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from logitcache.interop import REGISTRY
from logitcache.interop.distillkit_codec import CompressionConfig, decompress_logprobs, unpack_bits

from tests.interop.conformance import FormatTests, ImportTests


def test_every_registered_format_has_a_conformance_class():
    assert {c.format_name for c in (TestDistillKit, TestAxolotl)} == set(REGISTRY)


class TestDistillKit(FormatTests, ImportTests):
    format_name = "distillkit"
    bad_options = [(dict(top_k=0), "--top-k must be at least 1"),
                   (dict(top_k=64), "k = 64 is more than the 8 entries a row of .* holds"),
                   (dict(compression_config="nowhere.yaml"), "nowhere.yaml: no such compression config")]

    def k_of(self, report) -> int:
        return report.options["compression_config"]["k"]

    def trains_empty_rows(self, valid):
        return valid.any(axis=1)          # a scored row without entries gets the masked placeholder

    def read(self, out: Path) -> dict:
        cfg = CompressionConfig.from_dict(yaml.safe_load((out / "compression_config.yaml").read_text()))
        res = {}
        for f in sorted(out.glob("data_*.parquet")):
            for row, r in enumerate(pq.read_table(f).to_pylist()):
                tokens = np.array(r["input_ids"], dtype=np.int64)
                t = len(tokens)
                assert len(r["compressed_logprobs"]) == len(r["bytepacked_indices"]) == t - 1   # the capture's shape
                ids = np.full((t, cfg.k), -1, dtype=np.int64)
                values = np.full((t, cfg.k), np.nan, dtype=np.float32)
                if t > 1:
                    ids[:-1] = unpack_bits(np.array(r["bytepacked_indices"], dtype=np.uint8), cfg.index_bits, cfg.k)
                    values[:-1] = decompress_logprobs(np.array(r["compressed_logprobs"], dtype=np.uint8), cfg)
                labels = np.array(r["labels"])
                trained = (labels != -100) & (np.arange(t) < t - 1)         # DistillKit's mask of row j: labels[j]
                np.testing.assert_array_equal(labels[trained], tokens[trained])
                res[(f.name, row)] = {"tokens": tokens, "ids": ids, "values": values, "trained": trained}
        return res

    def tolerance(self, expected, options, report):
        """The exact values: bfloat16's rounding (2^-8 relative); the polynomial's: what the export reports
        as its largest error (so the report is honest), itself at most 0.2 nats on these smooth curves."""
        cfg = report.options["compression_config"]
        approx = report.checks["approximated_values"]["max_abs_error"]
        assert approx <= 0.2
        col = np.arange(expected.shape[1])[None, :]
        return np.where(col < cfg["exact_k"], np.abs(expected) * 2.0 ** -8, approx + 1e-6)

    def corrupt(self, out: Path) -> str:
        path = out / "data_1.parquet"
        table = pq.read_table(path)
        rows = table.column("compressed_logprobs").to_pylist()
        rows[1][0] = rows[1][0][:-1]
        pq.write_table(table.set_column(1, "compressed_logprobs", pa.array(rows, table.schema.field(1).type)), path)
        return r"data_1.parquet row 1, position 0: compressed_logprobs has 15 bytes, the compression config .* says 16"


class TestAxolotl(FormatTests):
    format_name = "axolotl"
    bad_options = [(dict(top_k=0), r"--top-k must be in 1..8"), (dict(top_k=9), r"--top-k must be in 1..8"),
                   (dict(kd_temperature=0.0), "--kd-temperature must be above 0")]

    def k_of(self, report) -> int:
        return report.options["top_k"]

    def read(self, out: Path) -> dict:
        res = {}
        for f in sorted(out.glob("data_*.parquet")):
            for row, r in enumerate(pq.read_table(f).to_pylist()):
                tokens = np.array(r["input_ids"], dtype=np.int64)
                t = len(tokens)
                assert r["attention_mask"] == [1] * t and r["position_ids"] == list(range(t))
                mask = np.array(r["target_mask"], dtype=bool).reshape(t, -1)
                ids = np.where(mask, np.array(r["target_token_ids"]).reshape(t, -1), -1)
                lp = np.array(r["target_logprobs"], dtype=np.float32).reshape(t, -1)
                assert (lp[~mask] == -1e9).all()                               # the collator's own padding
                # axolotl's loss: KD at position j against target row j; cross-entropy at j against labels[j + 1]
                ce = np.concatenate([np.array(r["labels"])[1:], [-100]])
                trained = ce != -100
                np.testing.assert_array_equal(ce[trained], tokens[1:][trained[:-1]])
                assert not (mask.any(1) & ~trained).any(), "a distilled row whose next token is not trained"
                res[(f.name, row)] = {"tokens": tokens, "ids": ids, "values": np.where(mask, lp, np.nan),
                                      "trained": trained}
        return res

    def expected(self, lp, valid, options):
        t = options.get("kd_temperature", 1.0)
        z = np.where(valid, lp.astype(np.float64) / t, -np.inf)
        with np.errstate(invalid="ignore", divide="ignore"):
            return z - np.log(np.exp(z).sum(1, keepdims=True))

    def tolerance(self, expected, options, report):
        return np.abs(expected) * 2.0 ** -23 + 1e-6                       # float32 storage


class TestAxolotlAtATemperature(TestAxolotl):
    export_options = {"kd_temperature": 2.0}
