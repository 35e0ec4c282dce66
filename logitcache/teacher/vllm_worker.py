"""What logitcache runs inside vLLM's worker processes: everything an encoding needs beyond the top-k,
computed on the device from the full (tokens, V) scores that vLLM's logprob path holds anyway.

vLLM imports this module in every worker when the backend names ``WorkerExtension`` as its
``worker_extension_cls``. The import wraps the one function per model runner that gathers the top-k
log-probs of sampled and prompt positions (V1 runner: ``Sampler.gather_logprobs``; V2 GPU runner:
``compute_topk_scores``). The backend asks vLLM for ``SlotPlan.num_logprobs`` log-probs per position:
the encoding's top-k, then slots that the hook overwrites with what it computes from the same row
(``SlotPlan.columns``): the exact entropy, the exact tail (a logsumexp over the complement of the
top-k), draws (``sampled`` / ``hybrid``) and their counts, each a column of (id, value). A value
column carries a sentinel id, so a slot the hook did not fill (a vLLM whose functions moved) is
recognised and refused by the backend: nothing estimated or substituted is ever stored. The values
come from ``distribution.distribution_extras``, the functions the hf backend calls.

Draws are keyed by (the sample's ``draw_key``, the row's position): the V1 runner's ``_sample`` and
``_get_prompt_logprobs_dict`` are wrapped to tell the hook which request and position each row is,
so a row's draws do not depend on the batch vLLM formed or how it scheduled or split the request.
Rows the hook cannot place get the id ``UNKEYED`` in their draw slots, and the backend refuses them.
The ``full`` encoding's rows (V values each) do not fit the logprob path (vLLM turns every entry into
Python objects): the hook keeps them in the worker, keyed by request slot and position with the
target id each row was gathered for, and the backend takes them with ``collective_rpc`` and checks
each row against the values of the logprob path before storing it.

Verified against vLLM 0.32 (``SUPPORTED_VLLM``) on its V1 runner (CPU build); the V2 runner hook
fills entropy and tails (draws and full rows need the V1 runner; the backend selects it).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading

import numpy as np
import torch

from .vllm_slots import ENTROPY_TOKEN_ID, UNKEYED, SlotPlan

_HOOKED: list[str] = []


# ---- per-row keys from the runner ------------------------------------------------------------------
class _Context(threading.local):
    rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None     # draw keys, request slots, positions
    prompt_calls: list | None = None          # per prompt-logprob call: (draw key, slot, first position, rows)


_CTX = _Context()
_PLAN: SlotPlan | None = None
_FULL: dict[int, list[tuple[np.ndarray, np.ndarray, torch.Tensor]]] = {}


def _tag(state) -> tuple[int, int]:
    """(draw key, request slot) that the backend put into a request's ``extra_args``."""
    extra = getattr(state.sampling_params, "extra_args", None) or {}
    key, slot = extra.get("logitcache", (0, -1))
    return int(key), int(slot)


