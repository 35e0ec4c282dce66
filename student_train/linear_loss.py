"""The student's LM head fused with the distillation loss (issue 14, item 3): no (B, T, V) logits tensor
is ever materialised, neither in forward nor in backward.

The caller runs the student up to its last hidden states h (B, T, H) (after the final norm, exactly what
the LM head reads) and hands them, with the head's weight W (V, H) and bias b (V,) or None, to
``linear_teacher_loss``. It walks the rows that carry a loss in chunks of ``chunk_rows``; per chunk

    z = h_c W^T + b                                   (c, V)  loss in float32 (float64 for float64 inputs)
    L_c = the chunk's share of the loss, from the SAME loss functions as the unfused path
    dL_c/dz by autograd, then  dL/dh_c = dL_c/dz W,  dL/dW += (dL_c/dz)^T h_c,  dL/db += sum_rows dL_c/dz

and throws z away. Only dL/dh (N, H), dL/dW (V, H) and dL/db (V,) are kept for backward, which merely
scales them by the incoming gradient. Peak extra memory: the chunk's logits and their gradient
(2 x chunk_rows x V in the compute dtype) plus the working buffers of the loss on that chunk (it runs
with ``DistillationConfig.chunk_rows`` rows at a time, as in the unfused path), the float32 (V, H)
accumulator of dL/dW and, for a bf16/fp16 head, a float32 copy of W on the CPU or one (V, H) product in
the head's dtype per chunk on CUDA.

Why the value is exactly the unfused one. Every loss of ``losses`` / ``sampled_kd`` is a token-weighted
mean sum_n w_n l_n / sum_n w_n whose per-row term l_n depends on row n only; the special rules are in the
weights: a row without any stored teacher id (SparseTargets) or without any target mass
(EstimatedTargets) has effective weight 0 and does not count in the denominator, and hard-label CE counts
the rows whose label is not ``IGNORE_INDEX`` (it ignores the token weights). So the global denominators
D = sum_n w_n^eff are computed first, over all rows; the loss function then runs on a chunk and returns
the chunk's mean S_c / D_c, which is scaled by D_c / D. The sum over chunks is S / D whatever the chunk
boundaries (up to rounding: tests hold it to 1e-10 in float64). Rows whose effective weight is 0 for
every teacher and that carry no CE label contribute nothing and get a zero gradient, so they are skipped
before chunking (chunks are gathered from the remaining rows; masked prompt tokens cost nothing).

The reference this equals (``objective.compute_loss`` with logits = h W^T + b):

    kd_i = objective.teacher_loss(logits, targets_i, weights_i, kd)      i = 0 (``targets``), 1, ...
    kd   = kd_0, or losses.combine_teacher_losses([kd_0, kd_1, ...], teacher_weights)
    loss = kd, or losses.mix_ce_and_kd(losses.hard_label_cross_entropy(logits, labels), kd, ce_alpha)

Every divergence of ``DistillationConfig`` (forward KL = KL(p_teacher||q_student), reverse KL =
KL(q_student||p_teacher), skew, JSD, TVD), both tail policies and any temperature run through
``losses.distillation_loss`` on the chunk; estimated targets (sampled, hybrid) through
``sampled_kd.estimated_forward_kl`` (forward KL at T = 1 only, as in ``objective.teacher_loss``).

Which implementation runs where. There is one implementation: the torch code here, on any device torch
runs on (CPU, CUDA, ...) and in any dtype (bf16/fp16/fp32 hidden states and head; the losses in
float32, float64 for float64 inputs; autocast is switched off inside). On CUDA a bf16/fp16 head's three
products (logits, dL/dh, dL/dW) run in that dtype on the tensor cores with float32 accumulation, as the
LM head under autocast does in the unfused path; elsewhere they run in the loss's dtype. We do not call liger-kernel (on PyPI as
``liger-kernel``): its fused linear distillation losses (``LigerFusedLinearJSDLoss`` and the shared
``LigerFusedLinearDistillationBase``) take the teacher's hidden states and LM-head weight and form the
teacher's full-vocabulary logits chunk by chunk, i.e. they need a live dense teacher. A sparse cached
teacher is k ids plus one tail mass: no dense logits can be rebuilt from it without inventing the tail's
shape, and our bucket semantics (the student's exact mass outside the ids as one outcome) have no
counterpart there; its token masking is also by ignore_index only, not by float token weights. Its fused
linear cross-entropy covers the hard-label term alone, so using it would mean a second pass over the head
for the KD term and save nothing. Nothing of liger can match, so it is not a dependency.

Models whose logits are not just h W^T + b (final logit soft-capping: Gemma 2/3; a logit scale: Cohere,
Granite, MiniCPM3, Falcon-H1; an output embedding that is not a plain ``nn.Linear``: LoRA-wrapped or
quantised heads) are detected by ``supports_fused_head``; the caller then computes logits as usual and
reports the reason.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from logitcache.format.errors import LogitcacheError

from . import losses, sampled_kd
from .targets import EstimatedTargets, SparseTargets

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "default_chunk_rows", "linear_teacher_loss", "supports_fused_head"]

# logits elements per chunk when chunk_rows is not given: 2^25 = 128 MiB of float32 logits
# (682 rows at V = 49152, 261 at V = 128256)
DEFAULT_CHUNK_ELEMENTS = 1 << 25

# config fields that change the logits after the head, with the value that leaves them unchanged
_LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", (None, 0, 0.0)),   # Gemma 2/3, nanochat: cap * tanh(z / cap)
    ("logit_scale", (None, 1, 1.0)),               # Cohere: z * scale
    ("logits_scaling", (None, 1, 1.0)),            # Granite: z / scale; MiniCPM3: h / scale
    ("lm_head_multiplier", (None, 1, 1.0)),        # Falcon-H1: z * multiplier
)


def default_chunk_rows(vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk keeping one chunk of logits at about ``DEFAULT_CHUNK_ELEMENTS`` elements (4x that
    on CUDA, where fewer, larger products keep the GPU busy: 1046 rows at V = 128256, 512 MiB of
    float32 logits)."""
    elements = DEFAULT_CHUNK_ELEMENTS * (4 if device is not None and device.type == "cuda" else 1)
    return max(1, elements // max(1, int(vocab)))


# ---------------------------------------------------------------------------------------------
# Can this model's logits be computed as h W^T + b from its last hidden states?
# ---------------------------------------------------------------------------------------------

def supports_fused_head(model: nn.Module, *, probe_input_ids: torch.Tensor | None = None,
                        rtol: float = 1e-4, atol: float = 1e-4) -> tuple[bool, str]:
    """(True, "") if the model's logits are ``model.get_output_embeddings()(last hidden state)`` with a plain
    ``nn.Linear`` head, else (False, why). Tied input/output embeddings are fine.

    Checks, without running the model: the output embeddings exist and are exactly ``nn.Linear`` (not a
    subclass such as a LoRA or quantised layer), and the config (its text config for multimodal models)
    sets none of the known logit transforms (``final_logit_softcapping``, ``logit_scale``,
    ``logits_scaling``, ``lm_head_multiplier``) to a non-neutral value. Unknown transforms in a model's
    own forward cannot be seen from the config: pass ``probe_input_ids`` (1, T) int64 to also run the
    model once and compare its logits with the head applied to ``output_hidden_states[-1]`` (within
    rtol/atol).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return False, f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:
        return False, (f"the output embeddings are a {type(head).__module__}.{type(head).__name__}, not a plain "
                       "torch.nn.Linear (adapters or quantised heads change the product)")
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    for name, neutral in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None) if config is not None else None
        if value not in neutral:
            return False, f"config.{name}={value!r} transforms the logits after the LM head"
    if probe_input_ids is not None:
        with torch.no_grad():
            out = model(input_ids=probe_input_ids, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1]
            fused = head(hidden)
        if fused.shape != out.logits.shape or not torch.allclose(fused.float(), out.logits.float(), rtol=rtol,
                                                                 atol=atol):
            diff = (fused.float() - out.logits.float()).abs().max().item() if fused.shape == out.logits.shape \
                else float("nan")
            return False, (f"probe: the model's logits differ from its head on the last hidden state (max "
                           f"|diff| {diff:.3g}): the forward transforms them")
    return True, ""


# ---------------------------------------------------------------------------------------------
# One teacher's rows, flattened, with its effective weights and their global sum
# ---------------------------------------------------------------------------------------------

@dataclass
class _Teacher:
    targets: SparseTargets | EstimatedTargets  # fields flattened to (N, W) / (N,)
    weights: torch.Tensor                      # (N,) as given (bool or float): what the loss function sees
    effective: torch.Tensor                    # (N,) compute dtype: the weight the loss function's mean uses
    total: torch.Tensor                        # 0-dim: sum of ``effective`` (the global denominator)

    def rows(self, idx: torch.Tensor):
        t = self.targets
        pick = (lambda x: None if x is None else x.index_select(0, idx))
        if isinstance(t, SparseTargets):
            return SparseTargets(pick(t.ids), pick(t.logprobs), pick(t.tail)), self.weights.index_select(0, idx)
        return EstimatedTargets(pick(t.ids), pick(t.targets), pick(t.entropy)), self.weights.index_select(0, idx)


def _flat_weights(weights, lead: tuple, name: str, device) -> torch.Tensor:
    """(N,) bool or float weights as given (None: all 1), checked as the loss functions check them."""
    n = math.prod(lead)
    if weights is None:
        return torch.ones(n, device=device)
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != lead:
        got = f"shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"{name} must be a bool or float tensor of the token shape {lead}, got {got}")
    if weights.dtype != torch.bool and not weights.is_floating_point():
        raise ValueError(f"{name} must be bool or floating point, got dtype {weights.dtype}")
    w = weights.detach().to(device).reshape(n)
    if w.is_floating_point() and bool((~torch.isfinite(w) | (w < 0)).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    return w


def _teacher(targets, weights, lead: tuple, name: str, cdt, device, kd) -> _Teacher:
    n = math.prod(lead)
    if isinstance(targets, EstimatedTargets):
        if kd is not None and (kd.kind != "forward_kl" or kd.temperature != 1.0):
            raise LogitcacheError(f"sampled / hybrid targets train forward_kl at temperature 1 only, not {kd.kind} "
                                  f"at {kd.temperature}")
    elif not isinstance(targets, SparseTargets):
        raise TypeError(f"teacher targets must be SparseTargets or EstimatedTargets, got {type(targets).__name__}")
    targets = targets.to(device)
    if tuple(targets.ids.shape[:-1]) != lead:
        raise ValueError(f"{name} ids shape {tuple(targets.ids.shape)} does not match the hidden states' token "
                         f"shape {lead}")
    w = _flat_weights(weights, lead, f"{name} weights", device)
    if isinstance(targets, SparseTargets):
        flat = SparseTargets(targets.ids.reshape(n, -1), targets.logprobs.reshape(n, -1),
                             None if targets.tail is None else targets.tail.reshape(n))
        counts = (flat.ids >= 0).any(-1)              # losses._prepare: a row without ids does not count
    else:
        flat = EstimatedTargets(targets.ids.reshape(n, -1), targets.targets.reshape(n, -1),
                                targets.entropy.reshape(n))
        counts = flat.targets.sum(-1) > 0              # estimated_forward_kl: a row without targets does not
    effective = torch.where(counts, w.to(cdt), torch.zeros((), dtype=cdt, device=device))
    return _Teacher(flat, w, effective, effective.sum())


def _chunk_kd(logits: torch.Tensor, teacher: _Teacher, idx: torch.Tensor, kd) -> torch.Tensor:
    """The chunk's token-weighted mean, exactly as ``objective.teacher_loss`` computes it on these rows."""
    targets, w = teacher.rows(idx)
    kw = kd.kd_kwargs() if kd is not None else {}
    if isinstance(targets, EstimatedTargets):
        return sampled_kd.estimated_forward_kl(logits, targets.ids, targets.targets, targets.entropy, w,
                                               chunk_rows=kw.get("chunk_rows") or losses.DEFAULT_CHUNK_ROWS)
    return losses.distillation_loss(logits, targets.ids, targets.logprobs, w, teacher_tail=targets.tail, **kw)


def _share(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """part / total, 0 where total is 0 (a loss with no counted row is 0, with a zero gradient)."""
    return part / torch.where(total > 0, total, torch.ones_like(total))


# ---------------------------------------------------------------------------------------------
# The chunk loop, and the autograd Function around it
# ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    teachers: list[_Teacher]
    coefs: list[float]                 # w_i / sum_j w_j (1.0 for a single teacher)
    teacher_weights: list[float]       # the w_i as given
    labels: torch.Tensor | None        # (N,) int64, or None without CE
    ce_rows: torch.Tensor | None       # (N,) bool: label != IGNORE_INDEX
    ce_total: torch.Tensor | None      # 0-dim compute dtype: number of CE rows
    ce_alpha: float
    kd: losses.DistillationConfig | None
    rows: torch.Tensor                 # (A,) int64: the rows with any loss, in order
    chunk_rows: int
    cdt: torch.dtype
    parts: dict | None = None          # written by ``run``: detached totals

    def run(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            need: tuple[bool, bool, bool]):
        """hidden (N, H), weight (V, H), bias (V,) or None -> (loss 0-dim in cdt, [dL/dh, dL/dW, dL/db]),
        each gradient None unless ``need`` asks for it."""
        cdt, dev = self.cdt, hidden.device
        # The products run in the inputs' dtype on CUDA when it is bf16/fp16 (tensor cores, float32
        # accumulation: the logits autocast's LM head would give), then the loss in ``cdt``; elsewhere in cdt.
        low = dev.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype
        mdt = hidden.dtype if low else cdt
        w_c = weight.detach().to(mdt)                                          # (V, H), no copy if already mdt
        b_c = None if bias is None else bias.detach().to(mdt)                  # (V,)
        grad_h = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need[0] else None  # (N, H)
        grad_w = torch.zeros(w_c.shape, dtype=cdt, device=dev) if need[1] else None                   # (V, H)
        grad_b = torch.zeros(w_c.shape[0], dtype=cdt, device=dev) if need[2] and bias is not None else None
        any_grad = any(need)
        kd_sums = [torch.zeros((), dtype=cdt, device=dev) for _ in self.teachers]
        ce_sum = torch.zeros((), dtype=cdt, device=dev)
        ce_chunk_rows = self.kd.chunk_rows if self.kd is not None else losses.DEFAULT_CHUNK_ROWS
        autocast_off = torch.autocast(device_type=dev.type, enabled=False) if dev.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with autocast_off:
            for s in range(0, self.rows.numel(), self.chunk_rows):
                idx = self.rows[s:s + self.chunk_rows]                                   # (c,)
                h = hidden.detach().index_select(0, idx).to(mdt)                         # (c, H)
                z = F.linear(h, w_c, b_c).to(cdt)                                        # (c, V)
                if any_grad:
                    z.requires_grad_(True)
                with torch.enable_grad() if any_grad else contextlib.nullcontext():
                    kd_parts = [_chunk_kd(z, t, idx, self.kd)
                                * _share(t.effective.index_select(0, idx).sum(), t.total)
                                for t in self.teachers]
                    chunk_loss = sum(c * p for c, p in zip(self.coefs, kd_parts))
                    if self.ce_alpha > 0:
                        ce = losses.hard_label_cross_entropy(z, self.labels.index_select(0, idx),
                                                             chunk_rows=ce_chunk_rows)
                        ce = ce * _share(self.ce_rows.index_select(0, idx).to(cdt).sum(), self.ce_total)
                        chunk_loss = self.ce_alpha * ce + (1.0 - self.ce_alpha) * chunk_loss
                        ce_sum += ce.detach()
                for i, p in enumerate(kd_parts):
                    kd_sums[i] += p.detach()
                if any_grad:
                    (gz,) = torch.autograd.grad(chunk_loss, z)                          # (c, V)
                    del z, chunk_loss, kd_parts                                          # the logits go now
                    gm = gz.to(mdt)
                    if grad_h is not None:
                        grad_h.index_copy_(0, idx, (gm @ w_c).to(grad_h.dtype))          # (c, H)
                    if grad_w is not None:
                        if low:
                            grad_w += gm.t() @ h                                         # (V, H), added in cdt
                        else:
                            grad_w.addmm_(gm.t(), h)                                     # (V, H)
                    if grad_b is not None:
                        grad_b += gz.sum(0)
        # the final value with the same formulas as the unfused objective
        if len(self.teachers) > 1:
            kd_total = losses.combine_teacher_losses(kd_sums, self.teacher_weights)
        else:
            kd_total = kd_sums[0]
        parts = {"kd": kd_total.detach()}
        if len(self.teachers) > 1:
            parts.update({f"kd_teacher{j}": v.detach() for j, v in enumerate(kd_sums)})
        loss = kd_total
        if self.ce_alpha > 0:
            loss = losses.mix_ce_and_kd(ce_sum, kd_total, self.ce_alpha)
            parts["ce"] = ce_sum.detach()
        parts["loss"] = loss.detach()
        self.parts = parts
        return loss, [grad_h, grad_w, grad_b]


class _FusedHeadLoss(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), bias (V,) or None, plan) -> the loss (0-dim). Forward computes the
    gradients chunk by chunk (``_Plan.run``) and saves only them; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, (gh, gw, gb) = plan.run(hidden, weight, bias, need)
        # stored in the parameters' dtypes (a bf16 weight gets a bf16 gradient either way)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.saved_tensors
        unit = bool(torch.equal(grad_output, torch.ones_like(grad_output)))

        def scale(g):
            return None if g is None else (g if unit else g * grad_output.to(g.dtype))
        return scale(gh), scale(gw), scale(gb), None


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def linear_teacher_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None,
                        targets: SparseTargets | EstimatedTargets, weights: torch.Tensor | None,
                        kd: losses.DistillationConfig | None = None, *, labels: torch.Tensor | None = None,
                        ce_alpha: float = 0.0,
                        extra_teachers: Sequence[tuple[SparseTargets | EstimatedTargets, torch.Tensor | None]] = (),
                        teacher_weights: Sequence[float] | None = None,
                        chunk_rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """The distillation objective on logits = hidden @ lm_head_weight^T (+ lm_head_bias), computed chunk by
    chunk so that no (N, V) logits tensor exists in forward or backward (module docstring).

    hidden: (B, T, H) or (N, H), any float dtype, the student's last hidden states (what the head reads).
    lm_head_weight: (V, H); lm_head_bias: (V,) or None. Gradients flow to all three.
    targets: ``SparseTargets`` or ``EstimatedTargets`` with leading shape (B, T) (or (N,)): ids (..., W).
    weights: (B, T) bool or float >= 0 token weights (``objective.token_weights``), or None (all 1).
    kd: the divergence, tail policy, temperature and inner chunk size (None: forward KL, BUCKET, T = 1).
    labels: (B, T) int64 next-token labels, ``losses.IGNORE_INDEX`` where none; needed when ce_alpha > 0.
    ce_alpha: in [0, 1]; > 0 mixes hard-label CE in: ce_alpha * CE + (1 - ce_alpha) * KD.
    extra_teachers: further (targets, weights) pairs, each weights (B, T) (the caller multiplies in that
    teacher's row mask); the KD term is then ``losses.combine_teacher_losses`` over all teachers with
    ``teacher_weights`` (None: all 1).
    chunk_rows: rows of logits alive at once (None: ``default_chunk_rows(V)``).

    Returns (loss, parts): loss a 0-dim tensor in float32 (float64 for float64 inputs), equal to the
    unfused objective (module docstring) in value and gradient; parts the detached terms for the log,
    named as ``objective.compute_loss`` names them: "kd", "ce" (ce_alpha > 0), "kd_teacher{j}" (several
    teachers), "loss".
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be a floating-point (N, H) or (B, T, H) tensor, got "
                         f"{hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else ''}")
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2 \
            or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be (V, H={hidden.shape[-1]}), got "
                         f"{tuple(lm_head_weight.shape) if isinstance(lm_head_weight, torch.Tensor) else lm_head_weight!r}")
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and (not isinstance(lm_head_bias, torch.Tensor)
                                     or tuple(lm_head_bias.shape) != (vocab,)):
        raise ValueError(f"lm_head_bias must be None or ({vocab},), got "
                         f"{tuple(lm_head_bias.shape) if isinstance(lm_head_bias, torch.Tensor) else lm_head_bias!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if not (isinstance(ce_alpha, (int, float)) and 0.0 <= float(ce_alpha) <= 1.0):
        raise ValueError(f"ce_alpha must be a number in [0, 1], got {ce_alpha!r}")
    ce_alpha = float(ce_alpha)
    if kd is not None and not isinstance(kd, losses.DistillationConfig):
        raise ValueError(f"kd must be a DistillationConfig or None, got {type(kd).__name__}")
    dev = hidden.device
    lead = tuple(hidden.shape[:-1])
    n = math.prod(lead)
    cdt = torch.float64 if torch.float64 in (hidden.dtype, lm_head_weight.dtype) else torch.float32

    teachers = [_teacher(targets, weights, lead, "targets", cdt, dev, kd)]
    for j, pair in enumerate(extra_teachers, start=1):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"extra_teachers[{j - 1}] must be a (targets, weights) pair")
        teachers.append(_teacher(pair[0], pair[1], lead, f"extra_teachers[{j - 1}]", cdt, dev, kd))
    if len(teachers) > 1:
        tw = list(teacher_weights) if teacher_weights is not None else [1.0] * len(teachers)
        losses.combine_teacher_losses([torch.zeros(())] * len(teachers), tw)      # its own argument checks
        coefs = [w / float(sum(tw)) for w in tw]
    else:
        tw, coefs = [1.0], [1.0]

    active = torch.zeros(n, dtype=torch.bool, device=dev)
    for t in teachers:
        active |= t.effective > 0
    flat_labels = ce_rows = ce_total = None
    if ce_alpha > 0:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead or labels.is_floating_point():
            raise ValueError(f"ce_alpha={ce_alpha} needs integer labels of the token shape {lead}, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
        flat_labels = labels.to(dev).reshape(n)
        ce_rows = flat_labels != losses.IGNORE_INDEX
        ce_total = ce_rows.to(cdt).sum()
        active |= ce_rows
    plan = _Plan(teachers, coefs, tw, flat_labels, ce_rows, ce_total, ce_alpha, kd,
                 active.nonzero().squeeze(1), chunk_rows or default_chunk_rows(vocab, dev), cdt)

    h2 = hidden.reshape(n, hidden.shape[-1])                                     # (N, H)
    grads_wanted = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, lm_head_weight, lm_head_bias))
    if grads_wanted:
        loss = _FusedHeadLoss.apply(h2, lm_head_weight, lm_head_bias, plan)
    else:
        loss, _ = plan.run(h2, lm_head_weight, lm_head_bias, (False, False, False))
    return loss, plan.parts
