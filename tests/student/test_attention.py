"""Packed rows without a dense mask: the packed path gives every document the logits it has alone."""

import pytest
import torch

from logitcache.format.errors import LogitcacheError
from student_train.attention import Attention, choose_attention, probe
from student_train.objective import forward

CPU = torch.device("cpu")
LENGTHS = [[4, 6, 3], [9, 5]]           # documents per row; the rest of a row of 16 is padding


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def packed_batch(T: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (len(LENGTHS), T), generator=g)
    pos, docs = torch.zeros_like(ids), torch.zeros_like(ids)
    for r, lengths in enumerate(LENGTHS):
        s = 0
        for d, n in enumerate(lengths, start=1):
            pos[r, s:s + n], docs[r, s:s + n] = torch.arange(n), d
            s += n
        pos[r, s:] = torch.arange(T - s)          # padding: positions of its own, document 0
    return {"input_ids": ids, "position_ids": pos, "document_ids": docs}


def each_document_alone(model, batch) -> list[tuple[int, int, int, torch.Tensor]]:
    out = []
    for r, lengths in enumerate(LENGTHS):
        s = 0
        for n in lengths:
            ids = batch["input_ids"][r:r + 1, s:s + n]
            out.append((r, s, n, model(input_ids=ids, use_cache=False).logits[0]))
            s += n
    return out


@pytest.mark.parametrize("mode", ["sdpa", "dense", "flex", "flash"])
def test_packed_logits_equal_each_document_alone(mode):
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if mode in ("flex", "flash") and device.type != "cuda":
        pytest.skip(f"--attention {mode} needs CUDA (no GPU here)")
    if mode == "flash" and not __import__("importlib").util.find_spec("flash_attn"):
        pytest.skip("flash-attn is not installed")
    model = tiny_llama().to(device)
    batch = {k: v.to(device) for k, v in packed_batch().items()}
    amp = torch.bfloat16 if mode == "flash" else None
    att = choose_attention(model, mode, device, amp)
    assert (att.mode, att.reason) == (mode, "")
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        packed = forward(model, batch, False, att).logits.float()
        alone = each_document_alone(model, batch)
    tol = 2e-2 if amp is not None else 1e-5
    for r, s, n, logits in alone:
        torch.testing.assert_close(packed[r, s:s + n], logits.float(), rtol=0, atol=tol, msg=f"row {r} at {s}")


def test_auto_on_the_cpu_takes_sdpa_without_a_mask():
    model = tiny_llama()
    att = choose_attention(model, "auto", CPU)
    assert att == Attention("sdpa", "sdpa", "")
    assert "attention_mask" not in att.model_kwargs(packed_batch())


def test_a_model_that_ignores_the_restarts_falls_back_to_the_dense_mask(monkeypatch):
    import transformers.masking_utils as mu

    model = tiny_llama()
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)   # packing not detected
    err = probe(model, Attention("sdpa", "sdpa"), CPU, None)
    assert err is not None and "packed documents attended to each other" in err
    att = choose_attention(model, "auto", CPU)
    assert att.mode == "dense" and att.reason.startswith("sdpa: packed documents attended to each other")
    with pytest.raises(LogitcacheError, match=r"--attention sdpa: not usable with this student \(packed documents"):
        choose_attention(model, "sdpa", CPU)


def test_kernels_that_need_cuda_are_refused_by_name_on_the_cpu():
    with pytest.raises(LogitcacheError, match=r"--attention flex: not usable with this student \(needs a CUDA device"):
        choose_attention(tiny_llama(), "flex", CPU)
    with pytest.raises(LogitcacheError, match=r"--attention 'paged': choose one of auto, flash, flex, sdpa, dense"):
        choose_attention(tiny_llama(), "paged", CPU)


def test_flex_block_mask_keeps_documents_apart():
    """Our BlockMask (forward only on the CPU: FlexAttention has no CPU backward; CUDA runs the test above)."""
    from student_train.attention import set_implementation

    model = tiny_llama()
    batch = packed_batch()
    set_implementation(model, "flex_attention")
    att = Attention("flex", "flex_attention")
    assert probe(model, att, CPU, None) is None
    with torch.no_grad():
        packed = forward(model, batch, False, att).logits
        set_implementation(model, "sdpa")
        for r, s, n, logits in each_document_alone(model, batch):
            torch.testing.assert_close(packed[r, s:s + n], logits, rtol=0, atol=1e-5, msg=f"row {r} at {s}")
