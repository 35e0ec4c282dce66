"""Students by importance: structured pruning of the teacher (depth, FFN width, attention heads,
embedding channels) measured on calibration tokens taken from the cache itself, written as a Hugging
Face model directory that ``student-train --student DIR`` trains (the training never loads the teacher;
this step loads it once, in its own process).

Importance, on the calibration tokens (teacher-forced, float32, one sequence at a time):

- block influence of block l (ShortGPT, arXiv 2403.03853): BI_l = 1 - mean_t cos(x_l[t], x_{l+1}[t]),
  x_l the residual stream into block l and x_{l+1} out of it (before the final norm for the last);
- likelihood drop of block l: NLL(teacher without block l) - NLL(teacher), nats per predicted token;
- FFN neuron j of block l (Minitron, arXiv 2407.14679): mean_t |a[t, j]|, a = act(gate(x)) * up(x), the
  input of ``down_proj``;
- KV group g of block l, with its query heads (grouped-query aware: a group is kept or removed whole):
  the sum over its query heads of mean_t ||o_h[t]||_2, o_h head h's attention output (the input of
  ``o_proj``);
- embedding channel c: the sum over every RMSNorm of the model of mean_t |n[t, c]|, n the norm's output.

Depth keeps the ``depth`` most important blocks (by BI or by likelihood drop) in their order, or drops
the contiguous run of blocks whose summed BI is smallest. Width keeps, in every block, the ``ffn`` most
important neurons and the ``kv_heads`` most important KV groups (which ones may differ between blocks;
how many may not: Hugging Face configs are uniform), and the ``hidden`` most important channels
everywhere (embeddings, norms, every projection, the LM head). Llama-like decoders only (q/k/v/o_proj,
gate/up/down_proj, RMSNorm); others are refused naming what is missing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from logitcache.format.errors import LogitcacheError

DEPTH_METHODS = ("bi", "likelihood", "contiguous")


@dataclass
class PruneConfig:
    """What ``student-prune`` does (flags are these fields)."""

    cache: str                                  # calibration tokens: this cache's samples
    out: str                                    # the student directory (+ prune_report.json / .png)
    teacher: str | None = None                  # model directory (default: the cache's teacher)
    calibration_tokens: int = 4096              # tokens of the cache's samples to measure on
    seq_len: int = 512                          # the longest calibration sequence (longer samples are cut)
    depth: int | None = None                    # blocks to keep (None: all)
    depth_method: str = "bi"                    # bi | likelihood | contiguous
    ffn: int | None = None                      # FFN neurons per block to keep (intermediate_size)
    kv_heads: int | None = None                 # KV groups per block to keep (with their query heads)
    hidden: int | None = None                   # embedding channels to keep (hidden_size)
    importance_from: str | None = None          # a prune_report.json of the same teacher and calibration: reuse


@dataclass
class Importance:
    """Importance scores of one model on calibration tokens (shapes: L blocks, I neurons, K groups, d)."""

    tokens: int                                 # calibration tokens (predicted: tokens - sequences)
    nll: float                                  # the model's NLL, nats per predicted token
    block_influence: list[float]                # (L,)
    likelihood_drop: list[float]                # (L,)
    neurons: list[list[float]]                  # (L, I)
    kv_groups: list[list[float]]                # (L, K)
    channels: list[float]                       # (d,)


# ---- the model's parts ---------------------------------------------------------------------------------
def llama_parts(model: nn.Module):
    """(decoder body, its blocks) of a Llama-like model, or an error naming what is missing."""
    from .model import decoder_body

    body = decoder_body(model)
    need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    if body is None or not len(body.layers):
        raise LogitcacheError(f"{type(model).__name__}: no decoder .layers list to prune")
    names = {n for n, _ in body.layers[0].named_modules()}
    missing = [n for n in need if n not in names]
    if missing or not hasattr(body, "norm") or not hasattr(body, "embed_tokens"):
        raise LogitcacheError(f"{type(model).__name__}: pruning needs a Llama-like decoder; missing "
                              f"{', '.join(missing) or 'model.norm / model.embed_tokens'}")
    return body, body.layers


def calibration_sequences(cache_url: str, tokens: int, seq_len: int, storage_options: dict | None = None
                          ) -> list[torch.Tensor]:
    """(1, T <= seq_len) token id tensors of the cache's samples, in the samples table's order, until
    ``tokens`` tokens are taken (the last one cut to fit)."""
    from logitcache import open_cache

    cache = open_cache(cache_url, storage_options=storage_options)
    out, total = [], 0
    for sid in cache.samples.column("sample_id").to_pylist():
        ids = cache.sample(sid)["tokens"][:min(seq_len, tokens - total)]
        if len(ids) >= 2:
            out.append(torch.as_tensor(ids.astype("int64"))[None, :])
            total += len(ids)
        if total >= tokens:
            break
    if not out:
        raise LogitcacheError(f"{cache_url}: no sample with 2 or more tokens to calibrate on")
    return out


def _nll(model: nn.Module, sequences: list[torch.Tensor]) -> float:
    """Mean negative log-likelihood per predicted token, nats."""
    total, count = 0.0, 0
    for ids in sequences:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


@torch.no_grad()
def measure_importance(model: nn.Module, sequences: list[torch.Tensor]) -> Importance:
    """Every importance score of the module docstring, from one pass per sequence plus one per block
    (the likelihood drop: the model run with that block left out)."""
    body, blocks = llama_parts(model)
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    L, d = len(blocks), cfg.hidden_size
    cos_sum = torch.zeros(L, dtype=torch.float64)
    neurons = [torch.zeros(b.mlp.down_proj.in_features, dtype=torch.float64) for b in blocks]
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in blocks]
    channels = torch.zeros(d, dtype=torch.float64)
    handles = []

    def on_block(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos_sum[i] += torch.nn.functional.cosine_similarity(x_in[0].double(), x_out[0].double(), dim=-1).sum()
        return hook

    def on_down(i):
        def hook(module, args):
            neurons[i] += args[0][0].double().abs().sum(0)
        return hook

    def on_o(i):
        def hook(module, args):
            o = args[0][0].double()                                  # (T, H * dh)
            heads[i] += o.reshape(o.shape[0], n_heads, -1).norm(dim=-1).sum(0)
        return hook

    def on_norm(module, args, output):
        channels.add_(output[0].double().abs().sum(0))

    for i, b in enumerate(blocks):
        handles += [b.register_forward_hook(on_block(i), with_kwargs=True),
                    b.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                    b.self_attn.o_proj.register_forward_pre_hook(on_o(i))]
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            handles.append(m.register_forward_hook(on_norm))
    try:
        tokens = sum(s.shape[1] for s in sequences)
        nll = _nll(model, sequences)
    finally:
        for h in handles:
            h.remove()
    drop = [without_block(model, i, lambda m: _nll(m, sequences)) - nll for i in range(L)]
    group = n_heads // n_kv
    return Importance(
        tokens=tokens, nll=nll, block_influence=(1 - cos_sum / tokens).tolist(), likelihood_drop=drop,
        neurons=[(v / tokens).tolist() for v in neurons],
        kv_groups=[(h / tokens).reshape(n_kv, group).sum(-1).tolist() for h in heads],
        channels=(channels / tokens).tolist())


def without_block(model: nn.Module, index: int, fn):
    """``fn(model)`` with decoder block ``index`` left out (restored afterwards)."""
    body, blocks = llama_parts(model)
    saved, n = body.layers, model.config.num_hidden_layers
    body.layers = nn.ModuleList([b for i, b in enumerate(saved) if i != index])
    model.config.num_hidden_layers = n - 1
    try:
        return fn(model)
    finally:
        body.layers, model.config.num_hidden_layers = saved, n


# ---- choosing what to keep ----------------------------------------------------------------------------
def top(scores, k: int) -> list[int]:
    """The indices of the ``k`` largest scores, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def keep_blocks(imp: Importance, depth: int, method: str) -> list[int]:
    """The blocks to keep, in their order."""
    L = len(imp.block_influence)
    if method == "bi":
        return top(imp.block_influence, depth)
    if method == "likelihood":
        return top(imp.likelihood_drop, depth)
    if method == "contiguous":                 # the run of L - depth blocks of least summed influence
        n = L - depth
        if n == 0:
            return list(range(L))
        sums = [sum(imp.block_influence[s:s + n]) for s in range(L - n + 1)]
        start = min(range(len(sums)), key=lambda s: (sums[s], s))
        return [i for i in range(L) if not start <= i < start + n]
    raise LogitcacheError(f"--depth-method {method!r}: choose one of {', '.join(DEPTH_METHODS)}")


