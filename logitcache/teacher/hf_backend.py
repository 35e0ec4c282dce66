"""Teacher backend on transformers: batched, length-sorted, chunked statistics on the device.

Generate mode runs ``model.generate`` for the token ids, then one teacher-forced pass over prompt +
response for the statistics, the same pass that score mode runs: one code path computes every stored
number. The pass runs the decoder alone (no [batch, seq, vocab] logits); our chunked head turns its
final hidden states into logits, checked once against the model's own logits so an architecture that
changes its logits after the LM head cannot slip through.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..format.errors import LogitcacheError
from ..format.manifest import TeacherInfo
from .backend import CapturedSequence, GenerationSettings, ProgressFn, SequenceRequest
from .identity import ResolvedTeacher, describe_teacher
from .token_stats import next_token_stats

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFBackend:
    name = "hf"

    def __init__(self, teacher: ResolvedTeacher, dtype: str = "auto", device: str = "auto",
                 batch_tokens: int = 8192, generate_batch_size: int = 32, max_length: int | None = None,
                 chunk_rows: int = 512):
        from transformers import AutoModelForCausalLM

        self.teacher = teacher
        self.device = pick_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise LogitcacheError(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=DTYPES[dtype]).to(self.device).eval()
        cfg = self.model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.batch_tokens = batch_tokens
        self.generate_batch_size = generate_batch_size
        self.chunk_rows = chunk_rows
        self._decoder = getattr(self.model, self.model.base_model_prefix)   # e.g. LlamaModel
        self._lm_head = self.model.get_output_embeddings()
        self.vocab_size = int(self._lm_head.weight.shape[0])
        if self.vocab_size != int(cfg.vocab_size):
            raise LogitcacheError(f"teacher {teacher.name}: LM head has {self.vocab_size} outputs but config.vocab_size "
                                  f"is {cfg.vocab_size}")
        self._check_head()

    # ---- identity ---------------------------------------------------------------------------
    def teacher_info(self) -> TeacherInfo:
        return describe_teacher(self.teacher, self.name, self.dtype, self.max_length)

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the LM head, as the model applies it ------------------------------------------------
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(h.to(self._lm_head.weight.dtype))
        cfg = self.model.config
        if getattr(cfg, "logit_scale", None):                      # e.g. Cohere
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None):                   # e.g. Granite
            logits = logits / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)       # e.g. Gemma 2
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def _check_head(self) -> None:
        """Once per teacher: our head on the decoder's output must reproduce the model's logits, or an
        architecture that post-processes its logits in an unknown way would slip through."""
        probe = torch.arange(1, 9, device=self.device)[None, :] % self.vocab_size      # (1, 8)
        theirs = self.model(input_ids=probe, use_cache=False).logits[0].float()
        ours = self._head(self._decoder(input_ids=probe, use_cache=False).last_hidden_state[0]).float()
        err = (ours - theirs).abs().max().item()
        tol = 1e-3 * max(1.0, theirs.abs().max().item()) * (1 if self.dtype == "float32" else 20)
        if not err <= tol:
            raise LogitcacheError(
                f"teacher {self.teacher.name}: logits recomputed from the last hidden state differ from the "
                f"model's own by {err:.3g} (> {tol:.3g}); this architecture post-processes logits in a way the hf "
                "backend does not know")

    # ---- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, requests: list[SequenceRequest], gen: GenerationSettings,
                  progress: ProgressFn | None) -> list[tuple[list[int], str]]:
        from transformers import GenerationConfig

        pad = 0
        out: list[tuple[list[int], str] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        torch.manual_seed(gen.seed)
        eos_ids = np.array(gen.eos_token_ids, dtype=np.int64)
        for b in range(0, len(order), self.generate_batch_size):
            idx = order[b:b + self.generate_batch_size]
            width = max(len(requests[i].prompt_ids) for i in idx)
            max_new = max(requests[i].max_new_tokens for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):                                   # left padding
                p = requests[i].prompt_ids
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            config = GenerationConfig(
                max_new_tokens=max_new, do_sample=gen.temperature > 0,
                temperature=gen.temperature if gen.temperature > 0 else None,
                top_p=gen.top_p if gen.temperature > 0 else None, top_k=0 if gen.temperature > 0 else None,
                eos_token_id=list(gen.eos_token_ids), pad_token_id=pad)
            seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                       generation_config=config)[:, width:].cpu().numpy()   # (b, new)
            is_eos = np.isin(seqs, eos_ids)                                   # (b, new)
            first_eos = np.where(is_eos.any(1), is_eos.argmax(1), seqs.shape[1])
            for r, i in enumerate(idx):
                cap = requests[i].max_new_tokens
                if first_eos[r] < cap:
                    out[i] = (seqs[r, :first_eos[r] + 1].tolist(), "stop")
                else:
                    out[i] = (seqs[r, :cap].tolist(), "length")
            if progress:
                progress(sum(len(out[i][0]) for i in idx))
        return out  # type: ignore[return-value]

    # ---- teacher-forced statistics ------------------------------------------------------------
    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Length-sorted batches whose padded size stays within ``batch_tokens``."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches, cur = [], []
        for i in order:
            if cur and lengths[i] * (len(cur) + 1) > self.batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def _score(self, seqs: list[np.ndarray], score_from: list[int], top_k: int, hidden_layers: list[int],
               progress: ProgressFn | None) -> list[dict]:
        results: list[dict | None] = [None] * len(seqs)
        lengths = [len(s) for s in seqs]
        need_all = any(layer != self.num_layers for layer in hidden_layers)
        for batch in self._batches(lengths):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, i in enumerate(batch):                                 # right padding
                ids[r, :lengths[i]] = torch.from_numpy(seqs[i].astype(np.int64))
                mask[r, :lengths[i]] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            # The decoder alone: no logits for all positions, and intermediate layers only when asked
            # (output_hidden_states keeps every layer alive; batch_tokens bounds that memory).
            out = self._decoder(input_ids=ids, attention_mask=mask.long(), use_cache=False,
                                output_hidden_states=need_all)
            final = out.last_hidden_state                                 # (b, T, d), after the final norm
            # Which rows to score: position t predicts ids[t+1]; keep score_from <= t < len-1.
            pos = torch.arange(width, device=self.device)[None, :]
            lens = torch.tensor([lengths[i] for i in batch], device=self.device)[:, None]
            starts = torch.tensor([score_from[i] for i in batch], device=self.device)[:, None]
            scored = (pos >= starts) & (pos < lens - 1)                     # (b, T)
            targets = torch.roll(ids, -1, dims=1)
            tk_ids, tk_lp, ent, tgt = next_token_stats(final[scored], self._head, targets[scored], top_k,
                                                     self.chunk_rows)
            # Scatter scored rows back into (b, T) buffers filled with fill values.
            b, T = ids.shape
            full_ids = torch.zeros((b, T, top_k), dtype=torch.int64, device=self.device)
            full_lp = torch.full((b, T, top_k), float("nan"), device=self.device)
            full_ent = torch.full((b, T), float("nan"), device=self.device)
            full_tgt = torch.full((b, T), float("nan"), device=self.device)
            full_ids[scored], full_lp[scored], full_ent[scored], full_tgt[scored] = tk_ids, tk_lp, ent, tgt
            host = {"topk_ids": full_ids.cpu().numpy(), "topk_logprobs": full_lp.cpu().numpy(),
                    "entropy": full_ent.cpu().numpy(), "target_logprob": full_tgt.cpu().numpy()}
            hid = {layer: (final if layer == self.num_layers else out.hidden_states[layer]).float().cpu().numpy()
                   for layer in hidden_layers}
            for r, i in enumerate(batch):
                n = lengths[i]
                res = {k: v[r, :n] for k, v in host.items()}
                res["hidden"] = {layer: h[r, :n] for layer, h in hid.items()}
                results[i] = res
            if progress:
                progress(int(sum(lengths[i] for i in batch)))
        return results  # type: ignore[return-value]

    def run(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
            generation: GenerationSettings | None, progress: ProgressFn | None = None) -> list[CapturedSequence]:
        if top_k > self.vocab_size:
            raise LogitcacheError(f"--top-k {top_k} is larger than the teacher's vocabulary ({self.vocab_size})")
        responses: list[tuple[list[int], str]] = []
        need_gen = [i for i, r in enumerate(requests) if r.response_ids is None]
        if need_gen:
            if generation is None:
                raise ValueError("requests without response_ids need generation settings")
            generated = self._generate([requests[i] for i in need_gen], generation, progress)
        gen_iter = iter(generated) if need_gen else iter(())
        for r in requests:
            responses.append(next(gen_iter) if r.response_ids is None else (list(r.response_ids), "scored"))
        seqs = [np.asarray(r.prompt_ids + resp, dtype=np.int64) for r, (resp, _) in zip(requests, responses)]
        stats = self._score(seqs, [r.score_from for r in requests], top_k, hidden_layers, progress)
        out = []
        for r, seq, (resp, reason), st in zip(requests, seqs, responses, stats):
            out.append(CapturedSequence(
                tokens=seq, prompt_len=len(r.prompt_ids), score_from=min(r.score_from, max(len(seq) - 1, 0)),
                score_to=max(len(seq) - 1, 0), topk_ids=st["topk_ids"], topk_logprobs=st["topk_logprobs"],
                entropy=st["entropy"], target_logprob=st["target_logprob"], hidden=st["hidden"],
                finish_reason=reason))
        return out

