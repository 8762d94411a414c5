import pytest


def _reference(logits, targets):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def _loss_and_grad(fn, logits, targets, upstream=1.0):
    leaf = logits.detach().requires_grad_()
    loss = fn(leaf, targets)
    (loss * upstream).backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("rows", [1, 3, 7, 64])
def test_summed_cross_entropy_equals_pytorchs_in_fp32(rows):
    """Chunks that divide the rows or not, ignored targets among them, an upstream gradient other than 1."""
    import torch

    from ironman_nb.loss import summed_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(20, 97) * 4
    targets = torch.randint(0, 97, (20,))
    targets[::3] = -100
    ours, ours_grad = _loss_and_grad(lambda x, t: summed_cross_entropy(x, t, rows), logits, targets, upstream=0.25)
    ref, ref_grad = _loss_and_grad(_reference, logits, targets, upstream=0.25)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(ours_grad, ref_grad, atol=1e-7)
    assert not ours_grad[::3].any()  # ignored rows get no gradient


def test_summed_cross_entropy_in_bf16_matches_an_fp32_loss_over_bf16_logits():
    """bf16 logits: the loss is computed in fp32 as the trainer's plain path did (`logits.float()`), and the
    gradient comes back in bf16, within bf16 rounding of PyTorch's."""
    import torch

    from ironman_nb.loss import summed_cross_entropy

    torch.manual_seed(1)
    logits = (torch.randn(33, 500) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 500, (33,))
    targets[5] = -100
    ours, ours_grad = _loss_and_grad(lambda x, t: summed_cross_entropy(x, t, 4), logits, targets)
    ref, ref_grad = _loss_and_grad(_reference, logits, targets)
    assert ours.dtype == torch.float32 and ours_grad.dtype == torch.bfloat16
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(ours_grad.float(), ref_grad.float(), atol=2e-3, rtol=1e-2)


def test_summed_cross_entropy_with_nothing_to_learn():
    import torch

    from ironman_nb.loss import summed_cross_entropy

    logits = torch.randn(4, 10)
    loss, grad = _loss_and_grad(summed_cross_entropy, logits, torch.full((4,), -100))
    assert loss.item() == 0 and not grad.any()
    empty, empty_grad = _loss_and_grad(summed_cross_entropy, torch.randn(0, 10), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0 and empty_grad.shape == (0, 10)


def test_chunk_rows_bound_the_fp32_chunk():
    from ironman_nb.loss import chunk_rows

    assert chunk_rows(49_152, "cpu") == 21 and chunk_rows(152_064, "cpu") == 6
    assert chunk_rows(152_064, "cuda") == chunk_rows(152_064, "mps") == 441
    assert chunk_rows(10**9, "cpu") == 1
