"""Size and fidelity of the exports to other tools' layouts (docs/interop.md), on captured caches.

For each cache given: its own bytes per token; DistillKit exports with the default configuration, the
README's "budget pick" (k 50, 1 exact value, terms [0, 1, sqrt]) and every value exact (bytes per token
of the files, codec bytes per position, the export's own decode error against our values, split into
exact and polynomial values); the default export imported back (the mass of each row's k ids against
ours: sum |p - q| and sum p (log p - log q)); axolotl exports at k 128 and 32. Writes
``--out``.json and ``--out``.md.

    logitcache capture /tmp/real-topk --backend hf --limit 32 --max-new-tokens 128 --encoding topk --top-k 128
    logitcache capture /tmp/real-compact --backend hf --limit 32 --max-new-tokens 128 --top-k 128
    python benchmarks/interop_sizes.py /tmp/real-topk /tmp/real-compact --tokenizer ~/.cache/logitcache/teachers/smollm2-135m-instruct-q4_1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from logitcache import open_cache
from logitcache.interop import export_to, import_from


def row_mass_errors(src, back, k: int) -> dict:
    """Per scored row of ``src``: sum |p - q| and sum p (log p - log q) over its first k ids, q the imported
    values of the same ids (the import sorts rows by its decoded values: matched by id)."""
    theirs = {s["sample_id"]: s for s in back.samples.to_pylist()}
    l1, kl = [], []
    for s in src.samples.to_pylist():
        t = theirs[s["sample_id"]]
        a, b = s["token_offset"], t["token_offset"]
        ids, lp = src.teacher_rows(s["shard"], a, a + s["num_tokens"]).padded(src.manifest.capture.top_k)
        ids2, lp2 = back.teacher_rows(t["shard"], b, b + t["num_tokens"]).padded(k)
        for j in range(s["scored_start"], s["scored_end"]):
            v = ids[j, :k] >= 0
            got = dict(zip(ids2[j].tolist(), lp2[j].tolist()))
            p = np.exp(lp[j, :k][v].astype(np.float64))
            logq = np.array([got[i] for i in ids[j, :k][v].tolist()])
            l1.append(float(np.abs(p - np.exp(logq)).sum()))
            kl.append(float((p * (np.log(p) - logq)).sum()))
    return {"sum_abs_p_minus_q": {"mean": float(np.mean(l1)), "max": float(np.max(l1))},
            "sum_p_log_p_over_q": {"mean": float(np.mean(kl)), "max_abs": float(np.max(np.abs(kl)))}}


def measure(url: str, tokenizer: str, work: Path) -> dict:
    cache = open_cache(url)
    m = cache.manifest
    vocab, k = m.teacher.vocab_size, min(128, m.capture.top_k)
    out = {"cache": url, "encoding": m.capture.encoding, "top_k": m.capture.top_k, "samples": m.num_samples,
           "tokens": m.num_tokens, "scored_tokens": sum(s.scored_tokens for s in m.shards),
           "cache_bytes_per_token": sum(cache.stored_bytes().values()) / m.num_tokens, "distillkit": {}, "axolotl": {}}
    configs = {"default": None,
               "budget": {"d": vocab, "k": 50, "exact_k": 1, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
                          "term_dtype": "float32", "residual_bins": [], "delta_encoding": False, "error_diffusion": False},
               "all exact": {"d": vocab, "k": k, "exact_k": k, "exact_dtype": "bfloat16", "residual_bins": [],
                             "delta_encoding": False}}
    for name, cfg in configs.items():
        dest = work / f"dk-{len(list(work.iterdir()))}"
        options = {}
        if cfg is not None:
            path = work / f"cfg-{len(list(work.iterdir()))}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            options["compression_config"] = str(path)
        r = export_to(cache, str(dest), to="distillkit", **options)
        row = {"config": r.options["compression_config"], "bytes_per_token": r.bytes / r.tokens,
               "bytes_per_scored_token": r.bytes / r.rows, "codec_bytes_per_position": r.checks["codec_bytes_per_position"],
               "exact_values": r.checks["exact_values"], "approximated_values": r.checks["approximated_values"]}
        if cfg is None:
            back = import_from(str(dest), str(work / "back"), from_="distillkit", tokenizer=tokenizer)
            row["import"] = {"bytes_per_token": back.bytes / back.tokens, "values_clipped_to_0": back.checks["values_clipped_to_0"],
                             **row_mass_errors(cache, open_cache(str(work / "back")), r.options["compression_config"]["k"])}
        out["distillkit"][name] = row
    for kk in sorted({k, 32}, reverse=True):
        r = export_to(cache, str(work / f"ax-{kk}"), to="axolotl", top_k=kk)
        out["axolotl"][f"k {kk}"] = {"bytes_per_token": r.bytes / r.tokens, "bytes_per_scored_token": r.bytes / r.rows,
                                     "min_kept_mass": r.checks["min_kept_mass"]}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["# Exports to other tools' layouts: size and fidelity", "",
             "Made by `benchmarks/interop_sizes.py` (docs/interop.md). Bytes per token: the files as written (Parquet, "
             "zstd) over every token of the samples (prompts included); per scored token in parentheses. Errors: "
             "|decoded - ours| in nats over the exported entries, as the export reports them.", ""]
    for r in results:
        lines += [f"## {r['encoding']['name']} cache (k {r['top_k']}): {r['samples']} samples, {r['tokens']} tokens, "
                  f"{r['scored_tokens']} scored; {r['cache_bytes_per_token']:.1f} B/token as stored", "",
                  "| export | B/token | codec B/position | exact values: mean / max error | polynomial values: mean / max error |",
                  "|---|---|---|---|---|"]
        for name, d in r["distillkit"].items():
            c, e, a = d["config"], d["exact_values"], d["approximated_values"]
            poly = f"{a['mean_abs_error']:.4f} / {a['max_abs_error']:.3f} ({a['count']})" if a["count"] else "-"
            lines.append(f"| DistillKit {name} (k {c['k']}, exact_k {c['exact_k']}) | {d['bytes_per_token']:.1f} "
                         f"({d['bytes_per_scored_token']:.1f}) | {d['codec_bytes_per_position']} | "
                         f"{e['mean_abs_error']:.4f} / {e['max_abs_error']:.4f} | {poly} |")
        for name, d in r["axolotl"].items():
            lines.append(f"| axolotl {name} | {d['bytes_per_token']:.1f} ({d['bytes_per_scored_token']:.1f}) | - | "
                         f"float32 (renormalised; the k ids kept at least {d['min_kept_mass']:.3f} of the mass) | - |")
        imp = r["distillkit"]["default"]["import"]
        lines += ["", f"DistillKit default export imported back: {imp['bytes_per_token']:.1f} B/token (float32 values); per "
                  f"scored row over its k ids, sum |p - q| mean {imp['sum_abs_p_minus_q']['mean']:.2e}, max "
                  f"{imp['sum_abs_p_minus_q']['max']:.2e}; sum p (log p - log q) mean {imp['sum_p_log_p_over_q']['mean']:.2e}, "
                  f"max |.| {imp['sum_p_log_p_over_q']['max_abs']:.2e}; values clipped to 0: {imp['values_clipped_to_0']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "interop"))
    args = ap.parse_args()
    results = []
    for url in args.caches:
        with tempfile.TemporaryDirectory() as work:
            results.append(measure(url, args.tokenizer, Path(work)))
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
