"""The conformance class every encoding runs (zarr's ``StoreTests`` is the model): subclass
``EncodingTests``, set ``encoding_name`` (and the capture flags a small test wants), and the encoding
is held to everything the rest of logitcache assumes of it:

- its parameters resolve, survive the manifest, and a bad value is an error naming its flag;
- encode -> decode on distributions made by the device producers is exact within the encoding's
  ``value_tolerance`` (exact encodings: the most probable ids, their values, the exact tail) or
  unbiased (estimated encodings: the cross-entropy against random students, z-tested over many
  independent replicas of the same rows);
- on a cache captured from a tiny teacher: the manifest's specs are the written arrays; the reader
  of docs/format.md (zarr + numpy alone) gives what ``Cache.sample_view`` gives; the loader's targets
  are the decoded rows; the loss on them matches a dense float64 computation (value and gradient);
  export copies it bit for bit; a student trains on it; docs/format.md's table lists it.

``tests/format/test_encoding_conformance.py`` makes one subclass per registered encoding, so a new
encoding runs all of this the moment it is registered.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pytest
import torch
import zarr

from logitcache import open_cache
from logitcache.format.encodings import REGISTRY, EncodingError, SparseRows, TargetRows, as_targets, encoding_class
from logitcache.format.encodings import encoding_from
from logitcache.format.errors import LogitcacheError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "format.md"
V = 512                      # the synthetic vocabulary
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Water boils at 100 degrees Celsius at sea level.",
    "Once upon a time there was a small robot who loved to paint.",
    "Seven times eight is fifty-six.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


def docs_block(containing: str) -> str:
    """The python block of docs/format.md that contains ``containing``."""
    blocks = [b.split("```", 1)[0] for b in DOCS.read_text().split("```python\n")[1:]]
    (block,) = [b for b in blocks if containing in b]
    return block


def run_docs_reader(root: str, distribution: bool = True) -> dict[str, Any]:
    """docs/format.md's "Reading without logitcache" blocks, run as written on the cache at ``root``
    (the second, the decoder of every encoding, if ``distribution``): their names (``manifest``, ``g``,
    ``s``, ``tokens``, ``entropy``, ``distribution``, ``ids``, ``probs``, ``tail``)."""
    ns: dict[str, Any] = {}
    exec(docs_block("root = \"cache\"").replace('root = "cache"', f"root = {root!r}"), ns)
    if distribution:
        exec(docs_block("def distribution("), ns)
    return ns


def synthetic_logp(n: int, seed: int) -> torch.Tensor:
    """(n, V) float32 log-probs: peaked heads, long tails, a few rows of near-uniform mass."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 6 + 0.05
    logits = torch.randn(n, V, generator=g) * scale
    return torch.log_softmax(logits, -1)


def encode_decode(enc, logp: torch.Tensor, top_k: int, scored: np.ndarray, seed: int, value_dtype="float16"):
    """The capture path on given log-probs: device stats and extras, encode_rows, decode."""
    from logitcache.teacher.distribution import distribution_extras, distribution_stats, row_keys

    ids, vals, _ = distribution_stats(logp, top_k)
    keys = row_keys(torch.full((logp.shape[0],), seed), torch.arange(logp.shape[0]))     # a sample's rows
    extras = distribution_extras(logp, ids, vals, enc, keys)
    arrays = enc.encode_rows(top_k, V, ids.numpy(), vals.numpy(), {k: v.numpy() for k, v in extras.items()},
                             scored, value_dtype)
    return arrays, enc.decode(arrays, V), ids.numpy()


