"""A user's own model: a torchvision architecture, a weights file (or weight name) and an image folder, through
the library and the command line; predictions equal torchvision's own, and every bad input is one clear line
that leaves the decoded-image cache as it was. Everything is generated here (no downloads)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tabconv.architectures import ArchitectureError, architecture_names, build_architecture
from tabconv.cli import main
from tabconv.imagefolder import ImageFolderError, Preprocessing, preprocess_image, scan_image_folder
from tabconv.inputs import Input
from tabconv.userload import UserModelError, open_user_model
from tabconv.weights import WeightsError, weight_enum

torchvision = pytest.importorskip("torchvision")
SIZE = 32
CLASSES = ("ant", "bee", "cat")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory):
    """Decoded images, tables and torch.hub's folder in temporary places (never the user's)."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        patch.setenv("TABCONV_CACHE", str(root / "tables"))
        patch.setenv("TORCH_HOME", str(root / "torch"))
        yield root


def make_folder(root: Path, classes=CLASSES, per_class: int = 6, seed: int = 0) -> Path:
    """Random RGB images of a few sizes (non-square, some smaller than others), PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40 + 3 * (i % 3), 40 + 5 * (i % 2), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / classes[0] / ".DS_Store").write_bytes(b"\0hidden files are ignored")
    return root


def save_state_dict(path: Path, arch: str, classes: int = 3, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes).eval()
    torch.save(model.state_dict(), path)
    return model


def reference(model: torch.nn.Module, root: Path, files: list[Path], size: int = SIZE):
    """torchvision's own reading of the same files: ImageFolder + Resize, CenterCrop, ToTensor, Normalize."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(root), transform=tf)
    index = {Path(path): i for i, (path, _) in enumerate(folder.samples)}
    pairs = [folder[index[file]] for file in files]
    inputs = torch.stack([x for x, _ in pairs])
    with torch.no_grad():
        return inputs, torch.tensor([y for _, y in pairs]), model(inputs)


def decoded() -> dict[str, int]:
    """The decoded-image cache's files and their modification times."""
    folder = Path(os.environ["XDG_CACHE_HOME"]) / "tabconv" / "decoded"
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


# -- architectures ---------------------------------------------------------------------------------------------
def test_architecture_names_and_a_close_match_for_a_typo():
    names = architecture_names()
    assert names[:4] == ["resnet18", "resnet34", "nin", "tiny"]
    assert {"resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vgg11_bn"} <= set(names)
    with pytest.raises(ArchitectureError, match=r"unknown architecture 'resnet5'; did you mean .*resnet50"):
        build_architecture("resnet5", 10)
    with pytest.raises(ArchitectureError, match="3 input channels"):
        build_architecture("mobilenet_v2", 10, in_channels=1)
    assert build_architecture("shufflenet_v2_x0_5", 7).fc.out_features == 7


# -- preprocessing ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize,crop", [(32, 32), (36, 32), (30, 32), (41, 41)])
def test_preprocessing_is_torchvisions_bit_for_bit(tmp_path, interpolation, resize, crop):
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    tf = transforms.Compose([transforms.Resize(resize, mode), transforms.CenterCrop(crop), transforms.PILToTensor()])
    rng = np.random.default_rng(0)
    prep = Preprocessing(crop, resize, interpolation)
    for shape in [(40, 40), (41, 57), (77, 30), (20, 25), (41, 41)]:
        path = tmp_path / f"{shape}.png"
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
        with Image.open(path) as image:
            expected = tf(image.convert("RGB")).numpy()
        assert np.array_equal(preprocess_image(path, prep), expected), (shape, resize, crop)


