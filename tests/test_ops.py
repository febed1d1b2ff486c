"""Each StyleGAN2 op against a direct formula written here, and the two modulated-conv forms against each other."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stylegan2 import Blur, Discriminator, FusedLeakyReLU, Generator, ModulatedConv2d, Upsample, fused_leaky_relu, make_kernel, upfirdn2d


def upfirdn2d_direct(x, kernel, up, down, pad):
    """Literal per-channel definition with NumPy loops: zero insertion, pad/crop, true convolution, decimation."""
    x = x.detach().double().numpy()
    k = kernel.double().numpy()
    (ux, uy), (dx, dy) = up, down
    px0, px1, py0, py1 = pad
    b, c, h, w = x.shape
    upsampled = np.zeros((b, c, h * uy, w * ux))
    upsampled[:, :, ::uy, ::ux] = x
    padded = np.pad(upsampled, ((0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    padded = padded[:, :, max(-py0, 0) : padded.shape[2] - max(-py1, 0), max(-px0, 0) : padded.shape[3] - max(-px1, 0)]
    kh, kw = k.shape
    oh, ow = padded.shape[2] - kh + 1, padded.shape[3] - kw + 1
    out = np.zeros((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = padded[:, :, i : i + kh, j : j + kw]
            # true convolution: sum_{m,n} k[m, n] x[i + kh - 1 - m, j + kw - 1 - n]
            out[:, :, i, j] = (window * k[::-1, ::-1]).sum((2, 3))
    return torch.from_numpy(out[:, :, ::dy, ::dx].copy())


@pytest.mark.parametrize(
    "up,down,pad",
    [
        ((1, 1), (1, 1), (0, 0, 0, 0)),
        ((2, 2), (1, 1), (2, 1, 2, 1)),
        ((1, 1), (2, 2), (2, 2, 2, 2)),
        ((2, 2), (2, 2), (1, 1, 1, 1)),
        ((2, 1), (1, 2), (1, 0, 0, 2)),
        ((1, 1), (1, 1), (-1, 2, 1, -2)),
    ],
)
@pytest.mark.parametrize("separable", [True, False])
def test_upfirdn2d_matches_direct_definition(up, down, pad, separable):
    x = torch.randn(2, 3, 7, 6)
    kernel = make_kernel([1, 3, 3, 1]) if separable else torch.rand(4, 3)
    ours = upfirdn2d(x, kernel, up=up, down=down, pad=pad).double()
    expected = upfirdn2d_direct(x, kernel, up, down, pad)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-5)


def test_upfirdn2d_scalar_arguments_and_output_size():
    x = torch.randn(1, 2, 8, 8)
    k = make_kernel([1, 3, 3, 1])
    out = upfirdn2d(x, k * 4, up=2, pad=(2, 1))
    assert out.shape == (1, 2, 16, 16)  # (8*2 + 2 + 1 - 4) // 1 + 1
    assert torch.allclose(out.double(), upfirdn2d_direct(x, k * 4, (2, 2), (1, 1), (2, 1, 2, 1)), atol=1e-5)


def test_make_kernel_is_normalised_outer_product():
    expected = torch.tensor([[1, 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]], dtype=torch.float32) / 64
    assert torch.equal(make_kernel([1, 3, 3, 1]), expected)


def test_upsample_and_blur_modules():
    x = torch.randn(2, 4, 8, 8)
    up = Upsample([1, 3, 3, 1])
    assert torch.equal(up.kernel, make_kernel([1, 3, 3, 1]) * 4)
    assert up.pad == (2, 1)
    assert up(x).shape == (2, 4, 16, 16)
    # a constant image stays constant away from the borders after 2x upsampling with the gain-4 kernel
    assert torch.allclose(up(torch.ones(1, 1, 8, 8))[..., 4:-4, 4:-4], torch.ones(1, 1, 8, 8), atol=1e-6)
    blur = Blur([1, 3, 3, 1], pad=(2, 1))
    assert torch.allclose(blur(x).double(), upfirdn2d_direct(x, make_kernel([1, 3, 3, 1]), (1, 1), (1, 1), (2, 1, 2, 1)), atol=1e-5)


def test_fused_leaky_relu_formula():
    x = torch.randn(3, 5, 4, 4)
    b = torch.randn(5)
    y = x + b.view(1, 5, 1, 1)
    expected = torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2)
    assert torch.allclose(fused_leaky_relu(x, b), expected, atol=1e-6)
    layer = FusedLeakyReLU(5)
    layer.bias.data.copy_(b)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    # 2-D input (EqualLinear with activation)
    x2 = torch.randn(4, 5)
    y2 = x2 + b
    assert torch.allclose(fused_leaky_relu(x2, b), torch.where(y2 >= 0, y2, 0.2 * y2) * math.sqrt(2), atol=1e-6)


def test_fused_leaky_relu_gradients_equal_autograd_and_only_the_output_is_saved():
    """Its custom backward gives autograd's gradients bit for bit, first and second order (R1 and the path
    length differentiate through it twice), and keeps only the output alive for backward."""
    import torch.nn.functional as F

    def autograd_form(x, bias):
        return F.leaky_relu(x + bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)

    torch.manual_seed(0)
    x0, w = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 4, 4)
    b0, mix0, b20 = torch.randn(5), torch.randn(5, 5), torch.randn(5)
    results = []
    for f in (autograd_form, fused_leaky_relu):
        x, b, mix, b2 = (t.clone().requires_grad_() for t in (x0, b0, mix0, b20))
        y = f(torch.einsum("bchw,cd->bdhw", f(x, b), mix), b2)  # two layers: second-order terms reach mix
        gx, gb = torch.autograd.grad((y * w).sum(), (x, b), create_graph=True)
        second = torch.autograd.grad(gx.pow(2).sum() + gb.pow(3).sum(), (mix,))
        results.append((y, gx, gb, *second))
    assert all(torch.equal(a, c) for a, c in zip(*results))
    x, b = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fused_leaky_relu, (x, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused_leaky_relu(x, b)
    assert len(saved) == 1 and saved[0].data_ptr() == out.data_ptr()


def test_constant_weight_conv2d_equals_autograd_and_keeps_only_the_weight():
    """stylegan2.conv2d with a weight that records no gradient (FIR filters, a frozen D): the output and the
    input's gradient are F.conv2d's bit for bit, the gradient is differentiable again, and only the weight is
    kept for backward."""
    import torch.nn.functional as F

    from stylegan2 import conv2d

    torch.manual_seed(0)
    for cin, cout, k, stride, padding, groups in [(6, 8, 3, 1, 1, 1), (6, 6, 1, (1, 2), 0, 6), (8, 8, 3, 2, 0, 1)]:
        x0, w, b = torch.randn(2, cin, 12, 12), torch.randn(cout, cin // groups, k, k), torch.randn(cout)
        results = []
        for f in (F.conv2d, conv2d):
            x = x0.clone().requires_grad_()
            y = f(x, w, b, stride, padding, groups=groups)
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1]))
            results.append((y, gx))
        assert all(torch.equal(a, c) for a, c in zip(*results))
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda x: conv2d(x, w, None, 1, 1), (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv2d(x, w, None, 1, 1)
    assert len(saved) == 1 and saved[0] is w


def modconv_direct(conv, x, w):
    """Per-sample weights built explicitly, one ordinary convolution per sample (double precision)."""
    x, w = x.double(), w.double()
    s = F.linear(w, conv.modulation.weight.double() * conv.modulation.scale, conv.modulation.bias.double() * conv.modulation.lr_mul)
    outs = []
    for b in range(x.shape[0]):
        weight = conv.scale * conv.weight[0].double() * s[b].view(1, -1, 1, 1)  # [O, I, k, k]
        if conv.demodulate:
            weight = weight / torch.sqrt((weight**2).sum((1, 2, 3), keepdim=True) + 1e-8)
        xb = x[b : b + 1]
        if conv.upsample:
            out = F.conv_transpose2d(xb, weight.transpose(0, 1), stride=2)
            kernel = conv.blur.kernel.double()
            out = upfirdn2d_direct(out, kernel, (1, 1), (1, 1), conv.blur.pad * 2)
        elif conv.downsample:
            xb = upfirdn2d_direct(xb, conv.blur.kernel.double(), (1, 1), (1, 1), conv.blur.pad * 2)
            out = F.conv2d(xb, weight, stride=2)
        else:
            out = F.conv2d(xb, weight, padding=conv.padding)
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, upsample=True),
        dict(kernel_size=3, downsample=True),
        dict(kernel_size=1, demodulate=False),
    ],
)
def test_modulated_conv_forms_match_direct_formula(kwargs):
    conv = ModulatedConv2d(6, 5, style_dim=8, **kwargs)
    x = torch.randn(3, 6, 8, 8)
    w = torch.randn(3, 8)
    expected = modconv_direct(conv, x, w)
    results = {}
    for form in ("grouped", "shared"):
        conv.form = form
        results[form] = conv(x, w)
        assert results[form].shape == expected.shape
        assert torch.allclose(results[form].double(), expected, atol=1e-5), form
    assert torch.allclose(results["grouped"], results["shared"], atol=1e-5)


def test_modulated_conv_forms_have_equal_gradients():
    conv = ModulatedConv2d(6, 5, 3, style_dim=8, upsample=True)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    w = torch.randn(2, 8, requires_grad=True)
    grads = {}
    for form in ("grouped", "shared"):
        conv.form = form
        conv.zero_grad()
        out = conv(x, w)
        gx, gw, gweight = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [x, w, conv.weight])
        grads[form] = (gx, gw, gweight)
    for a, b in zip(grads["grouped"], grads["shared"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_auto_form_choice():
    conv = ModulatedConv2d(4, 4, 3, style_dim=4)
    assert conv.pick_form(4) == "shared"
    with torch.no_grad():
        assert conv.pick_form(1) == "grouped"
        assert conv.pick_form(2) == "shared"


@pytest.mark.parametrize("form", ["grouped", "shared"])
def test_double_backward_path_length_and_r1(form):
    g = Generator(16, style_dim=16, n_mlp=2, channel_cap=16)
    g.set_modconv_form(form)
    d = Discriminator(16, channel_cap=16)
    # path length: gradient of a gradient through the generator
    z = torch.randn(2, 16)
    img, latents = g([z], return_latents=True)
    (grad,) = torch.autograd.grad((img * torch.randn_like(img)).sum(), latents, create_graph=True)
    grad.pow(2).sum().backward()
    assert g.convs[0].conv.weight.grad is not None and g.convs[0].conv.weight.grad.abs().sum() > 0
    # R1: gradient of a gradient through the discriminator
    real = torch.randn(4, 3, 16, 16, requires_grad=True)
    (grad_real,) = torch.autograd.grad(d(real).sum(), real, create_graph=True)
    grad_real.pow(2).sum().backward()
    assert d.convs[1].conv1[0].weight.grad.abs().sum() > 0