def check_targets(cfg: PruneConfig, model_cfg) -> None:
    """Each target within (0, the teacher's size], and heads / channels that keep the shapes valid."""
    def bad(flag, msg):
        raise LogitcacheError(f"{flag}: {msg}")

    limits = {"--depth": (cfg.depth, model_cfg.num_hidden_layers), "--ffn": (cfg.ffn, model_cfg.intermediate_size),
              "--kv-heads": (cfg.kv_heads, model_cfg.num_key_value_heads), "--hidden": (cfg.hidden, model_cfg.hidden_size)}
    for flag, (value, most) in limits.items():
        if value is not None and not 1 <= value <= most:
            bad(flag, f"{value} is not in [1, {most}] (the teacher has {most})")
    if cfg.depth_method not in DEPTH_METHODS:
        bad("--depth-method", f"{cfg.depth_method!r}: choose one of {', '.join(DEPTH_METHODS)}")
    if cfg.calibration_tokens < 2 or cfg.seq_len < 2:
        bad("--calibration-tokens/--seq-len", "need at least 2 tokens")
    if all(v is None for v in (cfg.depth, cfg.ffn, cfg.kv_heads, cfg.hidden)):
        bad("--depth/--ffn/--kv-heads/--hidden", "give at least one target shape")


# ---- cutting the weights ---------------------------------------------------------------------------------
def _rows(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[keep].clone())
    linear.out_features = len(keep)


