"""`puma import` of ResNet-18 and DenseNet weights as the code bases they come from name
them: kuangliu/pytorch-cifar's and torchvision's ResNet-18 (layer1..layer4, downsample,
fc) and the paper's Listing 2 DenseNet (dense1..dense4, trans1..trans3). Each foreign
network below is written here as that code writes it, independently of puma's; its
weights must give the same logits once imported into the built-in architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clean_error, run, run_json
from safetensors.torch import save_file
from torch import nn

from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.io.datasets import load_dataset

DIGITS = Path(__file__).resolve().parent.parent / "sample_data" / "digits-train.npz"


class KuangliuBlock(nn.Module):
    def __init__(self, planes_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or planes_in != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(planes_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock: the projection is `downsample`, applied to the input."""

    def __init__(self, planes_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or planes_in != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(planes_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ForeignResNet(nn.Module):
    """ResNet-18 with stages layer1..layer4 and the head `linear` (kuangliu) or `fc`
    (torchvision, its stem made 3x3 and its max-pool dropped, as CIFAR code does);
    `stem` 7 is torchvision's ImageNet stem, which is another network."""

    def __init__(self, block: type[nn.Module], head: str, width: int, stem: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, stem, 1, stem // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes_in = width
        for k, stride in enumerate((1, 2, 2, 2), 1):
            planes = width * 2 ** (k - 1)
            stage = nn.Sequential(block(planes_in, planes, stride), block(planes, planes, 1))
            setattr(self, f"layer{k}", stage)
            planes_in = planes
        self.head = head
        setattr(self, head, nn.Linear(planes_in, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for k in range(1, 5):
            out = getattr(self, f"layer{k}")(out)
        out = F.avg_pool2d(out, out.shape[-1])  # kuangliu's 4 on 32x32 images
        return getattr(self, self.head)(out.flatten(1))


class ListingBottleneck(nn.Module):
    def __init__(self, planes_in: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes_in)
        self.conv1 = nn.Conv2d(planes_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class ListingTransition(nn.Module):
    def __init__(self, planes_in: int, planes_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes_in)
        self.conv = nn.Conv2d(planes_in, planes_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class ListingDenseNet(nn.Module):
    """The paper's Listing 2 (dense1..dense4, trans1..trans3, bn, linear), small."""

    def __init__(self, growth: int, blocks: tuple[int, int, int, int]) -> None:
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(1, planes, 3, padding=1, bias=False)
        for k, count in enumerate(blocks, 1):
            layers = []
            for _ in range(count):
                layers.append(ListingBottleneck(planes, growth))
                planes += growth
            setattr(self, f"dense{k}", nn.Sequential(*layers))
            if k < 4:
                setattr(self, f"trans{k}", ListingTransition(planes, planes // 2))
                planes //= 2
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = F.relu(self.bn(self.dense4(out)))
        return self.linear(F.avg_pool2d(out, out.shape[-1]).flatten(1))  # 4 at 32x32


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A state dict as training code saves it with safetensors."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _settled(net: nn.Module, X: torch.Tensor) -> nn.Module:
    """Seeded weights, BatchNorm statistics moved off their defaults, eval mode."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    net.train()
    with torch.no_grad():
        for i in range(0, 256, 64):
            net(X[i : i + 64])
    return net.eval()


FOREIGN = {
    "kuangliu-resnet18": (
        lambda: ForeignResNet(KuangliuBlock, "linear", 4),
        ["--arch", "resnet18", "--arch-args", '{"width": 4}'],
        "kuangliu/pytorch-cifar",
    ),
    "torchvision-resnet18": (
        lambda: ForeignResNet(TorchvisionBlock, "fc", 4),
        ["--arch", "resnet18", "--arch-args", '{"width": 4}'],
        "torchvision",
    ),
    "listing-densenet": (
        lambda: ListingDenseNet(4, (1, 2, 1, 1)),
        ["--arch", "densenet", "--arch-args", '{"growth_rate": 4, "blocks": [1, 2, 1, 1]}'],
        "Listing 2",
    ),
}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.as_tensor(load_dataset(DIGITS).X, dtype=torch.float32)


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_foreign_names_import_and_predict_as_their_network_did(
    case: str, digits: torch.Tensor, tmp_path: Path
) -> None:
    make, arch, whose = FOREIGN[case]
    net = _settled(make(), digits)
    weights = _save(net.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "m.safetensors"
    report = run_json("import", weights, *arch, "--data", DIGITS, "-o", out, "--json")
    assert whose in report["names_from"]
    imported = load_checkpoint(out).model
    with torch.no_grad():
        theirs, ours = net(digits[:300]), imported(digits[:300])
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    assert float(theirs.std()) > 1e-3  # the comparison is not between constant outputs
    info = run_json("info", out, "--json")
    assert whose in info["provenance"][0]["names_from"]


def test_puma_names_import_with_no_renaming(digits: torch.Tensor, tmp_path: Path) -> None:
    first = tmp_path / "a.safetensors"
    make, arch, _ = FOREIGN["kuangliu-resnet18"]
    weights = _save(_settled(make(), digits).state_dict(), tmp_path / "w.safetensors")
    run_json("import", weights, *arch, "--data", DIGITS, "-o", first, "--json")
    ours = _save(load_checkpoint(first).model.net.state_dict(), tmp_path / "ours.safetensors")
    report = run_json(
        "import", ours, *arch, "--data", DIGITS,
        "-o", tmp_path / "b.safetensors", "--json",
    )  # fmt: skip
    assert report["names_from"] is None
    again = load_checkpoint(tmp_path / "b.safetensors").model
    with torch.no_grad():
        assert torch.equal(again(digits[:300]), load_checkpoint(first).model(digits[:300]))


def test_another_network_under_foreign_names_is_refused_by_the_files_name(
    tmp_path: Path,
) -> None:
    kuangliu = ForeignResNet(KuangliuBlock, "linear", 4).state_dict()
    cases = {
        # torchvision's ImageNet ResNet-18 keeps a 7x7 stem: another network
        "stem": (ForeignResNet(TorchvisionBlock, "fc", 4, stem=7).state_dict(),
                 "tensor 'conv1.weight' is 4x1x7x7, but --arch resnet18 makes it 4x1x3x3"),
        "block": ({**kuangliu, "layer1.0.conv1.weight": torch.zeros(4, 4, 5, 5)},
                  "'layers.0.0.conv1.weight' (the file's 'layer1.0.conv1.weight') is 4x4x5x5"),
        "extra": ({**kuangliu, "layer1.0.gate.weight": torch.zeros(4)},
                  "'layers.0.0.gate.weight' (the file's 'layer1.0.gate.weight'), which"),
    }  # fmt: skip
    for name, (state, message) in cases.items():
        weights = _save(state, tmp_path / f"{name}.safetensors")
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run(
            "import", weights, "--arch", "resnet18", "--arch-args", '{"width": 4}',
            "--data", DIGITS, "-o", tmp_path / "m.safetensors",
        )  # fmt: skip
        assert_clean_error(result, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_export_like_the_foreign_file_gives_it_back(
    case: str, digits: torch.Tensor, tmp_path: Path
) -> None:
    """Imported, then exported `--like` the same file: its names, its very tensors, which
    the foreign network loads strictly."""
    from safetensors.torch import load_file

    make, arch, _ = FOREIGN[case]
    net = _settled(make(), digits)
    weights = _save(net.state_dict(), tmp_path / "w.safetensors")
    model = tmp_path / "m.safetensors"
    run_json("import", weights, *arch, "--data", DIGITS, "-o", model)
    out = tmp_path / "back.safetensors"
    run_json("export", model, "-o", out, "--like", weights)
    original, back = load_file(weights), load_file(out)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    make().load_state_dict(back)  # strict
    plain = run_json("export", model, "-o", tmp_path / "ours.safetensors")
    assert any(f"--like {weights}" in w for w in plain["warnings"])  # theirs differ from ours