# -- a state_dict through the library and the command line ---------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])
def test_a_torchvision_state_dict_predicts_what_torchvision_does(tmp_path, arch):
    from tabconv.session import Session

    root = make_folder(tmp_path / "photos")
    model = save_state_dict(tmp_path / "w.pth", arch)
    session = Session.from_user_model(arch, str(tmp_path / "w.pth"), images=str(root), image_size=SIZE)
    scan = scan_image_folder(root)
    inputs, labels, logits = reference(model, root, [f.path for f in scan.evaluation])
    assert torch.equal(session.eval_set.batch(slice(None)), inputs)  # the very same input tensors
    assert torch.equal(session.eval_set.labels, labels)
    if session.runner is not None:  # the exact logits the session evaluated
        ours = torch.cat(session.runner.output()).float()
        assert torch.allclose(ours, logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(ours.argmax(1), logits.argmax(1))
    assert np.array_equal(session.baseline.correct_images, (logits.argmax(1) == labels).numpy())
    info, meta = session.info, session.info.details
    assert info.model == arch and info.dataset.startswith("folder:photos@") and info.num_classes == 3
    assert info.input_shape == (3, SIZE, SIZE) and meta["weights_kind"] == "state_dict"
    assert meta["classes"] == list(CLASSES) and meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["calibration_images_clamped"]["used"] == len(session.calibration_set) == 15  # 5 of each class
    assert session.calibration.images == 15 and len(session.eval_set) == 3


def test_the_command_line_opens_a_train_val_folder(tmp_path, capsys):
    root = tmp_path / "data"
    make_folder(root / "train", per_class=4)
    make_folder(root / "val", per_class=4, seed=1)
    model = save_state_dict(tmp_path / "w.pth", "resnet18")
    code = main(["evaluate", "--arch", "resnet18", "--weights", str(tmp_path / "w.pth"), "--images", str(root),
                 "--image-size", str(SIZE), "--all-exact", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    files = [f.path for f in scan_image_folder(root).evaluation]
    _, labels, logits = reference(model, root / "val", files)
    assert data["eval_images"] == 12 and data["correct"] == int((logits.argmax(1) == labels).sum())
    assert data["model"] == "resnet18" and data["dataset"].startswith("folder:data@")
    assert decoded()  # decoded images were cached


def test_wrappers_a_module_prefix_and_a_tabconv_checkpoint_give_the_same_weights(tmp_path):
    from tabconv.train import save_checkpoint, weights_sha256

    root = make_folder(tmp_path / "photos")
    model = save_state_dict(tmp_path / "plain.pth", "resnet18")
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pth")
    save_checkpoint(tmp_path / "ckpt.pt", model, {"model": "resnet18", "num_classes": 3,
                                                   "input_shape": [3, SIZE, SIZE], "dataset": "mine"})
    for name in ("plain.pth", "wrapped.pth", "parallel.pth", "ckpt.pt"):
        opened = open_user_model("resnet18", tmp_path / name, root, image_size=SIZE)
        assert opened.meta["sha256"] == weights_sha256(state), name
    with pytest.raises(WeightsError, match=r"ckpt\.pt: a tabconv checkpoint of 'resnet18', not of 'resnet34'"):
        open_user_model("resnet34", tmp_path / "ckpt.pt", root, image_size=SIZE)


def test_random_weights_are_seeded_and_recorded(tmp_path):
    root = make_folder(tmp_path / "photos")
    first = open_user_model("mobilenet_v3_small", None, root, image_size=SIZE)
    again = open_user_model("mobilenet_v3_small", None, root, image_size=SIZE)
    assert first.meta["sha256"] == again.meta["sha256"] and first.meta["weights_kind"] == "random"


# -- torchvision weight names, offline -------------------------------------------------------------------------
def test_a_weight_name_sets_preprocessing_and_classes_and_loads_its_file(tmp_path, monkeypatch):
    from tabconv.train import weights_sha256

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = weight_enum("resnet18", "IMAGENET1K_V1")
    assert (enum.image_size, enum.resize, enum.interpolation, enum.num_classes) == (224, 256, "bilinear", 1000)
    assert enum.mean == MEAN and enum.std == STD and enum.name == "ResNet18_Weights.IMAGENET1K_V1"
    assert weight_enum("resnet18", "ResNet18_Weights.DEFAULT").name == enum.name
    assert enum.path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    enum.path.parent.mkdir(parents=True)
    model = save_state_dict(enum.path, "resnet18", classes=1000)
    root = make_folder(tmp_path / "fish", classes=("goldfish", "tench"), per_class=3)  # two ImageNet categories
    opened = open_user_model("resnet18", "IMAGENET1K_V1", root, image_size=64)
    meta = opened.meta
    assert meta["sha256"] == weights_sha256(model.state_dict()) and meta["weights"] == enum.name
    assert (meta["image_size"], meta["resize"], meta["num_classes"]) == (64, 73, 1000)  # 64 * 256 / 224
    assert meta["class_indices"] == [1, 0]  # goldfish is ImageNet class 1, tench class 0
    assert set(opened.eval_set.labels.tolist()) == {0, 1}
    with pytest.raises(WeightsError, match="not a weight name of resnet18 .*IMAGENET1K_V1"):
        open_user_model("resnet18", "IMAGENET1K_V9", root, image_size=64)


def test_a_missing_weight_file_without_network_is_one_line(tmp_path, monkeypatch):
    from tabconv import weights

    def offline(url, dest, timeout=0):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "_download", offline)
    root = make_folder(tmp_path / "fish", classes=("goldfish", "tench"), per_class=3)
    with pytest.raises(WeightsError) as caught:
        open_user_model("resnet18", "DEFAULT", root, image_size=64)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("ResNet18_Weights.IMAGENET1K_V1: its weights file")
    assert "network is unreachable" in message and "torch.save(model.state_dict(), 'w.pth')" in message
    assert not weight_enum("resnet18", "DEFAULT").path.exists()


# -- bad input: exit status 2, one line naming the culprit, caches untouched ----------------------------------
def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after evaluate, text the error line must contain)."""
    good = make_folder(tmp / "good")
    save_state_dict(tmp / "r18.pth", "resnet18")
    make_folder(tmp / "four", classes=(*CLASSES, "dog"))
    (tmp / "empty").mkdir()
    make_folder(tmp / "noimages", classes=("ant",))
    (tmp / "noimages" / "bee").mkdir()
    make_folder(tmp / "text")
    (tmp / "text" / "bee" / "notes.txt").write_text("hello")
    make_folder(tmp / "broken")
    (tmp / "broken" / "cat" / "9.jpg").write_bytes(b"not a jpeg at all")
    make_folder(tmp / "one", per_class=1)
    make_folder(tmp / "mixed" / "train")
    make_folder(tmp / "mixed" / "val", classes=("ant", "bee", "cow"))
    (tmp / "notes.pth").write_text("just text")
    torch.save(torchvision.models.resnet18(num_classes=3), tmp / "pickled.pth")
    w = str(tmp / "r18.pth")
    return {
        "wrong arch": (["--arch", "mobilenet_v2", "--weights", w, "--images", str(good)],
                       f"{w}: the weights do not fit mobilenet_v2"),
        "wrong class count asked": (["--arch", "resnet18", "--weights", w, "--images", str(good), "--num-classes", "5"],
                                    f"{w}: the weights have 3 classes, not 5; pass --num-classes 3"),
        "folder of other class count": (["--arch", "resnet18", "--weights", w, "--images", str(tmp / "four")],
                                        f"{tmp / 'four'}: 4 class folders (ant, bee, cat, dog) but the weights have 3"),
        "empty folder": (["--arch", "resnet18", "--images", str(tmp / "empty")],
                         f"{tmp / 'empty'}: no class subfolders"),
        "missing folder": (["--arch", "resnet18", "--images", str(tmp / "nowhere")],
                           f"{tmp / 'nowhere'}: no such folder"),
        "class without images": (["--arch", "resnet18", "--images", str(tmp / "noimages")],
                                 f"{tmp / 'noimages' / 'bee'}: class folder holds no images"),
        "non-image file": (["--arch", "resnet18", "--images", str(tmp / "text")],
                           f"{tmp / 'text' / 'bee' / 'notes.txt'}: not an image file"),
        "undecodable image": (["--arch", "resnet18", "--weights", w, "--images", str(tmp / "broken")],
                              f"{tmp / 'broken' / 'cat' / '9.jpg'}: cannot be read as an image"),
        "too few to split": (["--arch", "resnet18", "--images", str(tmp / "one")], "too few to split"),
        "train and val differ": (["--arch", "resnet18", "--images", str(tmp / "mixed")],
                                 "only in train: cat; only in val: cow"),
        "unknown architecture": (["--arch", "resnet5", "--images", str(good)],
                                 "unknown architecture 'resnet5'; did you mean"),
        "not a torch file": (["--arch", "resnet18", "--weights", str(tmp / "notes.pth"), "--images", str(good)],
                             f"{tmp / 'notes.pth'}: not a PyTorch weights file"),
        "pickled model": (["--arch", "resnet18", "--weights", str(tmp / "pickled.pth"), "--images", str(good)],
                          f"{tmp / 'pickled.pth'}: holds Python objects"),
        "missing weights": (["--arch", "resnet18", "--weights", str(tmp / "gone.pth"), "--images", str(good)],
                            f"{tmp / 'gone.pth'}: no such weights file"),
        "unknown weight name": (["--arch", "resnet18", "--weights", "IMAGENET9K", "--images", str(good)],
                                "'IMAGENET9K': no such weights file, and not a weight name of resnet18"),
        "images without arch": (["--checkpoint", w, "--images", str(good)],
                                "--images, --image-size go with --arch (a checkpoint brings"),
        "arch without images": (["--arch", "resnet18"], "--arch resnet18 needs --images DIR"),
        "bad std": (["--arch", "resnet18", "--images", str(good), "--std", "0.2,0,0.2"], "std must be positive"),
    }


BAD_CASES = ["wrong arch", "wrong class count asked", "folder of other class count", "empty folder",
             "missing folder", "class without images", "non-image file", "undecodable image", "too few to split",
             "train and val differ", "unknown architecture", "not a torch file", "pickled model", "missing weights",
             "unknown weight name", "images without arch", "arch without images", "bad std"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, private_caches) -> tuple[Path, dict]:
    """The bad folders and files, and a decoded-image cache filled by one good run."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(tmp)
    good = ["--arch", "resnet18", "--weights", str(tmp / "r18.pth"), "--images", str(tmp / "good"),
            "--image-size", str(SIZE), "--all-exact", "--json"]
    assert main(["evaluate", *good]) == 0
    assert decoded()
    return tmp, cases


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_leaves_the_caches(bad_inputs, capsys, case):
    _, cases = bad_inputs
    capsys.readouterr()
    before = decoded()
    args, expected = cases[case]
    code = main(["evaluate", *args, "--image-size", str(SIZE), "--all-exact", "--json"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert code == 2 and out == "" and len(errors) == 1, err
    first, rest = lines[errors[0]], lines[errors[0] + 1:]
    assert expected in first, first
    if case == "wrong arch":  # one line, then at most a short list of keys
        assert 1 <= len(rest) <= 3 and all(line.startswith("  ") for line in rest), rest
        assert all(line.count(",") <= 5 for line in rest[:2]), rest
    else:
        assert rest == [], rest
    assert decoded() == before


def test_keys_and_shapes_that_do_not_fit_are_listed(tmp_path):
    from tabconv.weights import load_into

    r50 = torchvision.models.resnet50(num_classes=3).state_dict()
    with pytest.raises(WeightsError) as caught:
        load_into(build_architecture("resnet18", 3), r50, "r50.pth", "resnet18")
    first, *listed = str(caught.value).splitlines()
    assert first.startswith("r50.pth: the weights do not fit resnet18 (0 of the model's") and len(listed) == 2
    assert listed[0].startswith("  unexpected: ") and listed[0].endswith("more)")
    assert listed[1].startswith("  shapes: layer1.0.conv1.weight: file [64, 64, 1, 1] vs model [64, 64, 3, 3]; ")
    assert listed[1].count(" vs model ") == 5 and listed[1].endswith("more)")
    ten = torchvision.models.resnet18(num_classes=10).state_dict()
    classifier = {"fc.weight": 0, "fc.bias": 0}
    with pytest.raises(WeightsError, match=r"^w.pth: the file has 10 classes .* pass --num-classes 10"):
        load_into(build_architecture("resnet18", 3), ten, "w.pth", "resnet18", classifier)


def test_library_errors_are_value_errors_with_the_path(tmp_path):
    root = make_folder(tmp_path / "photos")
    with pytest.raises(UserModelError, match="needs --images|image folder is needed"):
        open_user_model("resnet18", None, None)
    with pytest.raises(ImageFolderError, match="asked for 9 evaluation images"):
        open_user_model("resnet18", None, root, image_size=SIZE, eval_images=9)
    assert issubclass(UserModelError, ValueError) and issubclass(ImageFolderError, ValueError)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert scan_image_folder(root).classes == CLASSES
    with pytest.raises(ArchitectureError, match="did you mean resnet50"):
        open_user_model("ResNet50", None, root)


def test_cost_takes_torchvision_architectures(capsys):
    code = main(["cost", "--model", "resnet50", "--num-classes", "10", "--input-shape", "3,32,32", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["flops"] > 0
    assert main(["cost", "--model", "resnet5", "--num-classes", "10", "--input-shape", "3,32,32"]) == 2
    assert "did you mean resnet50" in capsys.readouterr().err


def test_a_one_channel_checkpoint_reads_the_folder_as_greyscale_with_its_datasets_normalisation(tmp_path):
    """A project model trained on digits (first conv takes 1 channel): the folder's images, colour or not, are
    read as torchvision's Grayscale would, at the checkpoint's input size and its dataset's mean/std; the
    predictions are the model's own. A plain state_dict of such a model must say how it was normalised."""
    from torchvision import datasets, transforms

    from tabconv.data import DATASETS
    from tabconv.models import build_model
    from tabconv.session import Session
    from tabconv.train import save_checkpoint

    root = make_folder(tmp_path / "digits")  # RGB PNG and JPEG files
    torch.manual_seed(2)
    model = build_model("resnet18", 3, 1).eval()
    save_checkpoint(tmp_path / "mnist.pt", model, {"model": "resnet18", "num_classes": 3,
                                                    "input_shape": [1, 28, 28], "dataset": "mnist"})
    session = Session.from_user_model("resnet18", str(tmp_path / "mnist.pt"), images=str(root))
    mnist = DATASETS["mnist"]
    tf = transforms.Compose([transforms.Grayscale(1), transforms.Resize(28), transforms.CenterCrop(28),
                             transforms.ToTensor(), transforms.Normalize(mnist.mean, mnist.std)])
    folder = datasets.ImageFolder(str(root), transform=tf)
    index = {Path(path): i for i, (path, _) in enumerate(folder.samples)}
    inputs = torch.stack([folder[index[f.path]][0] for f in scan_image_folder(root).evaluation])
    assert torch.equal(session.eval_set.batch(slice(None)), inputs)
    with torch.no_grad():
        want = model(inputs).argmax(1)
    assert torch.equal(torch.tensor(session.baseline.correct_images), want == session.eval_set.labels)
    assert session.info.input_shape == (1, 28, 28) and session.info.details["mean"] == list(mnist.mean)

    torch.save(model.state_dict(), tmp_path / "plain.pth")
    greyscale = r"plain\.pth: the first layer takes 1 channel.*: --mean M and --std S$"
    with pytest.raises(UserModelError, match=greyscale) as raised:
        open_user_model("resnet18", tmp_path / "plain.pth", root)
    assert raised.value.field is Input.MEAN  # each front end words the asks itself: the explorer by its fields
    assert raised.value.worded(lambda ask: ask.input.name.title()).endswith(": Mean and Std")
    opened = open_user_model("resnet18", tmp_path / "plain.pth", root, image_size=28, mean=[0.5], std=[0.25])
    assert opened.eval_set.images.shape[1:] == (1, 28, 28) and opened.meta["std"] == [0.25]


def test_mean_and_std_are_read_by_one_rule_for_every_front_end():
    """The command line's --mean/--std and the explorer's fields read the same way: commas, spaces or semicolons,
    3 numbers or one; anything else names the field and gives an example."""
    from tabconv.cli import _floats
    from tabconv.userload import channel_values

    assert channel_values("0.485, 0.456,0.406", "Mean") == channel_values("0.485 0.456 0.406", "Mean") == (
        0.485, 0.456, 0.406)
    assert channel_values(" 0.5 ", "Std") == (0.5,) and channel_values("  ", "Std") is None
    for bad in ("a, b, c", "0.1, 0.2"):
        with pytest.raises(UserModelError, match=rf"Mean '{bad}': give 3 numbers \(R, G, B\) or one"):
            channel_values(bad, "Mean")
    assert _floats("0.5;0.5;0.5") == (0.5, 0.5, 0.5)
    with pytest.raises(argparse.ArgumentTypeError, match="give 3 numbers"):
        _floats("0.1,0.2")
