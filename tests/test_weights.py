"""Pretrained weights from a folder of downloads (offline machines): lookup, profiles, reproduce."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from common import experiments as ex
from common.models import build_model, find_local_weights


def test_a_weights_folder_is_searched_by_full_name_then_architecture(tmp_path):
    (tmp_path / "resnet50.a1_in1k.pth").write_bytes(b"x")
    (tmp_path / "tf_efficientnet_b4.safetensors").write_bytes(b"x")
    (tmp_path / "vit_base_patch16_224.augreg_in21k_ft_in1k").mkdir()
    (tmp_path / "vit_base_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "convnext_tiny").mkdir()  # a folder without weights is not a match
    assert find_local_weights(tmp_path, "resnet50.a1_in1k") == tmp_path / "resnet50.a1_in1k.pth"
    assert find_local_weights(tmp_path, "tf_efficientnet_b4.ns_jft_in1k") == tmp_path / "tf_efficientnet_b4.safetensors"
    assert (find_local_weights(tmp_path, "vit_base_patch16_224.augreg_in21k_ft_in1k")
            == tmp_path / "vit_base_patch16_224.augreg_in21k_ft_in1k")
    with pytest.raises(FileNotFoundError, match=r"no weights for 'convnext_tiny'.*convnext_tiny.safetensors.*hf download"):
        find_local_weights(tmp_path, "convnext_tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_local_weights(tmp_path / "nope", "resnet50")


def test_profiles_take_weights_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ex.WEIGHTS_ENV, raising=False)
    quick = ex.get_profile("quick")
    assert quick.pretrained_for("efficientnet_b0") is False and "random initialisation" in quick.label
    assert ex.get_profile("paper").pretrained_for("resnet50") is True
    assert "timm hub weights" in ex.get_profile("paper").label
    assert ex.get_profile("paper", weights="none").pretrained_for("resnet50") is False
    assert ex.get_profile("quick", weights="HUB").pretrained_for("resnet50") is True

    (tmp_path / "efficientnet_b0.safetensors").write_bytes(b"x")
    monkeypatch.setenv(ex.WEIGHTS_ENV, str(tmp_path))
    prof = ex.get_profile("quick")
    assert prof.pretrained_for("efficientnet_b0") == str(tmp_path / "efficientnet_b0.safetensors")
    assert f"pretrained weights from {tmp_path}" in prof.label
    assert ex.get_profile("quick", smoke=True).weights.is_random  # tiny test models have no weights
    with pytest.raises(FileNotFoundError, match="resnet18"):
        prof.pretrained_for("resnet18")
    monkeypatch.setenv(ex.WEIGHTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a folder"):
        ex.get_profile("quick")


def test_a_trainings_config_and_key_name_the_weights_file_it_starts_from(tmp_path, nih_sample):
    donor = build_model("test_efficientnet", num_labels=14, pretrained=None)
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in donor.backbone.state_dict().items()},
              str(folder / "test_efficientnet.safetensors"))
    data = ex.resolve_data(nih_sample, None)
    plain = ex.train_config(ex.get_profile("quick", weights="none"), "test_efficientnet", "all14", data)
    cfg = ex.train_config(ex.get_profile("quick", weights=folder), "test_efficientnet", "all14", data)
    assert plain.pretrained is False and cfg.pretrained == str(folder / "test_efficientnet.safetensors")
    assert ex.run_key(cfg) != ex.run_key(plain)
    # a stage that starts from another run never loads backbone weights first
    later = ex.train_config(ex.get_profile("quick", weights=folder), "test_efficientnet", "all14", data,
                            init_from=tmp_path)
    assert later.pretrained is False
    # and the file really initialises the backbone
    model = build_model("test_efficientnet", num_labels=14, pretrained=cfg.pretrained)
    for k, v in donor.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_reproduce_refuses_a_weights_folder_that_does_not_exist(tmp_path):
    done = subprocess.run([sys.executable, "-m", "common", "reproduce", "--smoke", "--weights", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is not a folder" in done.stderr and "hub" in done.stderr


def test_weights_parse_every_spelling_and_store_the_old_config_value(tmp_path):
    from common.train_config import TrainConfig
    from common.weights import HUB, LOCAL, RANDOM, URL, Weights

    for value in (None, False, "none", "Random"):
        assert Weights.parse(value) == Weights(RANDOM) and Weights.parse(value).config_value() is False
    for value in (True, "hub", "ImageNet"):
        assert Weights.parse(value) == Weights(HUB) and Weights.parse(value).config_value() is True
    assert Weights.parse(tmp_path / "w.pth") == Weights(LOCAL, str(tmp_path / "w.pth"))
    assert Weights.parse("https://host/w.pth").kind == URL
    with pytest.raises(TypeError, match="pretrained=3"):
        Weights.parse(3)
    # config.json keeps its old values, so old runs read back and run keys do not change
    assert TrainConfig().asdict()["pretrained"] is False
    assert TrainConfig(pretrained=Weights(HUB)).asdict()["pretrained"] is True
    cfg = TrainConfig(pretrained=tmp_path / "w.pth", out="r")
    assert cfg.asdict()["pretrained"] == str(tmp_path / "w.pth") and cfg.weights.kind == LOCAL
    assert TrainConfig.from_dict(cfg.asdict()) == cfg
    assert TrainConfig(pretrained="hub") == TrainConfig(pretrained=True)


def test_a_weights_folder_resolves_per_model_and_describes_itself(tmp_path):
    from common.weights import Weights

    (tmp_path / "resnet50.safetensors").write_bytes(b"x")
    folder = Weights.parse(tmp_path)
    assert folder.for_model("resnet50.a1_in1k") == Weights.parse(tmp_path / "resnet50.safetensors")
    assert Weights.parse(True).for_model("resnet50") == Weights.parse(True)
    assert folder.describe() == f"pretrained weights from {tmp_path}"
    assert Weights.parse(None).describe() == "random initialisation"
    assert Weights.parse(True).describe() == "timm hub weights"


def test_build_model_takes_a_weights_value(tmp_path):
    from common.weights import Weights

    donor = build_model("test_efficientnet", num_labels=2, pretrained=None)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model("test_efficientnet", num_labels=2, pretrained=Weights.parse(tmp_path / "w.safetensors"))
    assert model.pretrained_report["source"] == str(tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="random initialisation"):
        build_model("test_efficientnet", num_labels=2, pretrained="none")
