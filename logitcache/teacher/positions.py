"""Choose before storing where the teacher's distribution is worth its bytes (capture --positions-from).

A student model (the one to be distilled, or one like it) reads each captured sequence, teacher-forced
on the teacher's tokens, and the rows where it is most uncertain are kept: per sample, the
ceil(keep_frac * n) scored rows with the highest student entropy H(q) = -sum q log q (SE-KD, arXiv
2602.01395: distilling only the positions where the student is unsure matches full distillation). The
other scored rows keep their token, exact entropy and target log-probability but no distribution (the
``selected`` array, format 1.6). The student must use the teacher's tokenizer: its positions are the
teacher's. It runs after the teacher on the same tokens in both modes, so the teacher's own cost is
unchanged; what shrinks is what the cache stores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..format.errors import LogitcacheError

RULE = "student-entropy"


def top_rows(score: np.ndarray, scored: np.ndarray, frac: float) -> np.ndarray:
    """(n,) bool: the ceil(frac * scored.sum()) scored rows with the highest ``score``, the earlier first
    on ties."""
    idx = np.flatnonzero(scored)
    keep = np.zeros(len(score), dtype=bool)
    count = math.ceil(frac * len(idx) - 1e-9)
    keep[idx[np.argsort(-score[idx], kind="stable")[:count]]] = True
    return keep


class StudentPositions:
    """Loads the student once (``path``: a Hugging Face model directory) and chooses rows per sequence."""

    def __init__(self, path: str, keep_frac: float, vocab_sha256: str, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..format.fingerprint import vocab_sha256 as digest
        from .identity import weights_fingerprint

        if not Path(path).is_dir():
            raise LogitcacheError(f"--positions-from {path}: not a model directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise LogitcacheError(f"--positions-from {path}: could not load its tokenizer ({type(e).__name__}: {e})") \
                from None
        if digest(tokenizer) != vocab_sha256:
            raise LogitcacheError(f"--positions-from {path}: its tokenizer is not the teacher's (vocab_sha256 "
                                  f"{digest(tokenizer)[:12]}... != {vocab_sha256[:12]}...); the positions chosen are "
                                  "the teacher's, so the student must share its tokenizer")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        except Exception as e:
            raise LogitcacheError(f"--positions-from {path}: could not load a causal LM ({type(e).__name__}: {e})") \
                from None
        self.keep_frac, self.device, self.path = float(keep_frac), device, str(path)
        self.fingerprint = weights_fingerprint(Path(path))

    def record(self) -> dict:
        """The manifest's ``positions`` section."""
        return positions_record(self.path, self.keep_frac, self.fingerprint)

    def entropy(self, tokens: np.ndarray, chunk_rows: int = 256) -> np.ndarray:
        """(n,) float32 the student's entropy in nats at each row of a token sequence (teacher-forced)."""
        import torch

        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(tokens, np.int64), device=self.device)[None]
            logits = self.model(input_ids=ids).logits[0]                       # (n, V)
            out = torch.empty(logits.shape[0], dtype=torch.float32)
            for s in range(0, logits.shape[0], chunk_rows):
                z = logits[s:s + chunk_rows].float()
                out[s:s + chunk_rows] = (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).cpu()
        return out.numpy()

    def keep(self, captured) -> list[np.ndarray]:
        """Per ``CapturedSequence``: (n,) bool, the scored rows whose distribution is stored."""
        out = []
        for c in captured:
            scored = np.isfinite(c.entropy)
            out.append(top_rows(self.entropy(c.tokens), scored, self.keep_frac) if scored.any()
                       else np.zeros(len(c.tokens), dtype=bool))
        return out


def positions_record(path: str, keep_frac: float, fingerprint: str) -> dict:
    """The manifest's ``positions`` section: the rule, the share, the student (covered by the cache
    fingerprint)."""
    return {"rule": RULE, "keep_frac": float(keep_frac), "per": "sample", "student": {"source": str(path),
                                                                                        "fingerprint": fingerprint}}
