"""The classifiers: a 29-class head on every architecture, frozen backbones, offline pretrained weights,
and small output maps computed as one matrix product on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from pipeline.errors import UserError
from pipeline.serving import MODEL_NAMES
from pipeline.serving.networks import GemmSmallMapConv2d, build_model, gemm_small_maps


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


# --- small output maps as one matrix product ---------------------------------------------------------

SMALL_MAP_CONVS = [  # kernel, stride, padding, dilation, bias, input (height, width): outputs of 1-4 pixels
    (3, 1, 1, 1, False, (2, 2)),
    (3, 2, 1, 1, False, (4, 4)),
    (1, 2, 0, 1, True, (4, 4)),
    (3, 1, 2, 2, True, (2, 2)),
    (3, 1, 0, 1, False, (3, 3)),
    ((1, 3), (2, 1), (0, 2), (1, 2), True, (3, 2)),  # a 2x2 output from a non-square everything
    ((2, 3), 1, 0, 1, False, (2, 6)),  # a 1x4 output
]


def _gemm_and_plain(spec, channels_last=False, batch=8, seed=0):
    kernel, stride, padding, dilation, bias, (height, width) = spec
    torch.manual_seed(seed)
    plain = torch.nn.Conv2d(8, 16, kernel, stride, padding, dilation, bias=bias)
    inputs = torch.randn(batch, 8, height, width)
    if channels_last:  # as our models run: weights and inputs in channels_last
        plain = plain.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    gemm = copy.deepcopy(plain)
    gemm_small_maps(gemm)
    assert type(gemm) is GemmSmallMapConv2d
    return gemm, plain, inputs


def _op_counts(module: torch.nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        module(inputs)
    return {event.key: event.count for event in profile.key_averages()}


def _ran_as_gemm(module: torch.nn.Module, inputs: torch.Tensor) -> bool:
    ops = _op_counts(module, inputs)
    return "aten::im2col" in ops and "aten::convolution" not in ops


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("spec", SMALL_MAP_CONVS, ids=lambda s: f"k{s[0]}s{s[1]}p{s[2]}d{s[3]}-{s[5]}")
def test_a_small_output_map_is_one_matrix_product_with_the_convolutions_values_and_gradients(
    spec, channels_last
):
    gemm, plain, inputs = _gemm_and_plain(spec, channels_last)
    assert _ran_as_gemm(gemm, inputs)
    outputs = []
    for module in (gemm, plain):
        x = inputs.clone().requires_grad_()
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # every output counts
        outputs.append((out, x.grad, module.weight.grad, None if module.bias is None else module.bias.grad))
    out = outputs[0][0]
    assert out.shape[-2] * out.shape[-1] <= 4
    # The output keeps the input's layout, as the convolution's does.
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for ours, theirs in zip(*outputs, strict=True):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_an_empty_batch_gives_an_empty_output_as_the_convolution_does():
    gemm, plain, inputs = _gemm_and_plain(SMALL_MAP_CONVS[0], batch=0)
    assert gemm(inputs).shape == plain(inputs).shape == (0, 16, 2, 2)


def test_a_small_output_map_under_bf16_autocast_is_a_bf16_product_near_fp32():
    gemm, plain, inputs = _gemm_and_plain(SMALL_MAP_CONVS[0], channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _ran_as_gemm(gemm, inputs)
        ours = gemm(inputs)
    assert ours.dtype == torch.bfloat16  # the product ran in bf16, as the convolution would
    torch.testing.assert_close(ours.float(), plain(inputs), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("spec", SMALL_MAP_CONVS[:3], ids=["3x3", "3x3-stride2", "1x1-stride2"])
def test_one_fp32_image_keeps_the_convolution_and_two_images_or_bf16_take_the_product(spec):
    gemm, plain, image = _gemm_and_plain(spec, channels_last=True, batch=1)
    assert not _ran_as_gemm(gemm, image)  # 4 rows in fp32: oneDNN's kernel is the faster here
    assert torch.equal(gemm(image), plain(image))
    assert _ran_as_gemm(gemm, torch.cat([image, image]))  # 8 rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _ran_as_gemm(gemm, image)  # in bf16 the product wins from one row
    assert _ran_as_gemm(gemm.bfloat16(), image.bfloat16())  # bf16 weights, no autocast: the same


def test_larger_maps_and_grouped_or_padded_convolutions_keep_the_convolution():
    gemm, plain, _ = _gemm_and_plain((3, 1, 1, 1, False, (3, 3)))  # a 3x3 output: 9 pixels
    larger = torch.randn(2, 8, 3, 3)
    assert not _ran_as_gemm(gemm, larger)
    assert torch.equal(gemm(larger), plain(larger))
    depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    reflected = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    same = torch.nn.Conv2d(8, 8, 3, padding="same")
    for module in (depthwise, reflected, same):
        assert type(gemm_small_maps(module)) is torch.nn.Conv2d


def test_resnet18_at_64_px_computes_its_last_stage_as_products_with_the_same_weights_and_outputs():
    ours = build_model("resnet18", 29).eval()
    stock = torchvision.models.resnet18(num_classes=29).eval()
    stock.load_state_dict(ours.state_dict())  # the same keys and shapes: checkpoints are interchangeable
    swapped = [name for name, module in ours.named_modules() if type(module) is GemmSmallMapConv2d]
    assert "layer4.0.conv1" in swapped and "conv1" in swapped  # every plain convolution, large or small
    images = torch.randn(4, 3, 64, 64)
    # The last stage's maps are 2x2: its four 3x3 convolutions and the 1x1 shortcut; the rest are larger.
    assert _op_counts(ours, images)["aten::im2col"] == 5
    with torch.no_grad():
        torch.testing.assert_close(ours(images), stock(images), rtol=1e-4, atol=1e-4)
