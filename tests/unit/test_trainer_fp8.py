"""The FP8 head matmul against a float32 reference (CPU here where torch has FP8 _scaled_mm; GPU in test_trainer_gpu)."""
import pytest

torch = pytest.importorskip("torch")

from trainer.fp8 import fp8_forward_linear, fp8_linear  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cpu_fp8_or_skip(fn, *args):
    """fn(*args), or skip the test where this torch has no CPU FP8 matmul."""
    try:
        return fn(*args)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU FP8 matmul: {e}")


def fp8_linear_matches_reference(device, M, K, N):
    torch.manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(M, K, device=device), (K,)).bfloat16().requires_grad_()
    w = (torch.randn(N, K, device=device) * 0.02).requires_grad_()
    # a cross-entropy-like gradient: every entry within the 1/M bound the head's scaling assumes
    g = (torch.rand(M, N, device=device) * 2 - 1) / M
    y = fp8_linear(x, w)
    ref_x, ref_w = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    ref = ref_x @ ref_w.t()
    assert rel(y, ref) < 0.06           # e4m3 keeps 3 mantissa bits: ~4% per-element error, averaged down
    y.backward(g.bfloat16())
    ref.backward(g)
    assert rel(x.grad, ref_x.grad) < 0.1 and rel(w.grad, ref_w.grad) < 0.1   # e5m2 gradients: 2 mantissa bits


def fp8_forward_linear_matches_reference(device, M, K, N):
    """Forward within e4m3's rounding of float32 math; backward exactly the bf16 matmuls of the unrounded operands."""
    torch.manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(1, M, K, device=device), (K,)).bfloat16().requires_grad_()
    w = (torch.randn(N, K, device=device) * 0.02).requires_grad_()
    y = fp8_forward_linear(x, w)
    assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
    assert rel(y, x.detach().float() @ w.detach().t()) < 0.06
    g = torch.randn(1, M, N, device=device, dtype=torch.bfloat16)
    y.backward(g)
    assert torch.equal(x.grad, g @ w.detach().bfloat16())
    assert w.grad.dtype == torch.float32
    assert torch.equal(w.grad, (g[0].t() @ x.detach()[0]).float())


def test_fp8_forward_linear_on_cpu():
    cpu_fp8_or_skip(fp8_forward_linear, torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 32))
    fp8_forward_linear_matches_reference("cpu", M=256, K=128, N=384)


def test_fp8_linear_close_to_float32_on_cpu():
    cpu_fp8_or_skip(fp8_linear, torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(16, 32))
    fp8_linear_matches_reference("cpu", M=256, K=128, N=512)


def test_fp8_activations_never_overflow():
    """Rms-normed rows can hold one entry of size sqrt(dim): the fixed scale keeps it finite."""
    x = torch.zeros(16, 64, dtype=torch.bfloat16)
    x[:, 0] = 64 ** 0.5
    y = cpu_fp8_or_skip(fp8_linear, x, torch.ones(16, 64))
    assert torch.isfinite(y.float()).all() and torch.allclose(y.float(), torch.full((16, 16), 8.0), rtol=0.07)