def dense_targets(rows, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Decoded rows -> (N, v) float64 target weights over the vocabulary and (N,) tail masses (the
    exact mass outside the ids for sparse rows, NaN for estimates)."""
    t = as_targets(rows)
    out = np.zeros((t.num_tokens if hasattr(t, "num_tokens") else len(t.counts), v))
    tok = np.repeat(np.arange(len(t.counts)), t.counts)
    if isinstance(t, SparseRows):
        np.add.at(out, (tok, t.ids), np.exp(t.logprobs.astype(np.float64)))
        return out, t.tail_mass()
    np.add.at(out, (tok, t.ids), t.targets)
    return out, np.full(len(t.counts), np.nan)


class EncodingTests:
    """Subclass with ``encoding_name`` set. ``capture_flags``: CaptureJob fields of the small capture
    (top_k, keep_mass, bits, draws, proposal_temperature); ``reader``: the zarr + numpy reader of the
    encoding (None: docs/format.md's ``distribution``); ``in_docs``: whether docs/format.md must list it."""

    encoding_name: ClassVar[str]
    capture_flags: ClassVar[dict] = {}
    bad_flags: ClassVar[list[tuple[dict, str]]] = []     # (CaptureJob fields, the error's words)
    reader: ClassVar[Callable | None] = None
    in_docs: ClassVar[bool] = True

    # ---- the encoding object --------------------------------------------------------------------
    @property
    def cls(self):
        return encoding_class(self.encoding_name)

    def enc(self):
        from logitcache.teacher.capture import CaptureJob, job_encoding

        return job_encoding(CaptureJob(cache="x", encoding=self.encoding_name, **self._encoding_flags()))

    def _encoding_flags(self) -> dict:
        return {k: v for k, v in self.capture_flags.items() if k != "top_k"}

    @property
    def top_k(self) -> int:
        return self.capture_flags.get("top_k", self.cls.default_top_k)

    def test_registered_by_its_name(self):
        assert REGISTRY[self.encoding_name] is self.cls
        assert self.cls.name == self.encoding_name

    def test_params_resolve_and_survive_the_manifest(self):
        enc = self.enc()
        rec = json.loads(json.dumps(enc.to_dict()))             # as capture.encoding records it
        assert rec["name"] == self.encoding_name and set(rec) == {"name", *(p.name for p in self.cls.params)}
        back = encoding_from(rec)
        assert type(back) is self.cls and back == enc and back.to_dict() == rec
        assert encoding_from(self.encoding_name) == self.cls()           # defaults
        for p in self.cls.params:
            assert p.check(p.default) is None, f"default of {p.name} fails its own check"

    def test_bad_parameters_name_their_flag(self):
        from logitcache.teacher.capture import CaptureJob, validate

        for fields, words in self.bad_flags:
            with pytest.raises(LogitcacheError, match=words):
                validate(CaptureJob(cache="x", encoding=self.encoding_name, **fields))
        others = [p for e in REGISTRY.values() if e is not self.cls for p in e.params
                  if p.flag and p.name not in {q.name for q in self.cls.params}]
        for p in others[:1]:                     # a parameter of another encoding only: refused, named
            with pytest.raises(EncodingError, match=f"{p.flag} applies to --encoding .*, not {self.encoding_name}"):
                self.cls.resolve(**{p.name: p.default})

    def test_specs_are_consistent(self):
        enc = self.enc()
        specs = enc.specs(V, "float16", self.top_k)
        names = [s.name for s in specs]
        assert len(set(names)) == len(names)
        assert set(enc.stored_names()) <= set(names)
        for s in specs:
            if s.per_entry:
                assert s.index in names, f"{s.name}: its index {s.index} is not one of the encoding's arrays"
                (index,) = [x for x in specs if x.name == s.index]
                assert not index.per_entry and index.row_shape == ()
        assert enc.width(self.top_k) >= 1
        for e in enc.extras(self.top_k, V):
            from logitcache.teacher.distribution import PRODUCERS

            assert e.producer in PRODUCERS, f"extra {e.name}: no device producer {e.producer!r}"

    # ---- encode -> decode ------------------------------------------------------------------------
    def test_round_trip(self):
        enc = self.enc()
        k = self.top_k
        logp = synthetic_logp(48, seed=3)
        scored = np.ones(48, dtype=bool)
        scored[[0, 17, 47]] = False                       # rows outside the scored rows: no distribution
        arrays, rows, cand = encode_decode(enc, logp, k, scored, seed=1)
        specs = {s.name: s for s in enc.specs(V, "float16", k)}
        assert set(arrays) == set(specs)
        for name, a in arrays.items():
            assert a.dtype == np.dtype(specs[name].storage_dtype), name
            if not specs[name].per_entry:
                assert a.shape == (48, *specs[name].row_shape), name
        assert rows.num_tokens == 48
        t = as_targets(rows)
        assert (t.counts[~scored] == 0).all() or not enc.ragged
        if enc.estimated:
            assert isinstance(t, TargetRows)
            assert ((t.ids >= 0) & (t.ids < V)).all()
            return                                          # values: test_estimates_are_unbiased
        assert isinstance(rows, SparseRows)
        assert (rows.tail is not None) == enc.stores_tail, "stores_tail does not say what decode gives"
        p = logp.double().numpy()
        atol, rtol = enc.value_tolerance("float16")
        off = rows.offsets
        for i in np.flatnonzero(scored):
            ids = rows.ids[off[i]:off[i + 1]]
            lp = rows.logprobs[off[i]:off[i + 1]].astype(np.float64)
            assert len(ids) >= 1 and len(set(ids.tolist())) == len(ids), f"row {i}"
            # the most probable ids (a prefix of the exact top-k), in rank order
            assert set(ids.tolist()) == set(cand[i, :len(ids)].tolist()), f"row {i}: not the most probable ids"
            assert (np.diff(lp) <= 0).all(), f"row {i}: not in rank order"
            exact = p[i, ids]
            assert (np.abs(lp - exact) <= atol + rtol * np.abs(exact) + 1e-7).all(), f"row {i}: values"
            if rows.tail is not None:            # the exact mass outside the ids
                outside = 1 - np.exp(exact).sum()
                assert rows.tail[i] == pytest.approx(max(outside, 0.0), abs=2e-6), f"row {i}: tail"

    def test_estimates_are_unbiased(self):
        enc = self.enc()
        if not enc.estimated:
            pytest.skip(f"{self.encoding_name} stores no estimates: its values are held by test_round_trip")
        base = synthetic_logp(6, seed=5)
        reps = 400
        logp = base.repeat(reps, 1)                              # independent draws for each replica
        _, rows, _ = encode_decode(enc, logp, self.top_k, np.ones(len(logp), dtype=bool), seed=2)
        t, _ = dense_targets(rows, V)
        t = t.reshape(reps, 6, V)
        p = base.double().exp().numpy()
        g = np.random.default_rng(0)
        atol, rtol = enc.value_tolerance("float16")
        for trial in range(3):                  # CE against random students, and the total mass
            logq = torch.log_softmax(torch.randn(6, V, generator=torch.Generator().manual_seed(trial)) * 2,
                                     -1).double().numpy()
            for f in (-logq, np.ones_like(logq) * g.random()):
                est = (t * f).sum(-1)                            # (reps, 6)
                exact = (p * f).sum(-1)
                se = est.std(0, ddof=1) / math.sqrt(reps)
                bias = math.expm1(2 * (atol + rtol * 16)) * (p * np.abs(f)).sum(-1)   # value rounding
                assert (np.abs(est.mean(0) - exact) <= 5 * se + bias + 1e-9).all(), \
                    f"biased: {est.mean(0) - exact} (se {se})"

    # ---- a captured cache ------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def captured(self, tmp_path_factory, tiny_teacher):
        from logitcache.teacher.capture import CaptureJob, run_capture

        root = tmp_path_factory.mktemp(f"conformance-{self.encoding_name}")
        src = root / "texts.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        run_capture(CaptureJob(cache=str(root / "cache"), teacher=str(tiny_teacher), source=str(src), mode="score",
                               backend="hf", progress=False, samples_per_shard=4, batch_tokens=64,
                               encoding=self.encoding_name, **self.capture_flags))
        return root

    def test_captured_specs_are_the_written_arrays(self, captured):
        cache = open_cache(str(captured / "cache"), verify=True)
        m = cache.manifest
        assert m.capture.encoding == self.enc().to_dict()
        specs = {s.name: s for s in self.enc().specs(m.teacher.vocab_size, m.capture.logprob_dtype, m.capture.top_k)}
        assert {n: m.arrays[n].to_dict() for n in specs} == {n: s.to_dict() for n, s in specs.items()}
        for shard in cache.shards:
            g = zarr.open_group(str(captured / "cache" / "shards" / shard.name / "arrays.zarr"), mode="r")
            for name, spec in m.arrays.items():
                a = g[name]
                assert a.dtype == np.dtype(spec.storage_dtype), name
                assert a.shape[1:] == spec.row_shape, name
                rows = int(np.asarray(g[spec.index][...], dtype=np.int64).sum()) if spec.per_entry else shard.tokens
                assert a.shape[0] == rows, name

    def test_docs_reader_gives_the_decoded_view(self, captured):
        root = str(captured / "cache")
        cache = open_cache(root)
        ns = run_docs_reader(root, distribution=type(self).reader is None)
        read, manifest = type(self).reader or ns["distribution"], ns["manifest"]
        first = cache.sample(ns["s"]["sample_id"])              # what the blocks read, as logitcache reads it
        np.testing.assert_array_equal(ns["tokens"], first["tokens"])
        np.testing.assert_array_equal(ns["entropy"], first["entropy"])
        if "probs" in ns:
            j = ns["s"]["scored_start"]
            np.testing.assert_allclose(np.sort(ns["probs"]), np.sort(cache.sample_view(ns["s"]["sample_id"])["probs"][j][
                cache.sample_view(ns["s"]["sample_id"])["ids"][j] >= 0]), rtol=2e-6)
        checked = 0
        for rec in cache.samples.to_pylist()[:3]:
            view = cache.sample_view(rec["sample_id"])
            g = zarr.open_group(f"{root}/shards/{rec['shard']}/arrays.zarr", mode="r")
            for t in range(rec["scored_start"], rec["scored_end"]):
                ids, probs, tail = read(manifest, g, rec["token_offset"] + t)
                want = view["ids"][t] >= 0
                a, b = np.argsort(ids, kind="stable"), np.argsort(view["ids"][t][want], kind="stable")
                np.testing.assert_array_equal(np.asarray(ids)[a], view["ids"][t][want][b])
                np.testing.assert_allclose(np.asarray(probs)[a], view["probs"][t][want][b], rtol=2e-6, atol=1e-8)
                np.testing.assert_allclose(tail, view["tail"][t], rtol=2e-6, atol=1e-7, equal_nan=True)
                checked += 1
        assert checked >= 15
        assert bool(view["estimated"]) == self.enc().estimated

    def test_loader_yields_the_decoded_rows(self, captured):
        from student_train.data import CacheStream
        from student_train.targets import EstimatedTargets, SparseTargets

        cache = open_cache(str(captured / "cache"))
        stream = CacheStream(cache, seq_len=32, batch_size=2, shuffle=False, prefetch=0)
        width = self.enc().width(cache.manifest.capture.top_k)
        records = {r["sample_id"]: r for r in cache.samples.to_pylist()}
        seen = 0
        for batch in stream:
            teacher = batch["teacher"]
            assert isinstance(teacher, EstimatedTargets if self.enc().estimated else SparseTargets)
            assert teacher.ids.shape[-1] == width
            for b in range(batch["input_ids"].shape[0]):
                for s in np.unique(batch["sample_index"][b].numpy()):
                    if s < 0:
                        continue
                    sid = stream.sample_id(int(s))
                    view, rec = cache.sample_view(sid), records[sid]
                    pos = (batch["sample_index"][b] == s) & batch["loss_mask"][b]
                    rows = slice(rec["scored_start"], rec["scored_end"])
                    assert int(pos.sum()) == rows.stop - rows.start
                    got_ids = teacher.ids[b][pos].numpy()
                    want_ids, want_p = view["ids"][rows], view["probs"][rows]
                    w = want_ids.shape[1]
                    assert w <= width
                    if self.enc().ragged:
                        assert (got_ids[:, w:] == -1).all()
                    np.testing.assert_array_equal(got_ids[:, :w], want_ids)
                    if isinstance(teacher, SparseTargets):
                        got_p = np.exp(teacher.logprobs[b][pos].numpy().astype(np.float64))[:, :w]
                        if teacher.tail is not None:
                            np.testing.assert_allclose(teacher.tail[b][pos].numpy(), view["tail"][rows], rtol=1e-6)
                    else:
                        got_p = teacher.targets[b][pos].numpy()[:, :w]
                    np.testing.assert_allclose(got_p, want_p, rtol=2e-6, atol=1e-8)
                    seen += 1
        assert seen == cache.manifest.num_samples

    def test_losses_match_a_dense_computation(self, captured):
        from student_train.data import CacheStream
        from student_train.losses import DistillationConfig
        from student_train.objective import teacher_loss
        from student_train.targets import SparseTargets

        cache = open_cache(str(captured / "cache"))
        vocab = cache.manifest.teacher.vocab_size
        batch = next(iter(CacheStream(cache, seq_len=32, batch_size=1, shuffle=False, prefetch=0)))
        teacher, mask = batch["teacher"], batch["loss_mask"]
        B, T = mask.shape
        z0 = torch.randn(B, T, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
        # the teacher's dense targets at every loss position, from the decoded view
        stream = CacheStream(cache, seq_len=32)
        records = {r["sample_id"]: r for r in cache.samples.to_pylist()}
        target = torch.zeros(B, T, vocab, dtype=torch.float64)
        tail = torch.full((B, T), float("nan"), dtype=torch.float64)
        for b in range(B):
            for s in np.unique(batch["sample_index"][b].numpy()):
                if s < 0:
                    continue
                sid = stream.sample_id(int(s))
                v, rec = cache.sample_view(sid), records[sid]
                pos = torch.nonzero((batch["sample_index"][b] == s) & mask[b]).flatten()
                for row, t in zip(range(rec["scored_start"], rec["scored_end"]), pos.tolist()):
                    ok = v["ids"][row] >= 0
                    target[b, t, torch.from_numpy(v["ids"][row][ok])] = torch.from_numpy(
                        v["probs"][row][ok].astype(np.float64))
                    tail[b, t] = float(v["tail"][row])
        kinds = ["forward_kl", "reverse_kl"] if isinstance(teacher, SparseTargets) else ["forward_kl"]
        for kind in kinds:
            z = z0.clone().requires_grad_()
            got = teacher_loss(z, teacher, mask.double(), DistillationConfig(kind=kind, chunk_rows=16))
            got.backward()
            zd = z0.clone().requires_grad_()
            ref = dense_loss(zd, target, tail, batch["teacher_entropy"].double(), mask, kind,
                             estimated=not isinstance(teacher, SparseTargets))
            ref.backward()
            assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7), kind
            torch.testing.assert_close(z.grad, zd.grad, rtol=1e-5, atol=1e-9)

    def test_export_is_bit_identical(self, captured, tmp_path):
        import pyarrow as pa

        from logitcache.query.export import export_selection
        from logitcache.query.selection import write_selection

        cache = open_cache(str(captured / "cache"))
        ids = cache.samples["sample_id"].to_pylist()[1::2]
        write_selection(pa.table({"sample_id": ids}), str(tmp_path / "sel.parquet"), cache, "every other sample")
        export_selection(cache, str(tmp_path / "sel.parquet"), str(tmp_path / "small"))
        small = open_cache(str(tmp_path / "small"), verify=True)
        assert small.manifest.capture.encoding == cache.manifest.capture.encoding
        for sid in ids:
            a, b = small.sample(sid), cache.sample(sid)
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
                assert a[name].dtype == b[name].dtype, name

    def test_a_student_trains_on_it(self, captured, tiny_teacher, tmp_path):
        from student_train.config import TrainConfig
        from student_train.train import train

        cfg = TrainConfig(cache=str(captured / "cache"), out=str(tmp_path / "run"), student=str(tiny_teacher),
                          seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, save_every=100)
        report = train(cfg, progress=False)
        assert report["steps"] == 2 and report["train_samples"] == len(TEXTS)
        assert math.isfinite(report["final_train"]["loss"])
        if self.enc().estimated:                     # only the divergence its estimates are unbiased for
            with pytest.raises(LogitcacheError, match="supports --loss forward_kl"):
                train(TrainConfig(**{**cfg.__dict__, "loss": "reverse_kl", "out": str(tmp_path / "run2")}),
                      progress=False)

    def test_docs_table_lists_it(self):
        if not self.in_docs:
            pytest.skip(f"{self.encoding_name} is registered at test time only")
        table = DOCS.read_text().split("### Encodings", 1)[1].split("\n\n")
        rows = [line for part in table for line in part.splitlines() if line.startswith(f"| `{self.encoding_name}` |")]
        assert len(rows) == 1, f"docs/format.md's encodings table has no row for {self.encoding_name}"
        for p in self.cls.params:
            assert f"`{p.name}`" in rows[0], f"docs/format.md: {self.encoding_name} row does not name {p.name}"


