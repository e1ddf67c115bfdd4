"""torchxrayvision's chest X-ray weights (`--pretrained xrv:NAME`): files, safety, preprocessing, runs.

No published file can be downloaded here, so the files are made locally from torchxrayvision's own
architectures, stored the way the package stores them (DenseNet: the whole pickled model; ResNet-50:
the torchvision model's state dict), in a torchxrayvision cache under a temporary HOME.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common import runs
from common import xrv_weights as xw
from common.cli import main as cli
from common.images import read_grayscale
from common.models import PretrainedWeightsUnavailable, build_model, model_input_config
from common.preprocess import resize_gray, to_model_input
from common.train_config import TrainConfig
from common.weights import XRV, XRV_MEAN, XRV_STD, Weights

if importlib.util.find_spec("torchxrayvision") is None:  # not imported here: its import resets warning filters
    pytest.skip("torchxrayvision is not installed (requirements.txt installs it)", allow_module_level=True)

# small inputs keep these tests fast; the weights' warning that they were trained at 224 / 512 px is expected
pytestmark = pytest.mark.filterwarnings(r"ignore:pretrained=.xrv.\S+ were trained at:UserWarning")

DENSENET = "densenet121-res224-all"
RESNET = "resnet50-res512-all"


def _xrv():
    return xw._xrv()  # imported with the warning filters kept (its models module resets them)


def _file(name: str) -> Path:
    return xw.cache_dir() / Path(xw.weights_url(name)).name


@pytest.fixture(scope="module")
def xrv_home(tmp_path_factory):
    """A HOME whose torchxrayvision cache holds DENSENET and RESNET files made from its architectures;
    yields {name: the model the file was saved from}."""
    home = tmp_path_factory.mktemp("xrv-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        xrv = _xrv()
        xw.cache_dir().mkdir(parents=True)
        torch.manual_seed(0)
        dense = xrv.models.DenseNet(weights=None).eval()
        for m in dense.modules():  # non-trivial running statistics, so a lost buffer shows
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        torch.save(dense, _file(DENSENET))  # as torchxrayvision's DenseNet files are: a pickled model
        import torchvision

        res = torchvision.models.resnet50(num_classes=18, weights=None)  # what xrv.models.ResNet wraps
        res.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        torch.save(res.state_dict(), _file(RESNET))  # its ResNet file: the torchvision state dict
        yield {DENSENET: dense, RESNET: res.eval()}


# ----------------------------------------------------------------------------- the weights value


def test_xrv_names_parse_to_their_input_convention(tmp_path):
    w = Weights.parse("xrv:densenet121-res224-all")
    assert (w.kind, w.source, w.file) == (XRV, DENSENET, "")
    assert w.config_value() == "xrv:densenet121-res224-all" and Weights.parse(w.config_value()) == w
    conv = w.convention
    assert (conv.model_name, conv.in_chans, conv.image_size) == ("densenet121", 1, 224)
    assert Weights.parse("XRV:resnet50-res512-all").convention.image_size == 512
    assert Weights.parse("xrv:densenet121-res224-nih").describe() == "torchxrayvision weights densenet121-res224-nih"
    local = Weights.parse(f"xrv:{DENSENET}@{tmp_path / 'w.pt'}")
    assert local.file == str(tmp_path / "w.pt") and Weights.parse(local.config_value()) == local
    assert TrainConfig(pretrained="xrv:densenet121-res224-chex").weights.source == "densenet121-res224-chex"
    assert Weights.parse(True).convention is None and Weights.parse("w.pth").convention is None
    for bad in ("xrv:densenet121", "xrv:vgg16-res224-all", "xrv:densenet121-res224-all@"):
        with pytest.raises(ValueError, match="xrv:"):
            Weights.parse(bad)
    # the convention is exactly torchxrayvision's 8-bit scaling, (2 x / 255 - 1) * 1024
    x = np.arange(256, dtype=np.uint8)
    ours = to_model_input(x[None], XRV_MEAN, XRV_STD, 1)[0, 0]
    np.testing.assert_allclose(ours, _xrv().datasets.normalize(x.astype(np.float32), 255), atol=1e-3)
    assert ours[0] == -1024 and ours[-1] == 1024


def test_every_published_densenet_and_resnet_name_is_offered():
    names = xw.published_names()
    for name in ("densenet121-res224-all", "densenet121-res224-nih", "densenet121-res224-chex",
                 "densenet121-res224-pc", "densenet121-res224-mimic_nb", "densenet121-res224-mimic_ch",
                 "densenet121-res224-rsna", "resnet50-res512-all"):
        assert name in names and Weights.parse("xrv:" + name).convention is not None


def test_importing_torchxrayvision_keeps_the_warning_filters():
    before = list(warnings.filters)
    _xrv()
    assert warnings.filters == before


# ----------------------------------------------------------------------------- loading


def test_densenet_file_loads_into_the_same_feature_extractor(xrv_home):
    source = xrv_home[DENSENET]
    model = build_model("densenet121", num_labels=14, in_chans=1, image_size=64, pretrained=f"xrv:{DENSENET}")
    state = source.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert sorted(model.pretrained_report["dropped"]) == ["classifier.bias", "classifier.weight"]
    assert model.pretrained_report["source"] == str(_file(DENSENET))
    assert model_input_config(model) == {"image_size": 64, "mean": [0.5], "std": [1 / 2048], "in_chans": 1}
    x = torch.randn(2, 1, 64, 64) * 500
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), source.features2(x))  # xrv's own feature vector


def test_resnet_file_loads_and_the_size_defaults_to_the_weights(xrv_home):
    source = xrv_home[RESNET]
    model = build_model("resnet50", num_labels=1, in_chans=1, pretrained=f"xrv:{RESNET}")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert model_input_config(model)["image_size"] == 512  # built without a size: the weights' own
    assert model_input_config(model, 256)["image_size"] == 256
    # a resumed run rebuilds its model without weights; the convention still comes from them
    plain = build_model("resnet50", num_labels=1, in_chans=1, image_size=64, pretrained=None)
    assert model_input_config(plain, weights=f"xrv:{RESNET}")["std"] == [1 / 2048]
    assert model_input_config(plain)["std"] != [1 / 2048]


def test_a_model_pickled_from_a_training_script_loads_too(tmp_path, monkeypatch):
    # the published files were saved by training scripts: their top class may live in any module
    import sys
    import types

    script = types.ModuleType("train_script")
    script.DenseNet = type("DenseNet", (_xrv().models.DenseNet,), {"__module__": "train_script"})
    monkeypatch.setitem(sys.modules, "train_script", script)
    torch.manual_seed(1)
    model = script.DenseNet(weights=None, block_config=(1, 1, 1, 1))
    torch.save(model, tmp_path / "w.pt")
    monkeypatch.delitem(sys.modules, "train_script")  # reading it must not need the class
    state = xw.load_state(tmp_path / "w.pt")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_local_file_is_used_as_given(xrv_home, tmp_path):
    moved = tmp_path / "downloaded.pt"
    moved.write_bytes(_file(DENSENET).read_bytes())
    model = build_model("densenet121", in_chans=1, image_size=32, pretrained=f"xrv:densenet121-res224-nih@{moved}")
    assert model.pretrained_report["source"] == str(moved)
    with pytest.raises(FileNotFoundError, match="no such file.*nih-densenet121"):
        build_model("densenet121", in_chans=1, image_size=32, pretrained=f"xrv:densenet121-res224-nih@{tmp_path}/x.pt")


def test_other_architectures_or_channels_are_clear_errors():
    with pytest.raises(ValueError, match=r"densenet121 with 1 input channel.*--model densenet121 --in-chans 1"):
        build_model("resnet50", in_chans=1, pretrained=f"xrv:{DENSENET}")
    with pytest.raises(ValueError, match="in_chans=3"):
        build_model("densenet121", in_chans=3, pretrained=f"xrv:{DENSENET}")
    with pytest.raises(ValueError, match="no weights of that name.*xrv:densenet121-res224-all"):
        build_model("densenet121", in_chans=1, pretrained="xrv:densenet121-res224-nope")


def test_offline_error_names_the_file_its_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty torchxrayvision cache
    monkeypatch.setattr(xw, "reachable", lambda host: False)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_model("densenet121", in_chans=1, image_size=32, pretrained="xrv:densenet121-res224-chex")
    msg = str(info.value)
    url = "https://github.com/mlmed/torchxrayvision/releases/download/v1/chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    target = tmp_path / ".torchxrayvision" / "models_data" / "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    assert url in msg and str(target) in msg and "github.com cannot be reached" in msg
    assert "--pretrained xrv:densenet121-res224-chex@/path/to/chex-densenet121" in msg
    assert not target.exists()


def test_a_pickle_payload_is_refused_and_never_runs(xrv_home, tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "bad.pt"
    torch.save({"features.conv0.weight": torch.zeros(1), "x": Payload()}, bad)
    with pytest.raises(xw.UnsafeWeightsFile, match=r"refused.*system"):
        xw.load_state(bad)
    with pytest.raises(xw.UnsafeWeightsFile):
        build_model("densenet121", in_chans=1, image_size=32, pretrained=f"xrv:{DENSENET}@{bad}")

    # a payload named like a torchxrayvision class meets an inert stand-in, never the callable
    def evil(cmd):
        os.system(cmd)

    evil.__module__, evil.__qualname__ = "torchxrayvision.models", "Evil"
    monkeypatch.setattr(_xrv().models, "Evil", evil, raising=False)

    class Disguised:
        def __reduce__(self):
            return evil, (f"touch {marker}",)

    torch.save({"m": Disguised()}, bad)
    with pytest.raises(xw.UnsafeWeightsFile, match="called with arguments"):
        xw.load_state(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_matches_torchxrayvision_on_a_real_nih_image(nih_sample):
    import skimage.io

    xrv = _xrv()
    path = nih_sample / "images" / "00000211_000.png"
    raw = skimage.io.imread(path)
    assert raw.ndim == 2 and raw.dtype == np.uint8  # an 8-bit grey NIH image, as xrv's examples read it
    conv = Weights.parse(f"xrv:{DENSENET}").convention

    def theirs(size):
        img = xrv.datasets.normalize(raw, 255)[None]
        return xrv.datasets.XRayResizer(size)(xrv.datasets.XRayCenterCrop()(img))[0]

    def ours(size):
        return to_model_input(resize_gray(read_grayscale(path), size), conv.mean, conv.std, conv.in_chans)[0]

    # at the native 1024 px nothing is resampled: the intensity convention is exact
    np.testing.assert_allclose(ours(1024), theirs(1024), atol=1e-3)
    # at the weights' 224 px the resampling filters differ (Pillow's antialiased bilinear vs skimage's
    # Gaussian + bilinear with zero padding at the border): measured mean 3.3, interior max 50, edge max
    # 160 on this image, on a range of 2048
    a, b = ours(conv.image_size), theirs(conv.image_size)
    assert a.shape == b.shape == (1, 224, 224)[1:]
    diff = np.abs(a - b)
    assert diff.mean() < 6 and diff[1:-1, 1:-1].max() < 100 and diff.max() < 250
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


# ----------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def xrv_run(xrv_home, tmp_path_factory) -> Path:
    """`medimaging train --pretrained xrv:...` for two steps with the whole backbone frozen, on a small
    synthetic set at 32 px (the DenseNet-121 forward dominates; the images do not matter here)."""
    from common.synthetic import generate

    root = tmp_path_factory.mktemp("xrv-run")
    data = generate(root / "synthetic", layout="nih", n_images=48, image_size=32, progress=False, workers=1)
    out = root / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"pretrained=.xrv.\S+ were trained at", UserWarning)
        assert cli(["train", "--data", str(data), "--pretrained", f"xrv:{DENSENET}", "--model", "densenet121",
                    "--in-chans", "1", "--image-size", "32", "--freeze", "-1", "--max-steps", "2", "--batch-size", "8",
                    "--workers", "0", "--n-boot", "10", "--no-progress", "--out", str(out)]) == 0
    return out


def test_a_run_from_xrv_weights_records_their_convention_and_keeps_their_backbone(xrv_run, xrv_home):
    cfg = runs.read_config(xrv_run)
    assert cfg["input"] == {"image_size": 32, "mean": [0.5], "std": [1 / 2048], "in_chans": 1}
    assert cfg["train"]["pretrained"] == f"xrv:{DENSENET}"
    assert cfg["model"]["model_name"] == "densenet121" and cfg["model"]["in_chans"] == 1
    # the whole backbone was frozen: it is still exactly the file's, and the head learnt
    run = runs.load_run(xrv_run)
    state = xrv_home[DENSENET].state_dict()
    for key, value in run.model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.manual_seed(TrainConfig().seed)  # the head fit started from
    fresh = build_model("densenet121", in_chans=1, image_size=32, pretrained=None)
    assert not torch.equal(run.model.head[0].weight, fresh.head[0].weight)


def test_a_stage_two_from_an_xrv_run_keeps_its_intensity_scale(xrv_run, tmp_path):
    data = runs.read_config(xrv_run)["train"]["data"]
    out = tmp_path / "stage2"
    assert cli(["train", "--data", *data, "--init-from", str(xrv_run), "--model", "densenet121", "--in-chans", "1",
                "--image-size", "32", "--max-steps", "0", "--workers", "0", "--n-boot", "10", "--no-progress",
                "--out", str(out)]) == 0
    assert runs.read_config(out)["input"] == {"image_size": 32, "mean": [0.5], "std": [1 / 2048], "in_chans": 1}


@pytest.mark.slow  # the DenseNet-121 ONNX export alone takes ~20 s
def test_prediction_uses_the_convention_in_torch_and_onnx_alike(xrv_run, nih_sample):
    from common.export import export_onnx
    from common.predict import load_predictor

    images = sorted((nih_sample / "images").glob("*.png"))[:4]
    torch_predictor = load_predictor(xrv_run)
    run = runs.load_run(xrv_run)
    x = to_model_input(np.stack([resize_gray(read_grayscale(p), 32) for p in images]), XRV_MEAN, XRV_STD, 1)
    with torch.no_grad():
        expected = torch.sigmoid(run.model(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(torch_predictor.predict_proba(images), expected, atol=1e-5)

    export = export_onnx(xrv_run, log=lambda m: None)
    onnx_predictor = load_predictor(export)
    assert onnx_predictor.backend == "onnx" and onnx_predictor.input == torch_predictor.input
    np.testing.assert_allclose(onnx_predictor.predict_proba(images), expected, atol=1e-4)


# ----------------------------------------------------------------------------- the configuration


def test_the_weights_alone_choose_model_channels_and_size():
    cfg = TrainConfig(pretrained=f"xrv:{RESNET}", out="x").validate()
    assert (cfg.model_name, cfg.in_chans, cfg.image_size) == ("resnet50", 1, 512)
    assert TrainConfig.from_dict(cfg.asdict()) == cfg
    assert TrainConfig(pretrained=f"xrv:{DENSENET}", image_size=64).image_size == 64  # a size asked for stays
    with pytest.raises(ValueError, match="are weights of a densenet121"):
        TrainConfig(pretrained=f"xrv:{DENSENET}", model_name="resnet18", out="x").validate()


@pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")  # the resumed model, before its checkpoint loads
def test_a_resumed_run_keeps_the_weights_convention(xrv_home, tmp_path, monkeypatch):
    from common import train
    from common.synthetic import generate

    data = generate(tmp_path / "synthetic", layout="nih", n_images=48, image_size=32, progress=False, workers=1)
    cfg = TrainConfig(data=[str(data)], model_name="densenet121", in_chans=1, image_size=32, batch_size=8,
                      pretrained=f"xrv:{DENSENET}", freeze=-1, epochs=1, checkpoint_every=1, num_workers=0,
                      n_boot=10, progress=False, out=str(tmp_path / "run"))
    calls = []

    def stop_at_the_second_step(loss, logits, targets, inputs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the first step's checkpoint
        return loss

    with pytest.raises(KeyboardInterrupt):
        train.fit(cfg, train.FitHooks(loss=stop_at_the_second_step))
    seen = []

    class Recording(train.BatchTransform):
        def __init__(self, input_cfg, *args, **kwargs):
            seen.append(dict(input_cfg))
            super().__init__(input_cfg, *args, **kwargs)

    monkeypatch.setattr(train, "BatchTransform", Recording)
    cfg.max_steps = 2
    train.fit(cfg)
    assert seen and seen[0]["std"] == [1 / 2048] and seen[0]["in_chans"] == 1
