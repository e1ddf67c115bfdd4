"""common.models: any timm family builds and trains, heads, weights from files, init_from, freeze."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from torch import nn

from common import runs
from common.models import (
    MedImagingModel,
    PretrainedWeightsUnavailable,
    backbone_groups,
    build_model,
    freeze,
    mlp_hidden_sizes,
    model_input_config,
)
from common.runs import init_from

# Every family the experiments name: timm's tiny test models where they exist, else the smallest
# real variant at a small input.
FAMILIES = [
    ("test_efficientnet", 64),
    ("test_resnet", 64),
    ("test_vit", 64),
    ("test_convnext", 64),
    ("densenet121", 32),
    ("vgg11", 32),
    ("cspdarknet53", 64),
]


def _linears(model: MedImagingModel) -> list[nn.Linear]:
    return [m for m in model.head.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("head", ["mlp", "linear"])
@pytest.mark.parametrize("name,size", FAMILIES)
def test_family_builds_forward_backward(name, size, head):
    torch.manual_seed(0)
    model = build_model(name, num_labels=14, head=head, pretrained=None, image_size=size)
    assert isinstance(model.backbone, nn.Module) and model.backbone.num_classes == 0
    x = torch.randn(2, 3, size, size)
    pooled = model.backbone(x)
    assert pooled.shape == (2, model.num_features)  # the head's input width is the pooled width
    logits = model(x)
    assert logits.shape == (2, 14) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    linears = _linears(model)
    assert linears[0].in_features == model.num_features and linears[-1].out_features == 14
    if head == "linear":
        assert len(linears) == 1
    else:
        h1, h2 = mlp_hidden_sizes(model.num_features)
        assert [(m.in_features, m.out_features) for m in linears] == [
            (model.num_features, h1), (h1, h2), (h2, 14)]


def test_mlp_head_matches_study_layout_and_scales_with_width():
    assert mlp_hidden_sizes(1792) == (627, 256)  # the study's 1792 -> 625 -> 256, by rule
    assert mlp_hidden_sizes(768) == (269, 110)
    assert mlp_hidden_sizes(8) == (16, 16)  # floor for tiny backbones
    model = build_model("test_efficientnet", num_labels=2, pretrained=None, head_dropout=0.25)
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.Linear, nn.LeakyReLU, nn.Dropout, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert model.head[2].p == 0.25
    h1, h2 = mlp_hidden_sizes(model.num_features)
    assert model.head[0].out_features == h1 == round(model.num_features * 0.35)
    assert model.head[3].out_features == h2 == round(model.num_features / 7)


def test_uses_timm_pre_logits_width_when_it_differs():
    # mobilenetv3's conv_head sits after forward_features: pooled width 1024 vs num_features 288
    model = build_model("mobilenetv3_small_050", num_labels=3, pretrained=None)
    assert model.backbone.num_features != model.num_features == model.backbone.head_hidden_size
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])
def test_one_channel_input(name):
    model = build_model(name, num_labels=14, in_chans=1, image_size=64, pretrained=None)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 14)
    cfg = model_input_config(model)
    assert cfg["in_chans"] == 1 and len(cfg["mean"]) == len(cfg["std"]) == 1


def test_image_size_goes_to_vits_only():
    vit = build_model("test_vit", image_size=48, pretrained=None)
    assert vit.image_size_applied and vit.backbone.patch_embed.img_size == (48, 48)
    cnn = build_model("test_resnet", image_size=48, pretrained=None)
    assert not cnn.image_size_applied
    assert model_input_config(cnn)["image_size"] == 48
    assert model_input_config(cnn, image_size=96)["image_size"] == 96


def test_model_input_config_from_timm():
    from timm.data import resolve_model_data_config

    model = build_model("test_efficientnet", pretrained=None)
    timm_cfg = resolve_model_data_config(model.backbone)
    cfg = model_input_config(model)
    assert cfg == {"image_size": timm_cfg["input_size"][-1], "mean": list(timm_cfg["mean"]),
                   "std": list(timm_cfg["std"]), "in_chans": 3}
    json.dumps(cfg)


def test_features_and_head_compose_to_forward():
    model = build_model("test_convnext", num_labels=5, pretrained=None).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.ndim == 4 and feats.shape[0] == 2
    torch.testing.assert_close(model.forward_from_features(feats), model(x))


def test_build_kwargs_rebuild_the_same_architecture(tmp_path):
    model = build_model("test_vit", num_labels=1, head="linear", in_chans=1, image_size=48,
                        pretrained=None, drop_path_rate=0.1)
    kwargs = json.loads(json.dumps(model.build_kwargs))  # what config.json["model"] stores
    assert kwargs["drop_path_rate"] == 0.1 and "pretrained" not in kwargs
    # the run-directory contract: load_run rebuilds with build_model(**config["model"], pretrained=False)
    runs.save_json(tmp_path / runs.CONFIG, {"model": kwargs, "labels": ["Cardiomegaly"],
                                            "input": model_input_config(model)})
    runs.save_weights(model.state_dict(), tmp_path / runs.BEST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = runs.load_run(tmp_path)
    # trained weights load right after the build: no random-init warning there
    assert not [w for w in caught if "far below published" in str(w.message)]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[key], value)


def test_random_init_warns():
    with pytest.warns(UserWarning, match="far below published ones"):
        build_model("test_resnet", pretrained=False)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm model.*Did you mean efficientnet_b"):
        build_model("efficientnet_bO", pretrained=None)
    with pytest.raises(ValueError, match="num_labels"):
        build_model("test_resnet", num_classes=3, pretrained=None)


def test_offline_hub_weights_give_a_clear_error(tmp_path, monkeypatch):
    # this machine really has no route to the hub: the error must say so and name the local option
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_model("test_efficientnet", pretrained=True)
    msg = str(info.value)
    assert "could not download" in msg and "pretrained='/path/to/weights.safetensors'" in msg
    assert "--pretrained" in msg


def test_offline_hub_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    # weights downloaded earlier (Hugging Face cache layout) still load when the hub is unreachable
    import huggingface_hub

    source = timm.create_model("test_efficientnet", num_classes=0)
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    runs.save_weights(source.state_dict(), repo / "snapshots" / "abc123" / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = build_model("test_efficientnet", pretrained=True)
    torch.testing.assert_close(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert model.pretrained_report["source"].endswith("model.safetensors")


def test_no_hub_weights_or_unreachable_url_are_clear_errors():
    with pytest.raises(PretrainedWeightsUnavailable, match="timm has no pretrained weights for 'cspresnet50d'"):
        build_model("cspresnet50d", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="download failed.*--pretrained PATH"):
        build_model("test_resnet", pretrained="https://weights.invalid/resnet.pth")


def test_local_weights_file_and_folder_load_into_backbone(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=10)  # a plain timm checkpoint
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    folder = tmp_path / "hub"
    runs.save_weights(source.state_dict(), folder / "model.safetensors")
    for where in (tmp_path / "resnet.pth", folder):
        model = build_model("test_resnet", num_labels=14, pretrained=where)
        for key, value in model.backbone.state_dict().items():
            torch.testing.assert_close(value, source.state_dict()[key])
        report = model.pretrained_report
        assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
        assert len(report["kept"]) == len(model.backbone.state_dict())
        assert all(k.startswith("head.") for k in report["new"])


def test_local_weights_adapt_stem_and_vit_positions(tmp_path):
    source = timm.create_model("test_vit", num_classes=0)  # 3 channels, 160 px positions
    runs.save_weights(source.state_dict(), tmp_path / "vit.safetensors")
    model = build_model("test_vit", in_chans=1, image_size=64, pretrained=tmp_path / "vit.safetensors")
    stem = source.patch_embed.proj.weight
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, stem.sum(dim=1, keepdim=True))
    assert model.backbone.pos_embed.shape != source.pos_embed.shape  # resampled by timm's filter
    assert "backbone.pos_embed" in model.pretrained_report["kept"]
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)


def test_local_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="different architecture"):
        build_model("test_efficientnet", pretrained=tmp_path / "resnet.pth")
    with pytest.raises(FileNotFoundError, match="no such weights"):
        build_model("test_efficientnet", pretrained=tmp_path / "missing.safetensors")


def _stage1_run(tmp_path, name="test_efficientnet", as_last=False):
    torch.manual_seed(3)
    stage1 = build_model(name, num_labels=1, pretrained=None)
    run_dir = tmp_path / "stage1"
    runs.save_json(run_dir / runs.CONFIG, {"model": stage1.build_kwargs, "labels": ["Cardiomegaly"],
                                           "input": model_input_config(stage1)})
    if as_last:
        runs.atomic_torch_save({"model": stage1.state_dict(), "epoch": 1}, run_dir / runs.LAST)
    else:
        runs.save_weights(stage1.state_dict(), run_dir / runs.BEST)
    return stage1, run_dir


@pytest.mark.parametrize("as_last", [False, True])
def test_init_from_run_keeps_backbone_replaces_head(tmp_path, as_last):
    stage1, run_dir = _stage1_run(tmp_path, as_last=as_last)
    torch.manual_seed(4)
    stage2 = build_model("test_efficientnet", num_labels=14, pretrained=None)
    head_before = {k: v.clone() for k, v in stage2.head.state_dict().items()}
    report = init_from(stage2, run_dir)
    assert set(report) == {"kept", "dropped", "new"}
    for key, value in stage1.backbone.state_dict().items():
        torch.testing.assert_close(stage2.backbone.state_dict()[key], value)
    for key, value in head_before.items():  # the head stays the fresh one
        torch.testing.assert_close(stage2.head.state_dict()[key], value)
    assert sorted(report["kept"]) == sorted(f"backbone.{k}" for k in stage1.backbone.state_dict())
    assert sorted(report["dropped"]) == sorted(f"head.{k}" for k in stage1.head.state_dict())
    assert sorted(report["new"]) == sorted(f"head.{k}" for k in stage2.head.state_dict())


def test_init_from_plain_timm_checkpoint(tmp_path):
    # the study's "medical pretraining": a classifier checkpoint of the same architecture
    source = timm.create_model("test_efficientnet", num_classes=2)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "pneumonia.pth")
    model = build_model("test_efficientnet", num_labels=1, pretrained=None)
    report = init_from(model, tmp_path / "pneumonia.pth")
    assert sorted(report["dropped"]) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(model.backbone.conv_stem.weight, source.conv_stem.weight)


def test_init_from_wrong_architecture_is_a_clear_error(tmp_path):
    _, run_dir = _stage1_run(tmp_path, name="test_efficientnet")
    model = build_model("test_resnet", pretrained=None)
    with pytest.raises(ValueError, match="different architecture.*test_efficientnet"):
        init_from(model, run_dir)
    with pytest.raises(FileNotFoundError):
        init_from(model, tmp_path / "nope")


def test_freeze_first_groups_and_their_batchnorm():
    torch.manual_seed(0)
    model = build_model("test_efficientnet", num_labels=3, pretrained=None)
    groups = backbone_groups(model)
    assert [g for g, _ in groups][:3] == ["conv_stem+bn1", "blocks.0", "blocks.1"]
    frozen = freeze(model, 2)
    assert frozen == ["conv_stem+bn1", "blocks.0"]
    frozen_names = {n for _, names in groups[:2] for n in names}
    model.train()
    assert not model.backbone.bn1.training and model.backbone.blocks[1][0].bn1.training
    stats_before = model.backbone.bn1.running_mean.clone()
    live_before = model.backbone.blocks[1][0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    for name, param in model.backbone.named_parameters():
        if name in frozen_names:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name
    torch.testing.assert_close(model.backbone.bn1.running_mean, stats_before)  # frozen stats untouched
    assert not torch.equal(model.backbone.blocks[1][0].bn1.running_mean, live_before)


def test_freeze_whole_backbone_and_unfreeze():
    model = build_model("test_vit", pretrained=None)
    names = freeze(model, -1)
    assert names == [g for g, _ in backbone_groups(model)]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model(torch.randn(2, 3, 160, 160)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert freeze(model, 0) == []
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="has 7 groups"):
        freeze(model, 8)


@pytest.mark.parametrize("name,first", [("test_resnet", ["conv1+bn1", "layer1"]),
                                        ("test_convnext", ["stem", "stages.0"]),
                                        ("densenet121", ["features.conv0+features.norm0",
                                                         "features.denseblock1+features.transition1"])])
def test_freeze_group_names_per_family(name, first):
    model = build_model(name, pretrained=None)
    assert freeze(model, 2) == first
