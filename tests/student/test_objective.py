"""The objective with the fused LM head + loss inside the student's own forward (``LossHead``) equals
the objective on the full logits: value and gradient of every parameter, in float64."""

import pytest
import torch

from student_train.attention import choose_attention
from student_train.config import TrainConfig
from student_train.objective import LossHead, compute_loss, install_loss_head
from student_train.targets import SparseTargets

V, B, T, K = 300, 2, 12, 8


def tiny_llama(**kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, **kw)
    return AutoModelForCausalLM.from_config(cfg).double()


def batch() -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.cat([torch.arange(5), torch.arange(T - 5)]).repeat(B, 1)
    docs = torch.cat([torch.full((5,), 1), torch.full((T - 5,), 2)]).repeat(B, 1)
    docs[1, -3:] = 0                                                   # padding
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    lp, top = torch.log_softmax(logits, -1).topk(K, -1)
    tail = (1 - lp.exp().sum(-1)).float()
    mask = docs != 0
    mask[0, :2] = False                                                # a prompt
    labels = torch.where(mask, torch.roll(ids, -1, 1), torch.full_like(ids, -100))
    return {"input_ids": ids, "position_ids": pos, "document_ids": docs, "loss_mask": mask, "labels": labels,
            "teacher": SparseTargets(top, lp.float(), tail)}


@pytest.mark.parametrize("loss,ce_alpha", [("forward_kl", 0.0), ("reverse_kl", 0.3), ("generalized_jsd", 0.0)])
def test_fused_head_objective_equals_the_logits_objective(loss, ce_alpha, tmp_path):
    cfg = TrainConfig(cache="unused", out=str(tmp_path), loss=loss, ce_alpha=ce_alpha)
    kd = cfg.objective()
    results = []
    for fused in (False, True):
        model = tiny_llama()
        attention = choose_attention(model, "sdpa", torch.device("cpu"))
        head = None
        if fused:
            head, why = install_loss_head(model)
            assert isinstance(head, LossHead) and why == ""
        value, parts = compute_loss(cfg, kd, model, batch(), None, [], attention, head)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, parts))
    (v0, g0, p0), (v1, g1, p1) = results
    torch.testing.assert_close(v1.double(), v0.double(), rtol=1e-10, atol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-8, atol=1e-12, msg=name)
    assert set(p0) == set(p1) and ("ce" in p1) == (ce_alpha > 0)


def test_a_head_that_transforms_its_logits_is_not_fused():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    head, why = install_loss_head(model)
    assert head is None and "final_logit_softcapping=30.0 transforms the logits" in why
    assert type(model.get_output_embeddings()) is torch.nn.Linear        # left as it was


def test_outside_the_loss_the_head_is_a_plain_linear_layer():
    model = tiny_llama()
    x = torch.randint(0, V, (1, 6))
    before = model(input_ids=x, use_cache=False).logits
    install_loss_head(model)
    torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, before, rtol=0, atol=0)


def test_fused_loss_choice_follows_the_flag_and_the_logits_size():
    from logitcache.format.errors import LogitcacheError
    from student_train.objective import choose_loss_head, device_memory_bytes

    cpu = torch.device("cpu")
    assert choose_loss_head(tiny_llama(), "off", 1 << 40, cpu) == (None, "--fused-loss off")
    head, why = choose_loss_head(tiny_llama(), "auto", 1 << 20, cpu)
    assert head is None and why.startswith("auto: a micro-batch's logits take 0.00 GiB, under a quarter")
    big = device_memory_bytes(cpu) // 4 + 1
    head, why = choose_loss_head(tiny_llama(), "auto", big, cpu)
    assert isinstance(head, LossHead) and why == ""
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert choose_loss_head(capped, "auto", big, cpu)[0] is None
    with pytest.raises(LogitcacheError, match=r"--fused-loss on: config.final_logit_softcapping=30.0 transforms"):
        choose_loss_head(capped, "on", 1, cpu)
