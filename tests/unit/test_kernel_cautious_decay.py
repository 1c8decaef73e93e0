"""record-89's cautious decay kernel (trainer/kernels/cautious_decay.py) against its torch rule.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py) at small, ragged sizes; the `gpu` test
repeats it at a table's size, compiled.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from trainer.kernels.cautious_decay import BLOCK, cautious_decay_, cautious_decay_reference_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(n: int, seed: int = 0, device: str = DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    p, grad, m = (torch.randn(n, generator=g, device=device) for _ in range(3))
    return p, grad, m


def both(p, grad, m, beta1, rate):
    a, b = p.clone(), p.clone()
    cautious_decay_(a, grad, m, beta1, rate)
    cautious_decay_reference_(b, grad, m, beta1, rate)
    return a, b


@pytest.mark.parametrize("n,first", [(BLOCK * 2, False), (BLOCK + 37, False), (5, True), (3 * BLOCK - 1, True)])
def test_the_kernel_decays_where_the_torch_rule_does_to_an_ulp(n, first):
    p, grad, m = tables(n)
    a, b = both(p, grad, None if first else m, 0.75, 0.01)
    step = grad * 0.25 if first else 0.75 * m + 0.25 * grad
    edge = step.abs() < 1e-6   # lerp against multiply-add: the mask may differ within an ulp of zero
    shrinks, grows = (step * p > 0) & ~edge, (step * p < 0) & ~edge
    assert shrinks.any() and grows.any()
    assert torch.equal(a[grows], p[grows]) and torch.equal(b[grows], p[grows])   # where Adam grows |p|: untouched
    assert not torch.equal(a[shrinks], p[shrinks])
    # x - rate * x rounded once (a fused multiply-add) or twice (torch's two ops): an ulp apart at most
    torch.testing.assert_close(a[shrinks], b[shrinks], rtol=1.2e-7, atol=0)
    torch.testing.assert_close(a[shrinks], (p[shrinks].double() * 0.99).float(), rtol=1.2e-7, atol=0)


def test_a_two_dimensional_table_and_bfloat16_keep_their_shape_and_dtype():
    p, grad, m = (t.view(3, -1) for t in tables(3 * 40))
    a, b = both(p, grad, m, 0.5, 0.2)
    assert a.shape == (3, 40)
    torch.testing.assert_close(a, b, rtol=1.2e-7, atol=0)
    low = p.bfloat16()
    a, b = both(low, grad.bfloat16(), m.bfloat16(), 0.5, 0.2)
    assert a.dtype == torch.bfloat16 and (a.float() - b.float()).abs().max() <= 0.01 * low.float().abs().max()


def test_a_strided_table_is_refused_with_a_sentence():
    p, grad, m = tables(64)
    with pytest.raises(ValueError, match="contiguous"):
        cautious_decay_(p.view(8, 8).t(), grad.view(8, 8), m.view(8, 8), 0.9, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_kernel_matches_the_torch_rule_on_a_bigram_sized_table():
    p, grad, m = tables(50304 * 15 * 192 // 8)
    a, b = both(p, grad, m, 0.75, 0.6 ** 2 * 0.005 * 5)
    edge = torch.lerp(grad, m, 0.75).abs() < 1e-6
    torch.testing.assert_close(a[~edge], b[~edge], rtol=1.2e-7, atol=0)
