"""Muon's orthogonalisation and update rule, single process."""
import pytest

torch = pytest.importorskip("torch")

from trainer.fixtures import tiny_config  # noqa: E402
from trainer.optim import NEWTON_SCHULZ, POLAR_EXPRESS, Muon, orthogonalize  # noqa: E402


def svd_polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48), (3, 32, 96)])
def test_polar_express_matches_svd_reference(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    X = orthogonalize(G).float()
    ref = svd_polar(G)
    rel = (X - ref).norm() / ref.norm()
    sv = torch.linalg.svdvals(X)
    # a square Gaussian matrix has a few tiny singular values that five iterations cannot lift fully
    assert rel < (0.2 if shape[-1] == shape[-2] else 0.1)
    assert sv.max() < 1.2 and (sv.min() > 0.75 or shape[-1] == shape[-2])


def test_polar_express_is_closer_than_plain_newton_schulz():
    torch.manual_seed(1)
    G = torch.randn(96, 256)
    ref = svd_polar(G)
    err_pe = (orthogonalize(G, POLAR_EXPRESS).float() - ref).norm()
    err_ns = (orthogonalize(G, NEWTON_SCHULZ).float() - ref).norm()
    assert err_pe < err_ns


def test_orthogonalize_ignores_gradient_scale():
    torch.manual_seed(2)
    G = torch.randn(32, 64)
    a, b = orthogonalize(G).float(), orthogonalize(1000 * G).float()
    assert (a - b).norm() / a.norm() < 0.1   # equal up to bf16 rounding (unnormalised, 1000*G would overflow)


def test_muon_step_is_orthogonalised_nesterov_momentum():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(16, 32))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9)
    g1, g2 = torch.randn(16, 32), torch.randn(16, 32)
    p.grad = g1.clone()
    opt.step()
    buf = 0.1 * g1
    expect = start - 0.1 * orthogonalize(g1.lerp(buf, 0.9), NEWTON_SCHULZ, margin=1.0).float()   # the default
    assert torch.allclose(p.detach(), expect, atol=1e-6)
    p.grad = g2.clone()
    opt.step()
    buf = buf.lerp(g2, 0.1)
    expect = expect - 0.1 * orthogonalize(g2.lerp(buf, 0.9), NEWTON_SCHULZ, margin=1.0).float()
    assert torch.allclose(p.detach(), expect, atol=1e-6)


def test_muon_scales_tall_matrices_by_aspect_ratio():
    torch.manual_seed(4)
    tall = torch.nn.Parameter(torch.zeros(64, 16))
    tall.grad = torch.randn(64, 16)
    # Polar Express: its singular values land near 1 (Newton-Schulz's spread over [0.7, 1.2])
    Muon([tall], lr=1.0, momentum=0.0, nesterov=False, polynomial="polar_express").step()
    # orthogonal columns of norm ~1, scaled by sqrt(64/16) = 2
    col_norms = tall.detach().norm(dim=0)
    assert torch.allclose(col_norms, torch.full((16,), 2.0), atol=0.3)


def test_a_matrix_own_lr_scale_replaces_the_aspect_rule():
    """record-28 lays out c_fc as (dim, 4*dim), so its lr is not doubled: our (4*dim, dim) c_fc carries 1.0."""
    from trainer.model import GPT

    torch.manual_seed(5)
    tall, marked = torch.nn.Parameter(torch.zeros(64, 16)), torch.nn.Parameter(torch.zeros(64, 16))
    marked.muon_lr_scale = 1.0
    g = torch.randn(64, 16)
    tall.grad, marked.grad = g.clone(), g.clone()
    Muon([tall, marked], lr=1.0, momentum=0.0, nesterov=False).step()
    assert torch.allclose(tall.detach(), 2.0 * marked.detach())
    model = GPT(tiny_config())
    assert all(b.mlp.c_fc.weight.muon_lr_scale == 1.0 for b in model.blocks)
    assert not hasattr(model.blocks[0].mlp.c_proj.weight, "muon_lr_scale")   # (dim, 4*dim): the rule gives 1


def test_the_records_mlp_lr_multipliers_scale_c_fc_and_c_proj_steps_and_leave_attention_alone():
    from trainer.model import GPT

    torch.manual_seed(0)
    plain, scaled = GPT(tiny_config()), GPT(tiny_config(muon_mlp_lr_scales="2,4"))
    scaled.load_state_dict(plain.state_dict())
    b = scaled.blocks[0]
    assert (b.mlp.c_fc.weight.muon_lr_scale, b.mlp.c_proj.weight.muon_lr_scale) == (2.0, 4.0)
    steps = []
    for model in (plain, scaled):
        block = model.blocks[0]
        for p in (block.mlp.c_fc.weight, block.mlp.c_proj.weight, block.attn.qkv_w):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        params = [block.mlp.c_fc.weight, block.mlp.c_proj.weight, block.attn.qkv_w]
        before = [p.detach().clone() for p in params]
        Muon(params, lr=0.01, momentum=0.0, nesterov=False).step()
        steps.append([p.detach() - q for p, q in zip(params, before)])
    for (a, b_), k in zip(zip(*steps), (2.0, 4.0, 1.0)):
        torch.testing.assert_close(b_, k * a)


@pytest.mark.parametrize("text", ["2", "2,4,8", "2,-1", "two,4"])
def test_mlp_lr_multipliers_other_than_two_positive_numbers_are_refused_by_name(text):
    with pytest.raises(ValueError, match="^muon_mlp_lr_scales: must be two positive numbers"):
        tiny_config(muon_mlp_lr_scales=text)
