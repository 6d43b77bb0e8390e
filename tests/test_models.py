"""The model registry: names, shapes at every dataset's input size, and stable layer names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tabconv.models import MODEL_DESCRIPTIONS, build_model, model_names

DATASET_SHAPES = [(1, 28, 28), (1, 32, 32), (3, 32, 32)]


def test_registry_lists_every_model_with_a_description() -> None:
    assert model_names() == ["resnet18", "resnet34", "nin", "tiny"]
    assert set(MODEL_DESCRIPTIONS) == set(model_names())


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet18, resnet34, nin, tiny"):
        build_model("vgg16", 10, 3)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "nin", "tiny"])
@pytest.mark.parametrize("shape", DATASET_SHAPES)
def test_forward_at_dataset_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, 10, shape[0]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)


def test_resnet_stem_follows_input_channels_with_the_same_geometry() -> None:
    grey = build_model("resnet18", 10, 1).conv1
    rgb = build_model("resnet18", 10, 3).conv1
    assert grey.in_channels == 1 and rgb.in_channels == 3
    for attr in ("out_channels", "kernel_size", "stride", "padding"):
        assert getattr(grey, attr) == getattr(rgb, attr)
    assert grey.bias is None


def test_resnet_keeps_torchvision_layer_names() -> None:
    names = dict(build_model("resnet34", 100, 3).named_modules())
    assert isinstance(names["layer3.5.conv2"], nn.Conv2d)
    assert isinstance(names["layer2.0.downsample.0"], nn.Conv2d)
    assert names["fc"].out_features == 100


def test_nin_structure() -> None:
    model = build_model("nin", 10, 3)
    modules = dict(model.named_modules())
    convs = [(n, m) for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size[0] for _, m in convs] == [5, 1, 1, 5, 1, 1, 3, 1, 1]
    assert [m.out_channels for _, m in convs] == [192, 160, 96, 192, 192, 192, 192, 192, 10]
    assert convs[0][0] == "block1.0"
    relus = [m for m in modules.values() if isinstance(m, nn.ReLU)]
    assert len(relus) == 9 and len({id(m) for m in relus}) == 9
    assert sum(isinstance(m, nn.MaxPool2d) for m in modules.values()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in modules.values()) == 2
    assert not any(isinstance(m, nn.Linear) for m in modules.values())


def test_tiny_names() -> None:
    names = [name for name, _ in build_model("tiny", 10, 3).named_children()]
    assert names == ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "flatten", "fc"]


@pytest.mark.parametrize(("name", "blocks"), [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_resnets_are_torchvisions_module_for_module(name: str, blocks: tuple[int, ...]) -> None:
    """Same seed -> same initial weights, same module names and types in order, same outputs."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    ours = build_model(name, 10, 3).eval()
    torch.manual_seed(0)
    theirs = ResNet(BasicBlock, list(blocks), num_classes=10).eval()
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == [
        (n, type(m).__name__) for n, m in theirs.named_modules()]
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    order: list[list[str]] = [[], []]
    for model, seen in zip((ours, theirs), order, strict=True):
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda *_, n=n, seen=seen: seen.append(n))
        with torch.no_grad():
            model(x)
    assert order[0] == order[1]


def test_nin_trains_with_batch_norm_and_deploys_as_the_plain_nin() -> None:
    """Folding the training-time batch norms gives the registered NIN, computing the same function."""
    from tabconv.models import build_training_model, deployable

    torch.manual_seed(0)
    trained = build_training_model("nin", 10, 1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules()) == 9
    trained.train()
    with torch.no_grad():
        for _ in range(3):  # give the batch norms real running statistics
            trained(torch.randn(8, 1, 28, 28))
        for m in trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    trained.eval()
    plain = deployable("nin", trained, 10, 1)
    assert list(plain.state_dict()) == list(build_model("nin", 10, 1).state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), rtol=1e-4, atol=1e-5)
    resnet = build_model("resnet18", 10, 1)
    assert deployable("resnet18", resnet, 10, 1) is resnet
