"""CUDA graphs (TrainConfig.cuda_graphs): the compile mode, and gradients that add up over micro-batches in memory
the graphs do not own. The gradient bookkeeping is plain autograd, so it runs here on the CPU."""
import pytest

torch = pytest.importorskip("torch")

from trainer.cuda_graphs import OwnedGradients, compile_model  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).square().sum()


def accumulated(owned: bool, micro_batches: list[torch.Tensor]):
    torch.manual_seed(0)
    m = TwoLayers()
    grads = OwnedGradients(m.parameters()) if owned else None
    if grads:
        grads.before_backward()
    buffers = {n: p.grad for n, p in m.named_parameters()}
    for x in micro_batches:
        m(x).backward()
    if grads:
        grads.after_backward()
    return m, buffers


def test_gradients_add_up_into_buffers_of_their_own_and_an_unreached_parameter_stays_none():
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, _ = accumulated(False, xs)
    owned, buffers = accumulated(True, xs)
    for (name, p), q in zip(owned.named_parameters(), plain.parameters()):
        if name == "unused":
            assert p.grad is None and q.grad is None   # the optimizers skip it, as without graphs
            continue
        torch.testing.assert_close(p.grad, q.grad)
        # every micro-batch added into the zeroed buffer made before the first backward: autograd never took a
        # backward output as .grad (under CUDA graphs that memory is the next replay's)
        assert p.grad is buffers[name]


def test_a_gradient_kept_from_the_last_step_is_added_to_not_replaced():
    """Adam every other step keeps its gradients over two steps: they stay, and the new ones add into them."""
    torch.manual_seed(0)
    m = TwoLayers()
    grads = OwnedGradients(m.parameters())
    x = torch.randn(4, 8)
    for _ in range(2):
        grads.before_backward()
        m(x).backward()
        grads.after_backward()
    once = TwoLayers()
    once.load_state_dict(m.state_dict())
    once(x).backward()
    torch.testing.assert_close(m.a.weight.grad, 2 * once.a.weight.grad)
    assert m.unused.grad is None


@pytest.mark.parametrize("on, mode", [(False, None), (True, "reduce-overhead")])
def test_the_compile_mode_follows_the_switch(monkeypatch, on, mode):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.update(kw) or model)
    compile_model(torch.nn.Linear(2, 2), tiny_config(cuda_graphs=on))
    assert seen == {"dynamic": False, "mode": mode}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_under_cuda_graphs_follows_the_same_curve(tmp_path):
    """Four micro-batches a step, compiled, with and without CUDA graphs: every graph replays as a CUDA graph
    (none skipped), nothing recompiles after the warm-up, and the losses follow the same curve (the sum over
    micro-batches is right: with a stolen gradient it would be a quarter of it, pytorch#169545)."""
    import json

    from orchestrator.data.synthetic import markov_shards
    from trainer.cuda_graphs import cuda_graph_skips
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    curves = {}
    for on in (False, True):
        cfg = tiny_config(model_dim=128, num_heads=2, head_dim=64, steps=8, val_every=4, device="cuda", compile=True,
                          warmup_compile_steps=2, grad_accum_total=4, cuda_graphs=on)
        torch._dynamo.reset()
        out = tmp_path / f"out-{on}"
        assert Trainer(cfg, str(tmp_path / "data"), str(out)).run() == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[on] = [r["train_loss"] for r in records if "train_loss" in r] + \
                     [r["val_loss"] for r in records if "val_loss" in r]
        if on:
            assert cuda_graph_skips() == 0
    assert curves[True][-1] < curves[True][0] / 2
    for a, b in zip(curves[True], curves[False]):
        assert abs(a - b) < 0.02 * b, (curves[True], curves[False])
