"""Backbones build by name, give the documented output sizes, and reject inputs they cannot take."""
import pytest
import torch

from selfsup.models.backbones import Sobel, build_backbone


@pytest.mark.parametrize("name, ch, size, dim", [
    ("smallcnn", 1, 8, 128),
    ("nin", 3, 32, 192),
    ("resnet18_cifar", 3, 32, 512),
    ("resnet18", 3, 64, 512),
    ("resnet50", 3, 64, 2048),
    ("alexnet_bn", 3, 224, 4096),
])
def test_output_dims(name, ch, size, dim):
    torch.manual_seed(0)
    net = build_backbone(name, ch, image_size=size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, ch, size, size))
    assert out.shape == (2, dim) and net.out_dim == dim
    assert net.relu_head == (name == "alexnet_bn")  # AlexNet outputs fc7 before its ReLU


def test_nin_is_rotnets_four_block_network():
    """The official NetworkInNetwork layout: per block a k x k conv then two 1 x 1 (block 1:
    192-160-96, 5 x 5; block 2: 192 x 3, 5 x 5; blocks 3-4: 192 x 3, 3 x 3), a max-pool after block 1
    and average pools after blocks 2 and 3, so 32 px maps to 16, 8, 4, 4."""
    from selfsup.models.backbones import probe_points

    net = build_backbone("nin", 3).eval()
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 192, 5), (192, 160, 1), (160, 96, 1), (96, 192, 5), (192, 192, 1), (192, 192, 1),
                     (192, 192, 3), (192, 192, 1), (192, 192, 1), (192, 192, 3), (192, 192, 1), (192, 192, 1)]
    shapes = {}
    for name, m in probe_points(net).items():
        m.register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    assert shapes == {"block1": (96, 16, 16), "block2": (192, 8, 8), "block3": (192, 4, 4), "block4": (192, 4, 4)}


def test_cifar_stem_keeps_resolution():
    net = build_backbone("resnet18_cifar", 3)
    assert net.trunk.conv1.kernel_size == (3, 3) and net.trunk.conv1.stride == (1, 1)
    assert isinstance(net.trunk.maxpool, torch.nn.Identity)


def test_sobel_is_fixed_and_sees_edges_only():
    s = Sobel(3)
    assert not any(p.requires_grad for p in s.parameters())
    flat = torch.full((1, 3, 9, 9), 0.7)
    assert s(flat)[..., 1:-1, 1:-1].abs().max() < 1e-6  # no response inside a constant image
    step = torch.zeros(1, 3, 9, 9)
    step[..., 5:] = 1.0  # vertical edge -> x-gradient channel only
    out = s(step)[0, :, 2:-2, 2:-2]
    assert out[0].abs().max() > 1 and out[1].abs().max() < 1e-6
    net = build_backbone("alexnet_bn", 3, sobel=True)
    assert net.trunk.features[0].in_channels == 2


def test_rejects_small_images_and_unknown_names():
    with pytest.raises(ValueError, match="alexnet_bn needs images of at least 63"):
        build_backbone("alexnet_bn", 3, image_size=32)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit", 3)
