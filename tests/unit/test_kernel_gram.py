"""The symmetric matmul of Muon's orthogonalisation against float64 torch, and orthogonalize's two paths.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py) on small shapes with 32-row
tiles; the GPU tests run it compiled at the shapes of the record's Muon stacks.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from trainer.kernels.gram import gram, gram_reference  # noqa: E402
from trainer.optim import NEWTON_SCHULZ, POLAR_EXPRESS, Muon, orthogonalize  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bf16(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).bfloat16().to(DEV)


def symmetric(batch, m, seed=1):
    a = bf16(batch, m, m, seed=seed).float()
    return ((a + a.mT) / 2).bfloat16()


@pytest.mark.parametrize("shape,transposed", [((2, 45, 70), False), ((3, 64, 96), False), ((2, 70, 33), True),
                                              ((1, 200, 24), False)])
def test_gram_matches_float64_and_writes_every_element(shape, transposed):
    # (1, 200, 24): 7 row tiles of 32, 28 lower-triangle tiles, to walk the tile numbering past its first rows
    x = bf16(*shape[:-2], shape[-1], shape[-2]).mT if transposed else bf16(*shape)
    m = x.size(-2)
    out = torch.full((x.size(0), m, m), float("nan"), dtype=torch.bfloat16, device=DEV)
    gram(x, out=out)
    assert not out.isnan().any()
    assert torch.equal(out, out.mT)                 # mirrored tiles are bit-for-bit the computed ones
    assert rel_err(out, gram_reference(x.double())) < 4e-3   # bf16 rounding of the output


def test_gram_epilogue_is_polar_express_step():
    a = symmetric(2, 80)
    b, c = -2.7724, 0.5061
    out = gram(a, add=a, alpha=c, beta=b)
    ref = b * a.double() + c * (a.double() @ a.double())
    assert rel_err(out, ref) < 4e-3
    assert torch.equal(out, out.mT)


def test_gram_keeps_leading_dims_and_scales():
    x = bf16(2, 3, 40, 50)
    out = gram(x, alpha=0.5)
    assert out.shape == (2, 3, 40, 40)
    assert rel_err(out, gram_reference(x.double(), alpha=0.5)) < 4e-3


def test_gram_refuses_mismatched_shapes():
    x = bf16(2, 40, 50)
    with pytest.raises(ValueError, match="add is"):
        gram(x, add=bf16(2, 50, 50))
    with pytest.raises(ValueError, match="out is"):
        gram(x, out=torch.empty(2, 40, 40, device=DEV))          # float32 out for a bf16 x
    with pytest.raises(ValueError, match="at least 2 dims"):
        gram(bf16(40))


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 80, 48), (2, 2, 40, 40)])
def test_orthogonalize_symmetric_path_computes_the_same_polynomials(shape):
    g = bf16(*shape, seed=3).float()
    # one iteration: only the bf16 roundings of one step separate either path from float64 (~3.5e-3 seen)
    one = POLAR_EXPRESS[:1]
    exact = orthogonalize(g, one, dtype=torch.float64)
    assert rel_err(orthogonalize(g, one, symmetric=True), exact) < 6e-3
    assert rel_err(orthogonalize(g, one), exact) < 6e-3
    # five: the iteration amplifies rounding (an input change of 1e-4 moves the bf16 output ~3.5%), so
    # both bf16 paths sit ~4-6% from float64; another polynomial (plain Newton-Schulz) sits >20% away
    exact = orthogonalize(g, dtype=torch.float64)
    out = orthogonalize(g, symmetric=True)
    assert out.shape == g.shape
    assert rel_err(out, exact) < 8e-2
    assert rel_err(orthogonalize(g, NEWTON_SCHULZ, symmetric=True), exact) > 0.15
    sv = torch.linalg.svdvals(out.double())   # orthogonal: singular values near 1
    assert sv.min() > 0.6 and sv.max() < 1.3


def test_muon_config_takes_the_kernel_flag():
    from trainer.config import TrainConfig

    with pytest.raises(ValueError, match="muon_kernel"):
        TrainConfig(muon_kernel="cuda").validate()
    p = torch.nn.Parameter(torch.randn(8, 4))
    assert Muon([p], symmetric_kernel=True).symmetric_kernel


@gpu
@pytest.mark.parametrize("shape", [(36, 768, 768), (12, 768, 3072)])
def test_gram_record_shapes(shape):
    x = bf16(*shape)
    out = torch.full((shape[0], shape[1], shape[1]), float("nan"), dtype=torch.bfloat16, device=DEV)
    gram(x, out=out)
    assert not out.isnan().any() and torch.equal(out, out.mT)
    assert rel_err(out, gram_reference(x.float())) < 4e-3
    a = (out / out.norm(dim=(-2, -1), keepdim=True)).contiguous()
    step = gram(a, add=a, alpha=0.5, beta=-2.8)
    assert rel_err(step, gram_reference(a.float(), a.float(), 0.5, -2.8)) < 4e-3


@gpu
def test_muon_step_with_symmetric_kernel_matches_torch():
    torch.manual_seed(0)
    start = [torch.randn(s, device="cuda") * 0.02 for s in ((3, 768, 768), (3072, 768))]
    updates = []
    for sym in (False, True):
        ps = [torch.nn.Parameter(w.clone()) for w in start]
        for p in ps:
            p.grad = torch.randn(p.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(p.numel()))
        Muon(ps, lr=0.05, symmetric_kernel=sym).step()
        updates.append([p.detach() - w for p, w in zip(ps, start)])
    for ref, out in zip(*updates):
        assert rel_err(out, ref) < 3e-2
