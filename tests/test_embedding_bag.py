"""nn.EmbeddingBag (PyTorch's bag-of-tokens text layer): its fused kernel has no
forward-mode derivative and no derivative of its backward, so the engine's passes run it
as a lookup and a masked reduction (`engine/embedding_bag.py`). Held to the kernel:
values, gradients, and the engine's derivatives against the kernel's own gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_json
from torch import nn

from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.engine.embedding_bag import bag_forward
from puma_cli.engine.kernels import composite_kernels

IDS = torch.tensor([[3, 0, 5, 5, 1], [0, 0, 0, 0, 0], [7, 2, 0, 9, 4]])  # a bag of padding only
FLAT = torch.tensor([3, 0, 5, 5, 1, 7, 2, 0, 9])
OFFSETS = torch.tensor([0, 4, 4, 6])  # the third bag empty


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize(
    ("mode", "layout"),  # max over flat bags keeps the kernel (no forward-mode scatter max)
    [(m, lay) for m in ("sum", "mean", "max") for lay in ("rows", "offsets", "last offset")
     if m != "max" or lay == "rows"],
)  # fmt: skip
def test_the_composite_bag_gives_the_kernel_s_values_and_gradients(
    mode: str, padding_idx: int | None, layout: str
) -> None:
    torch.manual_seed(0)
    last = layout == "last offset"
    bag = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx, include_last_offset=last)
    bag = bag.double()
    if layout == "rows":
        args: tuple[torch.Tensor, ...] = (IDS,)
    else:
        args = (FLAT, torch.cat([OFFSETS, torch.tensor([9])]) if last else OFFSETS)
    weights = torch.rand(args[0].shape, dtype=torch.float64, requires_grad=True)
    extra = {"per_sample_weights": weights} if mode == "sum" else {}
    kernel = bag(*args, **extra)
    composite = bag_forward(bag, *args, **extra)
    assert torch.allclose(kernel, composite, atol=1e-12)
    up = torch.randn(kernel.shape, dtype=torch.float64)
    by_kernel = torch.autograd.grad((kernel * up).sum(), [bag.weight, *extra.values()])
    by_composite = torch.autograd.grad((composite * up).sum(), [bag.weight, *extra.values()])
    for a, b in zip(by_kernel, by_composite, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_the_engine_s_blocks_set_the_composite_forward_and_take_it_back() -> None:
    net = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2))
    bag, capped = net[0], nn.EmbeddingBag(10, 4, max_norm=1.0)
    both = nn.ModuleList([net, capped])
    with composite_kernels(both):
        assert vars(bag)["forward"].__func__ is bag_forward
        assert "forward" not in vars(capped)  # max_norm renormalises in place: its kernel
        with composite_kernels(net):  # the engine nests them
            assert vars(bag)["forward"].__func__ is bag_forward
        assert "forward" in vars(bag)  # the inner block left the outer one's in place
    assert "forward" not in vars(bag) and "forward" not in vars(capped)


class BagNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 3, mode="mean", padding_idx=0)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(x.long())))


def _native_gradients(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's loss gradient through the kernel's own backward, (n, P)."""
    rows = []
    for x, label in zip(X, y, strict=True):
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x[None]), label[None])
        loss.backward()
        rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    return torch.stack(rows)


def test_the_engine_s_derivatives_of_a_bag_net_match_the_kernel_s_gradients() -> None:
    """Per-row gradients (vmap), scores (forward mode) and Hessian-vector products (double
    backward) of a model with an EmbeddingBag, none of which the kernel gives, against its
    own first-order gradients (the products by central differences of them)."""
    torch.manual_seed(0)
    net = BagNet().double()
    X = torch.randint(0, 12, (20, 6))
    X[:3, 3:] = 0  # padded rows
    y = torch.randint(0, 3, (20,))
    engine = InfluenceModel(net, X.numpy(), y.numpy(), chunk_size=7)
    native = _native_gradients(net, engine.X, engine.y)
    assert torch.allclose(engine.per_sample_gradients(), native, atol=1e-10)
    v = torch.randn(engine.n_parameters, dtype=torch.float64)
    (scores,) = engine._scores_forward(v, None, None)[:1]
    assert torch.allclose(scores, native @ v, atol=1e-10)
    assert engine.no_forward_mode is None  # forward mode ran: no reverse-route fallback
    step, theta = 1e-5, engine.theta.clone()
    shifted = []
    for sign in (1, -1):
        torch.nn.utils.vector_to_parameters(theta + sign * step * v, net.parameters())
        shifted.append(_native_gradients(net, engine.X, engine.y).mean(0))
    torch.nn.utils.vector_to_parameters(theta, net.parameters())
    assert torch.allclose(engine.hvp(v), (shifted[0] - shifted[1]) / (2 * step), atol=1e-6)


def test_a_text_classifier_with_an_embedding_bag_goes_through_remove(tmp_path: Path) -> None:
    """Before, every curvature refused it (`_embedding_bag` has no forward-mode derivative)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    tokens = rng.integers(1, 30, (240, 8))
    tokens[:, 0] = 1 + 10 * y + rng.integers(0, 3, 240)  # the first token tells the class
    tokens[::4, 5:] = 0  # padding
    data = tmp_path / "tokens.npz"
    np.savez(data, X=tokens, y=y, ids=np.array([f"t{i}" for i in range(240)]))
    arch = tmp_path / "bag.py"
    arch.write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, n_classes):\n        super().__init__()\n"
        "        self.bag = nn.EmbeddingBag(30, 6, mode='mean', padding_idx=0)\n"
        "        self.head = nn.Linear(6, n_classes)\n\n"
        "    def forward(self, x):\n        return self.head(self.bag(x.long()))\n"
    )
    model = tmp_path / "m.safetensors"
    trained = run_json(
        "train", data, "--arch", f"{arch}:Net", "-o", model, "--no-standardize",
        "--epochs", "30", "--lr", "0.01",
    )  # fmt: skip
    assert trained["train_accuracy"] > 0.6  # chance is 1/3
    (tmp_path / "ids.txt").write_text("t0\nt1\nt2\nt3\n")
    for curvature in ("exact", "ggn", "kfac"):
        out = run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", curvature,
            "-o", tmp_path / f"r-{curvature}.safetensors",
        )  # fmt: skip
        assert out["removed"] == 4
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6, curvature
        if curvature == "kfac":  # no Kronecker block for an embedding: left out, and said
            assert out["parameters"]["uncovered_layers"] == {"EmbeddingBag": 30 * 6}
