"""The classifiers: a 29-class head on every architecture, frozen backbones, offline pretrained weights."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.serving import MODEL_NAMES
from pipeline.serving.networks import build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_architecture_ends_in_a_29_class_head(name):
    model = build_model(name, 29).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 29)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "small_cnn"])
def test_frozen_backbone_trains_only_the_head(name):
    model = build_model(name, 29, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the head must still train"
    assert all(n.startswith(("fc.", "classifier.")) for n in trainable), trainable
    assert len(trainable) < len(list(model.parameters()))


def test_pretrained_weights_offline_name_the_remedy(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the weights must be downloaded
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="model.pretrained: false"):
        build_model("resnet18", 29, pretrained=True)


def test_small_cnn_has_no_pretrained_weights():
    with pytest.raises(UserError, match="small_cnn"):
        build_model("small_cnn", 29, pretrained=True)