def _cols(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, keep].clone())
    linear.in_features = len(keep)


def head_rows(groups: list[int], per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads of ``groups`` (each ``per_group`` heads of ``head_dim`` rows)."""
    heads = [g * per_group + j for g in groups for j in range(per_group)]
    return torch.tensor([h * head_dim + r for h in heads for r in range(head_dim)], dtype=torch.long)


def prune_model(model: nn.Module, blocks: list[int], neurons: list[list[int]] | None, groups: list[list[int]] | None,
                channels: list[int] | None) -> nn.Module:
    """The model cut in place to ``blocks`` (teacher indices), then per kept block the ``neurons`` and KV
    ``groups`` (lists over the kept blocks, or None: all), and the embedding ``channels`` (None: all);
    its config follows (an explicit ``head_dim``)."""
    from .model import drop_layers

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_group = n_heads // n_kv
    model = drop_layers(model, blocks) if blocks != list(range(cfg.num_hidden_layers)) else model
    body, layers = llama_parts(model)
    cfg = model.config
    for i, b in enumerate(layers):
        if neurons is not None:
            keep = torch.tensor(neurons[i], dtype=torch.long)
            _rows(b.mlp.gate_proj, keep)
            _rows(b.mlp.up_proj, keep)
            _cols(b.mlp.down_proj, keep)
        if groups is not None:
            q = head_rows(groups[i], per_group, head_dim)
            kv = head_rows(groups[i], 1, head_dim)
            _rows(b.self_attn.q_proj, q)
            _rows(b.self_attn.k_proj, kv)
            _rows(b.self_attn.v_proj, kv)
            _cols(b.self_attn.o_proj, q)
    if neurons is not None:
        cfg.intermediate_size = len(neurons[0])
    if groups is not None:
        cfg.num_key_value_heads = len(groups[0])
        cfg.num_attention_heads = len(groups[0]) * per_group
    cfg.head_dim = head_dim
    if channels is not None:
        keep = torch.tensor(channels, dtype=torch.long)
        emb = model.get_input_embeddings()
        emb.weight = nn.Parameter(emb.weight.data[:, keep].clone())
        head = model.get_output_embeddings()
        if head is not None and head.weight.shape[1] != len(keep):     # tied heads share the new weight
            head.weight = nn.Parameter(head.weight.data[:, keep].clone())
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight = nn.Parameter(m.weight.data[keep].clone())
        for b in layers:
            for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.mlp.gate_proj, b.mlp.up_proj):
                _cols(lin, keep)
            for lin in (b.self_attn.o_proj, b.mlp.down_proj):
                _rows(lin, keep)
        cfg.hidden_size = len(keep)
        if getattr(cfg, "tie_word_embeddings", False):
            model.tie_weights()
    return model


# ---- the step --------------------------------------------------------------------------------------------
def prune(cfg: PruneConfig, log=print) -> dict:
    """Measure, choose, cut, save: the student directory ``cfg.out`` with its tokenizer, and
    ``prune_report.json`` (+ ``.png``) beside the weights. Returns the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache import open_cache

    from .model import count_parameters, teacher_directory

    source = cfg.teacher or teacher_directory(open_cache(cfg.cache).manifest)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    except Exception as e:
        raise LogitcacheError(f"--teacher {source}: could not load a causal LM ({type(e).__name__}: {e})") from None
    llama_parts(model)
    check_targets(cfg, model.config)
    sequences = calibration_sequences(cfg.cache, cfg.calibration_tokens, cfg.seq_len)
    if cfg.importance_from:
        imp = reused_importance(cfg, str(source), model.config)
        log(f"importance from {cfg.importance_from}")
    else:
        log(f"calibrating on {sum(s.shape[1] for s in sequences)} tokens of {len(sequences)} samples")
        imp = measure_importance(model, sequences)
    before = count_parameters(model)
    L = model.config.num_hidden_layers
    blocks = keep_blocks(imp, cfg.depth, cfg.depth_method) if cfg.depth is not None else list(range(L))
    neurons = [top(imp.neurons[i], cfg.ffn) for i in blocks] if cfg.ffn is not None else None
    groups = [top(imp.kv_groups[i], cfg.kv_heads) for i in blocks] if cfg.kv_heads is not None else None
    channels = top(imp.channels, cfg.hidden) if cfg.hidden is not None else None
    student = prune_model(model, blocks, neurons, groups, channels)
    os.makedirs(cfg.out, exist_ok=True)
    student.save_pretrained(cfg.out)
    AutoTokenizer.from_pretrained(source).save_pretrained(cfg.out)
    reloaded = AutoModelForCausalLM.from_pretrained(cfg.out, dtype=torch.float32).eval()
    with torch.no_grad():
        nll_after = _nll(reloaded, sequences)
    report = dict(
        config=asdict(cfg), teacher=str(source), calibration_tokens=imp.tokens, importance=asdict(imp),
        kept=dict(blocks=blocks, neurons=neurons, kv_groups=groups, channels=channels),
        removed=dict(blocks=[i for i in range(L) if i not in blocks],
                     neurons_per_block=(len(imp.neurons[0]) - cfg.ffn) if cfg.ffn else 0,
                     kv_groups_per_block=(len(imp.kv_groups[0]) - cfg.kv_heads) if cfg.kv_heads else 0,
                     channels=[c for c in range(len(imp.channels)) if channels is not None and c not in channels]),
        parameters=dict(before=before, after=count_parameters(reloaded)),
        nll=dict(teacher=imp.nll, pruned_before_healing=nll_after),
        perplexity=dict(teacher=math.exp(imp.nll), pruned_before_healing=math.exp(nll_after)))
    with open(os.path.join(cfg.out, "prune_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_importance(report, os.path.join(cfg.out, "prune_report.png"))
    return report


def reused_importance(cfg: PruneConfig, teacher: str, model_cfg) -> Importance:
    """The importance of an earlier report (``--importance-from``), if it measured this teacher on the same
    cache with the same calibration settings; else an error naming what differs."""
    try:
        with open(cfg.importance_from) as f:
            report = json.load(f)
        earlier, imp = report["config"], Importance(**report["importance"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LogitcacheError(f"--importance-from {cfg.importance_from}: not a prune report ({type(e).__name__}: "
                              f"{e})") from None
    same = {"teacher": (report.get("teacher"), teacher), "cache": (earlier.get("cache"), cfg.cache),
            "calibration_tokens": (earlier.get("calibration_tokens"), cfg.calibration_tokens),
            "seq_len": (earlier.get("seq_len"), cfg.seq_len),
            "blocks": (len(imp.block_influence), model_cfg.num_hidden_layers)}
    for name, (was, now) in same.items():
        if was != now:
            raise LogitcacheError(f"--importance-from {cfg.importance_from}: measured with {name} {was!r}, not "
                                  f"{now!r}; measure again without --importance-from")
    return imp


def plot_importance(report: dict, path: str) -> None:
    """Block influence and likelihood drop per block (removed blocks marked), KV-group importance per
    block, and the sorted neuron and channel importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp, removed = report["importance"], set(report["removed"]["blocks"])
    L = len(imp["block_influence"])
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    x = list(range(L))
    colors = ["tab:red" if i in removed else "tab:blue" for i in x]
    ax[0, 0].bar(x, imp["block_influence"], color=colors)
    ax[0, 0].set(title="block influence (red: removed)", xlabel="block", ylabel="1 - cos(in, out)")
    ax[0, 1].bar(x, imp["likelihood_drop"], color=colors)
    ax[0, 1].set(title="likelihood drop without the block", xlabel="block", ylabel="ΔNLL (nats / token)")
    im = ax[1, 0].imshow(torch.tensor(imp["kv_groups"]).T.numpy(), aspect="auto", origin="lower")
    ax[1, 0].set(title="KV-group importance", xlabel="block", ylabel="KV group")
    fig.colorbar(im, ax=ax[1, 0], label="Σ mean ‖head output‖")
    for name, values in (("FFN neurons (all blocks)", [v for row in imp["neurons"] for v in row]),
                         ("embedding channels", imp["channels"])):
        ys = sorted(values, reverse=True)
        ax[1, 1].plot([i / max(len(ys) - 1, 1) for i in range(len(ys))], [y / max(ys[0], 1e-30) for y in ys],
                      label=name)
    ax[1, 1].set(title="sorted importance", xlabel="rank (fraction)", ylabel="importance / largest", yscale="log")
    ax[1, 1].legend()
    p = report["parameters"]
    fig.suptitle(f"pruning: {p['before'] / 1e6:.1f}M -> {p['after'] / 1e6:.1f}M parameters; NLL "
                 f"{report['nll']['teacher']:.3f} -> {report['nll']['pruned_before_healing']:.3f} before healing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


