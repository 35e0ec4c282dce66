"""Teacher backend on transformers: batched, length-sorted, statistics computed on the device.

Both modes run the decoder alone (never [batch, seq, vocab] logits) and turn its final hidden states
into logits with our own head, checked once against the model's logits so an architecture that
changes its logits after the LM head cannot slip through.

- score: one teacher-forced pass per length-sorted batch; statistics in row chunks.
- generate: our own KV-cached decoding loop, so the statistics come from the logits each step computes
  anyway (one pass; no second scoring pass over the response).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..format.arrays import attention_name
from ..format.encodings import Encoding
from ..format.errors import LogitcacheError
from ..format.manifest import TeacherInfo
from .backend import CapturedSequence, DeviceExtras, GenerationSettings, ProgressFn, SequenceRequest
from .distribution import distribution_extras, distribution_stats, extras_fill, needs_keys, next_token_stats, row_keys
from .attention_capture import QKRecorder
from .identity import ResolvedTeacher, describe_teacher

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
                 chunk_rows: int | None = None):
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
        # rows of logits alive at once: small on CPU (cache-resident), large on GPU (fewer kernel launches)
        self.chunk_rows = chunk_rows or (64 if self.device.type == "cpu" else 1024)
        self._decoder = getattr(self.model, self.model.base_model_prefix)   # e.g. LlamaModel
        self._lm_head = self.model.get_output_embeddings()
        self.vocab_size = int(self._lm_head.weight.shape[0])
        if self.vocab_size != int(cfg.vocab_size):
            raise LogitcacheError(f"teacher {teacher.name}: LM head has {self.vocab_size} outputs but config.vocab_size "
                                  f"is {cfg.vocab_size}")
        self._check_head()
        self._recorder = None            # queries and keys of --attention-layers, while a run needs them

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

    # ---- generation: one pass, statistics from the logits each decoding step computes anyway ----
    @torch.no_grad()
    def _generate(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
                  gen: GenerationSettings, progress: ProgressFn | None,
                  encoding: Encoding | None) -> list[CapturedSequence]:
        out: list[CapturedSequence | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        rng = torch.Generator(device=self.device).manual_seed(gen.seed)
        eos = torch.tensor(gen.eos_token_ids or [-1], device=self.device)
        for b in range(0, len(order), self.generate_batch_size):
            idx = order[b:b + self.generate_batch_size]
            batch = self._generate_batch([requests[i] for i in idx], top_k, hidden_layers, gen, eos, rng, progress,
                                         encoding)
            for i, seq in zip(idx, batch):
                out[i] = seq
        return out  # type: ignore[return-value]

    def _layer(self, out, layer: int) -> torch.Tensor:
        return out.last_hidden_state if layer == self.num_layers else out.hidden_states[layer]

    def _generate_batch(self, reqs: list[SequenceRequest], top_k: int, layers: list[int], gen: GenerationSettings,
                        eos: torch.Tensor, rng: torch.Generator, progress: ProgressFn | None,
                        encoding: Encoding | None) -> list[CapturedSequence]:
        """Left-padded prefill, then a KV-cached decoding loop. Step t's distribution is row
        ``prompt_len - 1 + t``; the token it yields is fed next, which also gives its hidden state."""
        dev, b = self.device, len(reqs)
        plen = [len(r.prompt_ids) for r in reqs]
        width = max(plen)
        ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, q in enumerate(reqs):
            ids[r, width - plen[r]:] = torch.tensor(q.prompt_ids)
            mask[r, width - plen[r]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(1) - 1).clamp(min=0)                       # (b, P)
        need_all = any(layer != self.num_layers for layer in layers)
        out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            output_hidden_states=need_all)
        prompt_hidden = {layer: self._layer(out, layer).float().cpu().numpy() for layer in layers}   # (b, P, d)
        rec = self._recorder
        prompt_qk = {k: v.cpu().numpy() for k, v in rec.take(positions).items()} if rec else {}   # (b, P, h, dh)
        step_qk: list[dict] = []
        # Prompt rows (--with-prompt): teacher-forced statistics over the prefill's hidden states.
        col = torch.arange(width, device=dev)[None, :]
        j = col - (width - torch.tensor(plen, device=dev)[:, None])          # position within each prompt
        starts = torch.tensor([q.score_from for q in reqs], device=dev)[:, None]
        prompt_rows = (j >= starts) & (j < torch.tensor(plen, device=dev)[:, None] - 1)
        draw_keys = torch.tensor([q.draw_key for q in reqs], dtype=torch.int64, device=dev)
        prompt_stats = self._stats_grid(out.last_hidden_state, prompt_rows, torch.roll(ids, -1, 1), top_k, encoding,
                                        self._keys(encoding, draw_keys[:, None], j))

        caps = torch.tensor([q.max_new_tokens for q in reqs], device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        stopped = torch.zeros(b, dtype=torch.bool, device=dev)
        n_new = torch.zeros(b, dtype=torch.long, device=dev)
        last_pos = positions[:, -1]
        h, past = out.last_hidden_state[:, -1], out.past_key_values
        steps: list[tuple[torch.Tensor, ...]] = []                          # per step: ids, lp, ent, tgt, token
        step_extras: list[dict[str, torch.Tensor]] = []
        step_hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        for _ in range(int(caps.max())):
            logits = self._head(h).float()                                  # (b, V)
            logp = torch.log_softmax(logits, -1)
            top_ids, top_lp, ent = distribution_stats(logp, top_k)
            step_keys = self._keys(encoding, draw_keys, torch.tensor(plen, device=dev) - 1 + len(steps))
            step_extras.append(distribution_extras(logp, top_ids, top_lp, encoding, step_keys))
            token = sample_next(logits, gen.temperature, gen.top_p, rng)
            steps.append((top_ids, top_lp, ent, logp.gather(-1, token[:, None])[:, 0], token))
            active = ~done
            n_new += active
            hit = torch.isin(token, eos) & active
            stopped |= hit
            done |= hit | (n_new >= caps)
            if progress:
                progress(int(active.sum()))
            if bool(done.all()) and not layers and rec is None:
                break                                                       # the last token need not be fed
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], 1)
            last_pos = last_pos + 1
            out = self._decoder(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                past_key_values=past, use_cache=True, output_hidden_states=need_all)
            h, past = out.last_hidden_state[:, -1], out.past_key_values
            for layer in layers:
                step_hidden[layer].append(self._layer(out, layer)[:, -1])
            if rec is not None:
                step_qk.append(rec.take(last_pos[:, None]))
            if bool(done.all()):
                break

        s_ids, s_lp, s_ent, s_tgt, s_tok = (torch.stack(x, 1).cpu().numpy() for x in zip(*steps))   # (b, S, ...)
        s_hid = {layer: torch.stack(v, 1).float().cpu().numpy() for layer, v in step_hidden.items()}
        s_ext = {key: torch.stack([e[key] for e in step_extras], 1).cpu().numpy() for key in step_extras[0]}
        s_qk = {key: torch.cat([x[key] for x in step_qk], 1).cpu().numpy() for key in prompt_qk}    # (b, S, h, dh)
        n_new, stopped = n_new.cpu().numpy(), stopped.cpu().numpy()
        results = []
        for r, q in enumerate(reqs):
            p, R = plen[r], int(n_new[r])
            seq = _empty_sequence(np.concatenate([q.prompt_ids, s_tok[r, :R]]).astype(np.int64), p, top_k,
                                  score_from=min(q.score_from, p - 1) if p else 0,
                                  extras=encoding.extras(top_k, self.vocab_size) if encoding else [])
            seq.finish_reason = "stop" if stopped[r] else "length"
            lo = width - p                                                   # left padding of this row
            for name, grid in prompt_stats.items():
                _put(seq, name, slice(None, p - 1), grid[r, lo:width - 1])
            rows = slice(p - 1, p - 1 + R)
            seq.topk_ids[rows], seq.topk_logprobs[rows] = s_ids[r, :R], s_lp[r, :R]
            seq.entropy[rows], seq.target_logprob[rows] = s_ent[r, :R], s_tgt[r, :R]
            for key, values in s_ext.items():
                seq.extras.put(key, rows, values[r, :R])
            for layer in layers:
                seq.hidden[layer] = np.concatenate([prompt_hidden[layer][r, lo:], s_hid[layer][r, :R]])
            for (block, part), values in prompt_qk.items():
                seq.attention[attention_name(block, part)] = np.concatenate([values[r, lo:], s_qk[(block, part)][r, :R]])
            results.append(seq)
        return results

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

    @staticmethod
    def _keys(encoding: Encoding | None, draw_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """``row_keys`` of rows at ``positions`` of samples with ``draw_keys`` (broadcast), for draws."""
        return row_keys(*torch.broadcast_tensors(draw_keys, positions)) if needs_keys(encoding) else None

    def _stats_grid(self, final: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, top_k: int,
                    encoding: Encoding | None = None, keys: torch.Tensor | None = None) -> dict:
        """Statistics of the ``rows`` (b, T) mask of ``final`` (b, T, d), scattered back into (b, T, ...)
        host arrays holding fill values elsewhere (extras under ``extra.<name>``; ``keys``: (b, T)
        ``row_keys`` for draws)."""
        tk_ids, tk_lp, ent, tgt, extras = next_token_stats(final[rows], self._head, targets[rows], top_k,
                                                           self.chunk_rows, encoding,
                                                           keys[rows] if keys is not None else None)
        b, T = rows.shape
        grid = {"topk_ids": torch.zeros((b, T, top_k), dtype=torch.int64, device=self.device),
                "topk_logprobs": torch.full((b, T, top_k), float("nan"), device=self.device),
                "entropy": torch.full((b, T), float("nan"), device=self.device),
                "target_logprob": torch.full((b, T), float("nan"), device=self.device)}
        values = dict(zip(list(grid), (tk_ids, tk_lp, ent, tgt)))
        for key, (shape, dtype, fill) in extras_fill(encoding, top_k, self.vocab_size).items():
            grid[f"extra.{key}"] = torch.full((b, T, *shape), fill, dtype=dtype, device=self.device)
            if key in extras:                                              # absent when no row is scored
                values[f"extra.{key}"] = extras[key]
        for name, v in values.items():
            grid[name][rows] = v
        return {name: g.cpu().numpy() for name, g in grid.items()}

    @torch.no_grad()
    def _score(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
               progress: ProgressFn | None, encoding: Encoding | None) -> list[CapturedSequence]:
        seqs = [np.asarray(r.prompt_ids + list(r.response_ids), dtype=np.int64) for r in requests]
        results: list[CapturedSequence | None] = [None] * len(seqs)
        lengths = [len(s) for s in seqs]
        need_all = any(layer != self.num_layers for layer in hidden_layers)
        for batch in self._batches(lengths):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, i in enumerate(batch):                                 # right padding
                ids[r, :lengths[i]] = torch.from_numpy(seqs[i])
                mask[r, :lengths[i]] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            # The decoder alone: no logits for all positions, and intermediate layers only when asked
            # (output_hidden_states keeps every layer alive; batch_tokens bounds that memory).
            out = self._decoder(input_ids=ids, attention_mask=mask.long(), use_cache=False,
                                output_hidden_states=need_all)
            # Position t predicts ids[t+1]; keep score_from <= t < len-1.
            pos = torch.arange(width, device=self.device)[None, :]
            lens = torch.tensor([lengths[i] for i in batch], device=self.device)[:, None]
            starts = torch.tensor([requests[i].score_from for i in batch], device=self.device)[:, None]
            draw_keys = torch.tensor([requests[i].draw_key for i in batch], dtype=torch.int64, device=self.device)
            grid = self._stats_grid(out.last_hidden_state, (pos >= starts) & (pos < lens - 1),
                                    torch.roll(ids, -1, dims=1), top_k, encoding,
                                    self._keys(encoding, draw_keys[:, None], pos))
            hid = {layer: self._layer(out, layer).float().cpu().numpy() for layer in hidden_layers}
            qk = {attention_name(*key): v.cpu().numpy() for key, v in
                  self._recorder.take(pos.expand(len(batch), -1)).items()} if self._recorder else {}
            for r, i in enumerate(batch):
                n, q = lengths[i], requests[i]
                seq = _empty_sequence(seqs[i], len(q.prompt_ids), top_k, score_from=min(q.score_from, max(n - 1, 0)),
                                      extras=encoding.extras(top_k, self.vocab_size) if encoding else [])
                for name, values in grid.items():
                    _put(seq, name, slice(None), values[r, :n])
                seq.hidden = {layer: h[r, :n] for layer, h in hid.items()}
                seq.attention = {name: v[r, :n] for name, v in qk.items()}
                results[i] = seq
            if progress:
                progress(int(sum(lengths[i] for i in batch)))
        return results  # type: ignore[return-value]

    def run(self, requests: list[SequenceRequest], top_k: int, hidden_layers: list[int],
            generation: GenerationSettings | None, progress: ProgressFn | None = None,
            encoding: Encoding | None = None, attention_layers: list[int] = ()) -> list[CapturedSequence]:
        if top_k > self.vocab_size:
            raise LogitcacheError(f"--top-k {top_k} is larger than the teacher's vocabulary ({self.vocab_size})")
        self._recorder = QKRecorder(self._decoder, self.model.config, list(attention_layers)) if attention_layers \
            else None
        try:
            return self._run(requests, top_k, hidden_layers, generation, progress, encoding)
        finally:
            if self._recorder is not None:
                self._recorder.close()
                self._recorder = None

    def _run(self, requests, top_k, hidden_layers, generation, progress, encoding) -> list[CapturedSequence]:
        to_generate = [i for i, r in enumerate(requests) if r.response_ids is None]
        to_score = [i for i, r in enumerate(requests) if r.response_ids is not None]
        out: list[CapturedSequence | None] = [None] * len(requests)
        if to_generate:
            if generation is None:
                raise ValueError("requests without response_ids need generation settings")
            for i, seq in zip(to_generate, self._generate([requests[i] for i in to_generate], top_k, hidden_layers,
                                                          generation, progress, encoding)):
                out[i] = seq
        if to_score:
            for i, seq in zip(to_score, self._score([requests[i] for i in to_score], top_k, hidden_layers, progress,
                                                    encoding)):
                out[i] = seq
        return out  # type: ignore[return-value]


def _empty_sequence(tokens: np.ndarray, prompt_len: int, top_k: int, score_from: int,
                    extras: list | None = None) -> CapturedSequence:
    """A sequence whose rows all hold fill values, to be filled where scored (``extras``: the
    encoding's declared ``ExtraSpec``s)."""
    n = len(tokens)
    return CapturedSequence(
        tokens=tokens, prompt_len=prompt_len, score_from=score_from, score_to=max(n - 1, 0),
        topk_ids=np.zeros((n, top_k), dtype=np.int64), topk_logprobs=np.full((n, top_k), np.nan, dtype=np.float32),
        entropy=np.full(n, np.nan, dtype=np.float32), target_logprob=np.full(n, np.nan, dtype=np.float32),
        extras=DeviceExtras(extras or [], n))


def _put(seq: CapturedSequence, name: str, rows, values: np.ndarray) -> None:
    """Set rows of a sequence's array by its grid name (``extra.<key>`` for an encoding's extras)."""
    if name.startswith("extra."):
        seq.extras.put(name[6:], rows, values)
    else:
        getattr(seq, name)[rows] = values


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next token per row of (b, V) logits: argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the smallest set of most probable tokens whose mass reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p                     # mass before this token < top_p
        choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
        return order.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