def _sample_rows(runner, spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw keys, slots and positions of the rows ``_sample`` gets: one per request (plus its draft
    tokens' rows under speculative decoding), the last scheduled token of each."""
    n = runner.input_batch.num_reqs
    tags = np.array([_tag(runner.requests[r]) for r in runner.input_batch.req_ids[:n]], dtype=np.int64).reshape(n, 2)
    last = runner.optimistic_seq_lens_cpu[:n].numpy().astype(np.int64) - 1
    drafts = np.zeros(n, np.int64) if spec is None else np.asarray(spec.num_draft_tokens, np.int64)
    per = drafts + 1
    first = np.repeat(last - drafts, per)
    offset = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    return np.repeat(tags[:, 0], per), np.repeat(tags[:, 1], per), first + offset


def _prompt_calls(runner, num_scheduled_tokens: dict) -> list[tuple[int, int, int, int]]:
    """The calls ``_get_prompt_logprobs_dict`` is about to make to ``gather_logprobs``, in its order
    (requests with prompt logprobs and tokens scheduled; the rows of this chunk of each prompt)."""
    calls = []
    for req_id in runner.num_prompt_logprobs:
        n = num_scheduled_tokens.get(req_id)
        state = runner.requests.get(req_id)
        if n is None or state is None or state.prompt_token_ids is None:
            continue
        start = state.num_computed_tokens
        rows = min(n, len(state.prompt_token_ids) - start - 1)
        if rows > 0:
            calls.append((*_tag(state), start, rows))
    return calls


def _row_context(rows: int):
    """(draw keys, slots, positions) of the rows of the current gather call, or None."""
    if _CTX.prompt_calls is not None:
        if not _CTX.prompt_calls:
            return None
        key, slot, start, n = _CTX.prompt_calls.pop(0)
        if n != rows:
            _CTX.prompt_calls = []                                   # out of step: place nothing more
            return None
        return np.full(n, key, np.int64), np.full(n, slot, np.int64), start + np.arange(n, dtype=np.int64)
    if _CTX.rows is not None and len(_CTX.rows[0]) == rows:
        return _CTX.rows
    return None


# ---- the computation ---------------------------------------------------------------------------------
def entropy_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """H in nats per row of (tokens, V) log-probs or logits (log_softmax makes both the same)."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    return -(logp.exp() * logp.clamp_min(torch.finfo(torch.float32).min)).sum(-1)


def _chunk_rows(device: torch.device) -> int:
    return 64 if device.type == "cpu" else 1024


def fill_slots(tensors, scores: torch.Tensor, targets: torch.Tensor | None = None, are_logprobs: bool = False):
    """Overwrite the slots of ``tensors`` (vLLM's (ids, values, ranks) of (rows, 1 + num_logprobs))
    with what ``_PLAN`` asks for, computed from ``scores`` (rows, V): logits, or float32 log-probs
    (``are_logprobs``: then not normalised again)."""
    from ..format.encodings import encoding_from
    from .distribution import distribution_extras, row_keys

    ids, values = tensors[0], tensors[1]
    rows = scores.shape[0]
    if ids.dim() != 2 or ids.shape[0] != rows:
        return tensors
    plan = _PLAN
    if plan is None or ids.shape[1] != 1 + plan.num_logprobs:       # not a request of ours: entropy last
        if ids.shape[1] >= 2:
            ids[:, -1] = ENTROPY_TOKEN_ID
            values[:, -1] = entropy_from_scores(scores).to(values.dtype)
        return tensors
    context = _row_context(rows) if plan.keyed or plan.full else None
    keys = None
    if plan.keyed and context is not None:
        keys = row_keys(torch.from_numpy(context[0]), torch.from_numpy(context[2])).to(scores.device)
    encoding = encoding_from(plan.encoding) if plan.encoding is not None else None
    base = 1 + plan.top_k
    step = _chunk_rows(scores.device)
    for s in range(0, rows, step):
        e = min(s + step, rows)
        logp = scores[s:e] if are_logprobs and scores.dtype == torch.float32 else \
            torch.log_softmax(scores[s:e].float(), dim=-1)
        top_ids, top_vals = ids[s:e, 1:base].long(), values[s:e, 1:base].float()
        out = {"entropy": -(logp.exp() * logp.clamp_min(torch.finfo(torch.float32).min)).sum(-1)}
        if encoding is not None and (keys is not None or not plan.keyed):
            out.update(distribution_extras(logp, top_ids, top_vals, encoding, keys[s:e] if keys is not None else None))
        for c in plan.columns:
            lo, hi = base + c.start, base + c.start + c.width
            if c.name not in out:                                   # draws of a row not placed: refused
                ids[s:e, lo:hi] = UNKEYED
            elif c.kind == "value":
                ids[s:e, lo:hi] = c.sentinel
                values[s:e, lo:hi] = out[c.name].reshape(e - s, c.width).to(values.dtype)
            else:
                drawn = out[c.name].reshape(e - s, c.width)
                ids[s:e, lo:hi] = drawn.to(ids.dtype)
                values[s:e, lo:hi] = logp.gather(-1, drawn.long()).to(values.dtype)
        if plan.full and context is not None and _is_rank_zero():
            _keep_full(context, s, e, logp, targets)
    return tensors


def _keep_full(context, s: int, e: int, logp: torch.Tensor, targets: torch.Tensor | None) -> None:
    _, slots, positions = context
    tgt = targets[s:e].long().cpu().numpy() if targets is not None else np.full(e - s, -1, np.int64)
    rows = logp.to("cpu", copy=True)
    for slot in np.unique(slots[s:e]):
        if slot < 0:
            continue
        sel = np.flatnonzero(slots[s:e] == slot)
        _FULL.setdefault(int(slot), []).append((positions[s:e][sel], tgt[sel], rows[torch.from_numpy(sel)]))


def _is_rank_zero() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:     # no parallel state (a test calling the hook directly)
        return True


# ---- the hooks -----------------------------------------------------------------------------------------
def _hook_v1_sampler() -> None:
    from vllm.v1.sample.sampler import Sampler

    original = Sampler.__dict__["gather_logprobs"]
    if getattr(original, "_logitcache", False):
        return
    inner = original.__func__ if isinstance(original, staticmethod) else original

    def gather_logprobs(logprobs, num_logprobs, token_ids):
        return fill_slots(inner(logprobs, num_logprobs, token_ids), logprobs, token_ids,
                          are_logprobs=_PLAN is not None)      # configured: logprobs_mode raw_logprobs

    gather_logprobs._logitcache = True
    Sampler.gather_logprobs = staticmethod(gather_logprobs)
    _HOOKED.append("vllm.v1.sample.sampler.Sampler.gather_logprobs")


def _hook_v1_runner() -> None:
    """Tell the hook which request and position each row is (V1 runner)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample, prompt = GPUModelRunner._sample, GPUModelRunner._get_prompt_logprobs_dict
    if getattr(sample, "_logitcache", False):
        return

    def placing(original, attr: str, rows_of):
        """``original`` with ``_CTX.<attr>`` set to ``rows_of(runner, *args)`` while it runs (plans that place rows)."""
        def wrapper(self, *args):
            if _PLAN is None or not (_PLAN.keyed or _PLAN.full):
                return original(self, *args)
            setattr(_CTX, attr, rows_of(self, *args))
            try:
                return original(self, *args)
            finally:
                setattr(_CTX, attr, None)
        wrapper._logitcache = True
        return wrapper

    GPUModelRunner._sample = placing(sample, "rows", lambda runner, logits, spec: _sample_rows(runner, spec))
    GPUModelRunner._get_prompt_logprobs_dict = placing(
        prompt, "prompt_calls", lambda runner, hidden, scheduled: _prompt_calls(runner, scheduled))
    _HOOKED.append("vllm.v1.worker.gpu_model_runner.GPUModelRunner (rows placed)")


def _hook_v2_runner() -> None:
    try:
        import vllm.v1.worker.gpu.sample as sample_pkg
        from vllm.v1.worker.gpu.sample import logprob
    except Exception:  # not in this build (e.g. no triton on CPU)
        return
    original = logprob.compute_topk_scores
    if getattr(original, "_logitcache", False):
        return

    def compute_topk_scores(logits, num_logprobs, sampled_token_ids, *args, **kwargs):
        return fill_slots(original(logits, num_logprobs, sampled_token_ids, *args, **kwargs), logits,
                          sampled_token_ids)

    compute_topk_scores._logitcache = True
    for info in pkgutil.iter_modules(sample_pkg.__path__):   # every module that imported the name
        try:
            module = importlib.import_module(f"{sample_pkg.__name__}.{info.name}")
        except Exception:
            continue
        if getattr(module, "compute_topk_scores", None) is original:
            module.compute_topk_scores = compute_topk_scores
            _HOOKED.append(f"{module.__name__}.compute_topk_scores")


# ---- hidden states by forward hooks (the residual stream at chosen layers) -----------------------------
_HIDDEN_LAYERS: list[int] = []
_STEP: dict[int, torch.Tensor] = {}                     # this forward pass's rows, by layer
_HIDDEN: dict[int, list[tuple[np.ndarray, np.ndarray, dict[int, torch.Tensor]]]] = {}   # slot -> parts
_HANDLES: list = []


def _decoder_parts(model, num_layers: int):
    """(embeddings, decoder blocks, final norm) of a vLLM decoder (Llama-like: ``model.model``), or None."""
    inner = getattr(model, "model", None)
    parts = tuple(getattr(inner, name, None) for name in ("embed_tokens", "layers", "norm"))
    if any(x is None for x in parts) or len(parts[1]) != num_layers:
        return None
    return parts


def _keep(layer: int, final_norm: bool = False):
    def hook(module, args, output):
        if isinstance(output, tuple):     # a block gives (hidden, residual): the stream is their sum
            h = output[0] if final_norm or len(output) < 2 or output[1] is None else output[0] + output[1]
        else:
            h = output
        _STEP[layer] = h.detach().to("cpu", torch.float32, copy=True)
    return hook


def _place_hidden(runner) -> None:
    """After a forward pass: this step's rows of each request of ours, with their positions and ids."""
    if not _STEP:
        return
    n = runner.input_batch.num_reqs
    qsl = runner.query_start_loc.np[:n + 1].astype(np.int64)
    total = int(qsl[-1])
    positions = runner.positions[:total].cpu().numpy().astype(np.int64)
    ids = runner.input_ids.cpu[:total].numpy().astype(np.int64)
    for i, req_id in enumerate(runner.input_batch.req_ids[:n]):
        slot = _tag(runner.requests[req_id])[1]
        a, b = qsl[i], qsl[i + 1]
        if slot >= 0 and b > a:
            _HIDDEN.setdefault(slot, []).append((positions[a:b], ids[a:b], {k: v[a:b] for k, v in _STEP.items()}))
    _STEP.clear()


def _hook_v1_execute() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.execute_model
    if getattr(original, "_logitcache", False):
        return

    def execute_model(self, *args, **kwargs):
        _STEP.clear()
        out = original(self, *args, **kwargs)
        if _HIDDEN_LAYERS:
            _place_hidden(self)
        return out

    execute_model._logitcache = True
    GPUModelRunner.execute_model = execute_model
    _HOOKED.append("vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model (hidden states)")


_hook_v1_sampler()
_hook_v1_runner()
_hook_v1_execute()
_hook_v2_runner()


class WorkerExtension:
    """Mixed into vLLM's worker class; the backend calls these with ``LLM.collective_rpc``."""

    def logitcache_hooks(self) -> list[str]:
        return list(_HOOKED)

    def logitcache_configure(self, plan: SlotPlan | None) -> str | None:
        """Set the plan; returns a problem (this runner cannot place rows) or None."""
        global _PLAN
        _PLAN = plan
        _FULL.clear()
        runner = type(getattr(self, "model_runner", None)).__module__
        if plan is not None and (plan.keyed or plan.full) and not runner.startswith("vllm.v1.worker.gpu_model_runner") \
                and not runner.startswith("vllm.v1.worker.cpu_model_runner"):
            return f"the model runner {runner} (vLLM's V2 runner) is not one whose rows logitcache can place"
        return None

    def logitcache_hidden(self, layers: list[int], num_layers: int) -> str | None:
        """Capture ``layers`` (0: embeddings, L: after L blocks, ``num_layers``: after the final norm) by
        forward hooks; returns a problem (this model's layout is not known) or None."""
        global _HIDDEN_LAYERS
        for handle in _HANDLES:
            handle.remove()
        _HANDLES.clear()
        _HIDDEN.clear()
        _HIDDEN_LAYERS = []
        if not layers:
            return None
        parts = _decoder_parts(self.model_runner.get_model(), num_layers)
        if parts is None:
            return "the model has no model.embed_tokens / model.layers / model.norm to hook"
        embed, blocks, norm = parts
        for layer in layers:
            module = embed if layer == 0 else norm if layer == num_layers else blocks[layer - 1]
            _HANDLES.append(module.register_forward_hook(_keep(layer, final_norm=layer == num_layers)))
        _HIDDEN_LAYERS = list(layers)
        return None

    def logitcache_take_hidden(self) -> dict[int, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]]:
        """Every hidden row kept since the last call, by request slot: (positions, token ids, {layer: (n, d)})."""
        out = {}
        for slot, parts in _HIDDEN.items():
            out[slot] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         {layer: torch.cat([p[2][layer] for p in parts]).numpy() for layer in _HIDDEN_LAYERS})
        _HIDDEN.clear()
        return out

    def logitcache_take_full(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every full row kept since the last call, by request slot: (positions, target ids, rows (n, V))."""
        out = {}
        for slot, parts in _FULL.items():
            out[slot] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                         torch.cat([p[2] for p in parts]).numpy())
        _FULL.clear()
        return out