def dense_loss(z, target, tail, entropy, mask, kind: str, estimated: bool) -> torch.Tensor:
    """Float64 reference over the full vocabulary, masked mean over the loss positions.

    Sparse targets: the divergence of the coarsened distributions (the ids, plus one bucket holding
    the teacher's exact tail and the student's mass outside the ids). Estimated targets: the
    unbiased forward-KL estimate -sum_j t_j log q_j - H(p)."""
    logq = torch.log_softmax(z, -1)
    pos = mask.bool()
    if estimated:
        per = -(target * logq).sum(-1) - entropy
        return per[pos].mean()
    q = logq.exp()
    sel = target > 0
    q_ids = torch.where(sel, q, torch.zeros_like(q))
    p_ids = target
    q_rest = (q * ~sel).sum(-1, keepdim=True)
    p_rest = tail.nan_to_num(0.0)[..., None].clamp_min(0)
    p_all = torch.cat([p_ids, p_rest], -1)
    p_all = p_all / p_all.sum(-1, keepdim=True).clamp_min(1e-300)     # 0 off the loss positions
    q_all = torch.cat([q_ids, q_rest], -1)
    a, b = (p_all, q_all) if kind == "forward_kl" else (q_all, p_all)
    keep = (a > 0) & torch.cat([sel, torch.ones_like(q_rest, dtype=torch.bool)], -1)
    per = torch.where(keep, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)).sum(-1)
    return per[pos].mean()
