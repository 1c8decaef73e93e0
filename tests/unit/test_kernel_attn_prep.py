"""The attention's q/k rms-norm + rotary + value mix kernels (trainer/kernels/attn_prep.py) against the torch math.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py) at small shapes, ragged token
counts included; the `gpu` tests repeat it at the trainer's shape, compiled.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from trainer.kernels.attn_prep import BLOCK_T, attn_prep, attn_prep_reference  # noqa: E402
from trainer.layers import Rotary  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, T, H, D, dtype, with_ve=True, seed=0, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = (torch.randn(B, T, 3, H, D, generator=g, device=device) * 3).to(dtype)
    ve = torch.randn(B, T, H * D, generator=g, device=device).to(dtype) if with_ve else None
    lambdas = torch.tensor([0.7, -0.4], device=device)
    theta = torch.outer(torch.arange(T, device=device, dtype=torch.float32), Rotary(D).freqs.to(device))
    grads = [torch.randn(B, T, H, D, generator=g, device=device).to(dtype) for _ in range(3)]
    return qkv, ve, lambdas, theta.cos().to(dtype), theta.sin().to(dtype), grads


def outputs_and_grads(fn, qkv, ve, lambdas, cos, sin, grads):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (qkv, ve, lambdas)]
    out = fn(*leaves, cos, sin)
    torch.autograd.backward(out, grads)
    return [t.float() for t in out] + [t.grad.float() for t in leaves if t is not None]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("T,with_ve", [(3 * BLOCK_T, True), (2 * BLOCK_T + 5, True), (7, False)])
def test_outputs_and_gradients_match_the_torch_math_in_float32(T, with_ve):
    args = make(2, T, 3, 16, torch.float32, with_ve, seed=T)
    got = outputs_and_grads(attn_prep, *args)
    want = outputs_and_grads(attn_prep_reference, *args)
    names = ["q", "k", "v", "grad qkv", "grad ve", "grad lambdas"] if with_ve else \
        ["q", "k", "v", "grad qkv", "grad lambdas"]
    errors = {n: rel(a, b) for n, a, b in zip(names, got, want)}
    assert all(e < 1e-5 for e in errors.values()), errors


def bf16_errors(qkv, ve, lambdas, cos, sin, grads):
    """The kernels on bf16 inputs against the torch math in float32 on the same bf16 values (the kernels
    round each output once): relative errors of the outputs and gradients."""
    got = outputs_and_grads(attn_prep, qkv, ve, lambdas, cos, sin, grads)
    want = outputs_and_grads(attn_prep_reference, qkv.float(), ve.float(), lambdas, cos.float(), sin.float(),
                             [g.float() for g in grads])
    return [rel(a, b) for a, b in zip(got, want)]


def test_bf16_matches_the_torch_math_within_bf16_rounding():
    args = make(1, 2 * BLOCK_T + 3, 2, 32, torch.bfloat16)
    errors = bf16_errors(*args)
    assert max(errors) < 8e-3, errors
    assert all(t.dtype == torch.bfloat16 for t in attn_prep(*args[:5]))


def test_gradients_in_flex_attentions_layout_are_read_through_their_strides():
    """FlexAttention hands back (B, H, T, D) gradients; seen as (B, T, H, D) they are strided, not copied."""
    B, T, H, D = 1, BLOCK_T + 9, 3, 16
    qkv, ve, lambdas, cos, sin, _ = make(B, T, H, D, torch.float32)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    grads = [torch.randn(B, H, T, D, generator=g, device=DEVICE).transpose(1, 2) for _ in range(3)]
    assert not grads[0].is_contiguous()
    got = outputs_and_grads(attn_prep, qkv, ve, lambdas, cos, sin, grads)
    want = outputs_and_grads(attn_prep_reference, qkv, ve, lambdas, cos, sin, [t.contiguous() for t in grads])
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, want))


def test_bad_shapes_are_one_sentence():
    qkv, ve, lambdas, cos, sin, _ = make(1, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="rotary tables"):
        attn_prep(qkv, ve, lambdas, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="expected \\(B, T, 3, heads, head_dim\\)"):
        attn_prep(qkv[:, :, :2], ve, lambdas, cos, sin)


@pytest.mark.gpu
@cuda
def test_trainer_shape_compiled_on_the_gpu():
    errors = bf16_errors(*make(1, 48 * 1024, 6, 128, torch.bfloat16))
    assert max(errors) < 8e-3, errors


def test_op_schema_fake_tensor_and_autograd_registration():
    qkv, ve, lambdas, cos, sin, _ = make(1, 8, 2, 16, torch.float32)
    for v in (ve, None):
        torch.library.opcheck(attn_prep, (qkv.requires_grad_(), v, lambdas.requires_grad_(), cos, sin),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_model_on_cpu_keeps_the_torch_path():
    from trainer.layers import Attention

    torch.manual_seed(0)
    plain, fused = Attention(64, 2, 32, "torch"), Attention(64, 2, 32, "triton")
    torch.nn.init.normal_(plain.c_proj.weight)
    fused.load_state_dict(plain.state_dict())
    x, ve = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    docs = torch.zeros(256, dtype=torch.int64)
    assert fused.prep and not plain.prep
    assert torch.equal(plain(x, ve, docs, 2, 128, None), fused(x, ve, docs, 2, 128, None))


def test_config_names_a_bad_attn_prep():
    from trainer.config import TrainConfig

    assert TrainConfig().validate().attn_prep == "triton"
    with pytest.raises(ValueError, match="^attn_prep: must be torch or triton"):
        TrainConfig(attn_prep="cuda").validate()


@pytest.mark.gpu
@cuda
def test_gpu_model_with_the_kernel_matches_the_torch_path():
    from trainer.fixtures import randomised_model, tiny_config

    losses, grads = {}, {}
    for kernel in ("torch", "triton"):
        cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=2, attn_prep=kernel)
        model = randomised_model(cfg, std=0.02, device="cuda")
        model.act_dtype = torch.bfloat16
        model.attention = "flex"
        forward = torch.compile(model, dynamic=False)
        tokens = torch.randint(0, cfg.vocab_size, (cfg.seq_len + 1,), generator=torch.Generator().manual_seed(1))
        tokens = tokens.cuda()
        loss = forward(tokens[:-1], tokens[1:], torch.tensor(4, device="cuda"))
        loss.backward()
        losses[kernel] = loss.item()
        grads[kernel] = torch.cat([model.blocks[0].attn.qkv_w.grad.flatten(), model.blocks[0].attn.lambdas.grad,
                                   model.value_embeds[0].weight.grad.flatten()])
    assert abs(losses["torch"] - losses["triton"]) < 1e-2 * abs(losses["torch"])
    assert rel(grads["triton"].float(), grads["torch"].float()) < 3e-2


def test_traced_by_aot_autograd_as_one_opaque_op_each_way():
    """What torch.compile does with the op, short of inductor's code generation: the graph traced with fake
    tensors (the op's register_fake), its backward through the registered formula, gradients in
    FlexAttention's strided layout; the same numbers as the op called directly."""
    B, T, H, D = 1, BLOCK_T + 3, 2, 16
    qkv, ve, lambdas, cos, sin, _ = make(B, T, H, D, torch.float32)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    grads = [torch.randn(B, H, T, D, generator=g, device=DEVICE).transpose(1, 2) for _ in range(3)]

    def prep(qkv, ve, lambdas, cos, sin):
        q, k, v = attn_prep(qkv * 1.0, ve, lambdas, cos, sin)
        return q * 1.0, k, v

    compiled = torch.compile(prep, backend="aot_eager", fullgraph=True)
    got = outputs_and_grads(compiled, qkv, ve, lambdas, cos, sin, grads)
    want = outputs_and_grads(attn_prep, qkv, ve, lambdas, cos, sin, grads)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
