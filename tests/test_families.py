"""Each torchvision family the issue names opens as a session on small inputs: exact predictions are the model's
own, every Conv2d/Linear (grouped and depthwise ones included) becomes a table layer, and a late toggle
recomputes only the end of the graph."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

from tabconv.config import Calibration
from tabconv.data import DatasetInfo, ImageSet
from tabconv.session import Session
from tabconv.settings import EXACT, LayerSetting

FAMILIES = {  # architecture -> grouped convs expected
    "resnet50": False, "mobilenet_v2": True, "mobilenet_v3_small": True, "efficientnet_b0": True,
    "vgg11_bn": False, "densenet121": False, "regnet_x_400mf": True, "convnext_tiny": True,
    "shufflenet_v2_x0_5": True}
INFO = DatasetInfo("synthetic", 3, 32, 32, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "random images", "generated")


@pytest.fixture(scope="module")
def images() -> tuple[ImageSet, ImageSet]:
    generator = torch.Generator().manual_seed(0)

    def split(name: str, count: int) -> ImageSet:
        pixels = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return ImageSet(INFO, name, pixels, torch.arange(count) % 4)

    return split("train", 16), split("test", 12)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_opens_tables_and_toggles(arch: str, images: tuple[ImageSet, ImageSet]) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=4).eval()
    meta = {"model": arch, "dataset": "synthetic", "num_classes": 4, "input_shape": [3, 32, 32], "sha256": arch}
    session = Session(model, meta, *images, Calibration(images=16, max_rows=512), batch_size=6)
    with torch.no_grad():
        own = torch.cat([model(x) for x in session.eval_batches()]).argmax(1)
    assert (session.baseline.correct_images == (own == images[1].labels).numpy()).all()
    assert session.structure.exact_only == {} and session.incremental
    assert any(info.groups > 1 for info in session.structure.layers) == FAMILIES[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K against few calibration rows
        tabled = session.apply(session.uniform(LayerSetting("table", 2, 8))).metrics
    assert tabled.flops_paper < session.baseline.flops_paper
    assert all(0 <= error.relative_error < float("inf") for error in tabled.errors.values())
    late = session.structure.names[-1]
    assert session.apply({**tabled.settings, late: EXACT}).recomputed < len(session.runner.nodes) // 4
