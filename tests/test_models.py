import pytest
import torch
import torch.nn as nn

from models import IMAGE_SIZES, Discriminator, Generator, seeded_samples


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_shapes_for_every_image_size(size):
    G = Generator(nz=16, ngf=4, image_size=size)
    D = Discriminator(ndf=4, image_size=size)
    x = G(torch.randn(2, 16))
    assert x.shape == (2, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1  # Tanh output
    assert D(x).shape == (2,)


def test_64_is_the_paper_architecture():
    G, D = Generator(), Discriminator()
    convs_G = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    convs_D = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs_G] == [512, 256, 128, 64, 3]
    assert [c.out_channels for c in convs_D] == [64, 128, 256, 512, 1]
    # BatchNorm on every D layer but the first and the output
    layers = list(D.main)
    assert isinstance(layers[1], nn.LeakyReLU) and layers[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    assert isinstance(list(G.main)[-1], nn.Tanh)


def test_initialisation_statistics():
    torch.manual_seed(0)
    for net in (Generator(), Discriminator()):
        conv = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
        bn = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
        assert abs(conv.mean()) < 1e-3 and abs(conv.std() - 0.02) < 1e-3
        assert abs(bn.mean() - 1) < 5e-3 and abs(bn.std() - 0.02) < 5e-3
        assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_sizes_outside_the_supported_range_are_refused():
    with pytest.raises(ValueError):
        Generator(image_size=48)
    with pytest.raises(ValueError):
        Discriminator(image_size=16)


def test_seeded_samples_depend_on_the_seed_alone_and_are_8_bit():
    torch.manual_seed(0)
    G = Generator(nz=16, ngf=8, image_size=32)
    a = seeded_samples(G, 10, seed=3, device="cpu", batch=4)
    assert a.shape == (10, 3, 32, 32) and a.device.type == "cpu"
    # the same noise at any batch size; a convolution may sum in another order, so within one grey level
    assert (a - seeded_samples(G, 10, seed=3, device="cpu", batch=256)).abs().max() <= 1 / 127.5 + 1e-6
    assert (a[:6] - seeded_samples(G, 6, seed=3, device="cpu")).abs().max() <= 1 / 127.5 + 1e-6  # fewer: the first of them
    assert not torch.equal(a, seeded_samples(G, 10, seed=4, device="cpu"))
    pixels = (a + 1) * 127.5
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)  # rounded to 8 bits, as image files are
    assert G.training  # drawing leaves G as it was
