"""The chunked loss (qshard/loss.py) against today's unchunked F.cross_entropy: same sum, same gradients."""

import pytest
import torch
import torch.nn.functional as F

from qshard import loss as loss_module
from qshard.data import IGNORE
from qshard.loss import next_token_loss_sum


def unchunked_loss_sum(logits, labels, dtype=torch.float32):
    """The code qshard/train.py::token_loss_sum ran before the chunked loss (in fp64: the exact answer)."""
    shifted = logits[:, :-1].to(dtype)
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def loss_and_grad(fn, logits, labels, scale=0.37):
    """Loss and d(scale * loss)/d(logits); the scale stands for the loop's division by the token count."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, labels)
    (loss * scale).backward()
    return loss.detach(), x.grad


def random_batch(rows=3, seq=9, vocab=50, dtype=torch.float32, seed=0):
    """Logits with a wide spread (up to +-8) and labels with padding and an all-ignored row."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, seq, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[1, -4:] = IGNORE  # right padding
    labels[2, :] = IGNORE  # nothing to learn in this row
    return logits, labels


@pytest.fixture(params=[1, 7, 10_000], ids=["rows_of_one", "rows_of_seven", "one_chunk"])
def chunk_rows(request, monkeypatch):
    """Chunks of 1 row, 7 rows (the last chunk shorter) or everything in one chunk, at vocabulary 50."""
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 50 * request.param)


def test_fp32_loss_matches_unchunked_within_1e6_and_gradients_to_fp32_rounding(chunk_rows):
    logits, labels = random_batch()
    want, want_grad = loss_and_grad(unchunked_loss_sum, logits, labels)
    got, got_grad = loss_and_grad(next_token_loss_sum, logits, labels)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # Elementwise 1e-6 is below either code's own error (see the fp64 test); measured max diff 1.2e-7.
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-6 * float(want_grad.abs().max()))


def test_fp32_gradients_at_32k_vocabulary_are_no_further_from_fp64_than_unchunked():
    """At a real vocabulary both codes' gradients differ from the exact (fp64) ones by fp32 rounding of a
    log-sum-exp near 20; the chunked one measured 3.1e-7 at most against 2.0e-6 for F.cross_entropy."""
    logits, labels = random_batch(seq=256, vocab=32_000)
    exact = loss_and_grad(lambda x, y: unchunked_loss_sum(x, y, torch.float64), logits.double(), labels)
    errors = [(loss_and_grad(fn, logits, labels)[1].double() - exact[1]).abs().max()
              for fn in (unchunked_loss_sum, next_token_loss_sum)]
    assert errors[1] <= errors[0]
    assert errors[1] < 2e-6 * float(exact[1].abs().max())  # measured 8.4e-7 (unchunked: 5.5e-6)


def test_bf16_loss_matches_and_gradients_match_to_one_bf16_rounding(chunk_rows):
    logits, labels = random_batch(dtype=torch.bfloat16)
    want, want_grad = loss_and_grad(unchunked_loss_sum, logits, labels)
    got, got_grad = loss_and_grad(next_token_loss_sum, logits, labels)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # Both compute the gradient in fp32 and round it to bf16 once; a tie can round either way (1 ulp).
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2 ** -7, atol=1e-6)


def test_all_ignored_and_single_token_give_zero_loss_and_zero_gradient():
    for logits, labels in [(torch.randn(2, 5, 11), torch.full((2, 5), IGNORE)),
                           (torch.randn(1, 1, 11), torch.tensor([[3]]))]:
        got, grad = loss_and_grad(next_token_loss_sum, logits, labels)
        want, _ = loss_and_grad(unchunked_loss_sum, logits, labels)
        assert float(got) == float(want) == 0.0
        assert float(grad.abs().max()) == 0.0


def test_second_backward_through_the_same_graph_raises_instead_of_reading_overwritten_logits():
    logits, labels = random_batch()
    x = logits.clone().requires_grad_(True)
    loss = next_token_loss_sum(x * 1.0, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_no_grad_evaluation_leaves_the_logits_untouched():
    logits, labels = random_batch()
    kept = logits.clone()
    with torch.no_grad():
        got = next_token_loss_sum(logits, labels)
    assert torch.equal(logits, kept)
    torch.testing.assert_close(got, unchunked_loss_sum(logits, labels), rtol=1e-6, atol=0)


def test_saves_one_fp32_number_per_token_beyond_the_logits():
    """What autograd keeps between forward and backward: the logits (already alive), the targets and
    one fp32 log-sum-exp per token; the old code saved an fp32 log-softmax of the whole logits."""
    logits, labels = random_batch(seq=64, vocab=1000, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        next_token_loss_sum(x, labels)
    new_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert new_bytes == 3 * 64 * (8 + 4)  # int64 target + fp32 log-sum-exp per token; logits: 384 KB


def test_the_planner_budgets_the_chunk_the_loss_uses():
    from qshard.tools import plan
    assert plan.LOSS_CHUNK_ELEMENTS == loss_module.CHUNK_ELEMENTS
