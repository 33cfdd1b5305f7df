"""The two networks of Goncharov et al. (2021): shapes, sizes, and what the classifier reads."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from models.inference import fold_batchnorm
from models.lung_network import LungSegmentationNet
from models.multitask import LATENT, SPATIAL_1, MultitaskConfig, MultitaskNet, latent_config, pyramid_max_pool3d
from models.preprocessing import resample_inplane
from models.torch_preprocessing import resample_inplane_torch, window_torch
from models.unet import UNet2d, UNetConfig, count_parameters

SMALL_UNET = UNetConfig(levels=4, base_channels=4, max_channels=16, top_decoder_blocks=1)


def test_unet_has_seven_levels_with_the_papers_channels() -> None:
    net = UNet2d(UNetConfig()).eval()
    with torch.no_grad():
        levels = net(torch.rand(2, 1, 100, 90))
    assert len(levels) == 7
    # Decoder output of level l: channels of the level above (8 at the top), size ceil(n / 2**(l-1)).
    expected_channels = [8, 8, 16, 32, 64, 128, 256]
    for level, (out, channels) in enumerate(zip(levels, expected_channels, strict=True), start=1):
        factor = 2 ** (level - 1)
        assert out.shape == (2, channels, -(-100 // factor), -(-90 // factor)), level
    assert [net.config.channels(level) for level in range(1, 8)] == [8, 16, 32, 64, 128, 256, 512]


def test_parameter_counts_are_pinned() -> None:
    """Any architecture change shows up here (and would invalidate shipped checkpoints)."""
    lungs, spatial, latent = LungSegmentationNet(), MultitaskNet(), MultitaskNet(latent_config())
    assert count_parameters(lungs) == 10_585_648
    assert count_parameters(spatial) == 15_380_017
    assert count_parameters(spatial.backbone) == 10_584_432
    # Pyramid of 1 + 8 + 64 + 512 bins over the 8 channels of the top level, then 1024, then 1.
    assert spatial.cls_head.fc1.in_features == 8 * 585
    assert count_parameters(spatial.cls_head) == 8 * 585 * 1024 + 1024 + 1024 + 1
    assert count_parameters(latent) == 12_946_993
    assert latent.cls_head.fc1.in_features == 256 * (1 + 8)


def test_multitask_output_shapes() -> None:
    net = MultitaskNet(MultitaskConfig(unet=SMALL_UNET, hidden_features=16)).eval()
    with torch.no_grad():
        seg, cls = net(torch.rand(2, 5, 37, 29))
    assert seg.shape == (2, 5, 37, 29)
    assert cls.shape == (2,)


def test_pyramid_pooling_gives_a_fixed_length_for_any_volume() -> None:
    for shape in [(1, 3, 4, 5, 6), (1, 3, 40, 17, 9), (1, 3, 1, 1, 1)]:
        assert pyramid_max_pool3d(torch.rand(shape), 4).shape == (1, 3 * 585)
    x = torch.zeros(1, 1, 8, 8, 8)
    x[0, 0, 7, 7, 7] = 5.0
    pooled = pyramid_max_pool3d(x, 2)[0]
    assert pooled[0] == 5.0  # global max
    assert pooled[1:].tolist() == [0.0] * 7 + [5.0]  # only the last of the 8 octants holds it


def _hooked(
    module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _m, _inp, out: change(out))


def _outputs(net: MultitaskNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return net(x)


def test_spatial_1_classifier_reads_the_top_decoder_level_only() -> None:
    torch.manual_seed(0)
    net = MultitaskNet(MultitaskConfig(variant=SPATIAL_1, unet=SMALL_UNET, hidden_features=16)).eval()
    assert net.shared_tap is net.backbone.taps[0]
    x = torch.rand(1, 6, 32, 32)
    seg, cls = _outputs(net, x)

    # Perturbing the top decoder level changes identification.
    handle = _hooked(net.backbone.taps[0], lambda out: out + torch.randn_like(out))
    _, cls_perturbed = _outputs(net, x)
    handle.remove()
    assert not torch.allclose(cls, cls_perturbed)

    # With the top level pinned to its clean value, perturbing the bottleneck changes nothing:
    # the classifier sees the deeper levels only through the top level's map.
    with torch.no_grad():
        clean_top = net.backbone(x.reshape(6, 1, 32, 32))[0]
    pin = _hooked(net.backbone.taps[0], lambda out: clean_top)
    shake = _hooked(net.backbone.taps[-1], lambda out: out + 10 * torch.randn_like(out))
    seg_pinned, cls_pinned = _outputs(net, x)
    pin.remove()
    shake.remove()
    torch.testing.assert_close(cls_pinned, cls)
    torch.testing.assert_close(seg_pinned, seg)


def test_latent_classifier_reads_the_bottleneck() -> None:
    torch.manual_seed(0)
    net = MultitaskNet(MultitaskConfig(variant=LATENT, unet=SMALL_UNET, hidden_features=16, pyramid_levels=2)).eval()
    assert net.shared_tap is net.backbone.taps[-1]
    x = torch.rand(1, 6, 32, 32)
    seg, cls = _outputs(net, x)
    handle = _hooked(net.backbone.taps[0], lambda out: out + torch.randn_like(out))
    seg_top, cls_top = _outputs(net, x)
    handle.remove()
    torch.testing.assert_close(cls_top, cls)  # the top level is not what it reads...
    assert not torch.allclose(seg_top, seg)  # ...though segmentation does
    handle = _hooked(net.backbone.taps[-1], lambda out: out + torch.randn_like(out))
    _, cls_bottom = _outputs(net, x)
    handle.remove()
    assert not torch.allclose(cls_bottom, cls)


def test_variant_names_and_validation() -> None:
    assert MultitaskConfig().architecture == "multitask-spatial-1"
    assert latent_config().architecture == "multitask-latent"
    assert MultitaskConfig(variant="spatial-4").shared_level == 4
    with pytest.raises(ValueError):
        MultitaskConfig(variant="spatial-9")
    with pytest.raises(ValueError):
        MultitaskConfig(variant="resnet")
    config = MultitaskConfig(variant="spatial-4", pyramid_levels=3)
    assert MultitaskConfig.from_dict(config.to_dict()) == config


def test_batchnorm_folding_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    net = LungSegmentationNet()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.rand(3, 1, 48, 40)
    with torch.no_grad():
        before = net(x)
        after = fold_batchnorm(net)(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_device_preprocessing_matches_the_numpy_one() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, size=(3, 97, 120)).astype(np.float32)
    spacing = (5.0, 0.7, 0.75)
    expected, expected_spacing = resample_inplane(hu, spacing)
    got, got_spacing = resample_inplane_torch(torch.from_numpy(hu), spacing)
    assert got.shape == expected.shape and got_spacing == expected_spacing
    np.testing.assert_allclose(got.numpy(), expected, atol=0.05)
    windowed = window_torch(torch.tensor([-2000.0, -1000.0, -350.0, 300.0, 900.0]))
    np.testing.assert_allclose(windowed.numpy(), [0.0, 0.0, 0.5, 1.0, 1.0])
