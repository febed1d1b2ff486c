"""StyleGAN2 generator and discriminator, drop-in compatible with rosinality/stylegan2-pytorch.

Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020, in the module layout of
rosinality/stylegan2-pytorch (`model.py`), so that its checkpoints (`g`, `g_ema`, `d`) load with `strict=True`
and give the same outputs. Every op is plain PyTorch: nothing is compiled, importing this file is instant, and
the same code runs on CPU and GPU, with double backward (R1, path length) everywhere.

What this file adds to rosinality's model, for the adaptation methods:
- `Generator.forward(..., return_feats=True)` also returns the post-activation output of every styled conv,
  in forward order (`num_layers` maps: 13 at 256 px), the features CDC, RSSA and their successors compare.
- `Discriminator.feature_maps(x, stop_after=k)` returns the intermediate maps in CDC's order (FromRGB, then
  conv1 and conv2 of every ResBlock, then final_conv) and stops right after map k, so a patch head on an early
  map does not pay for the blocks after it.
- `channel_cap`: narrows every layer to at most that many channels while keeping module names and structure
  (tiny models for tests and demos). `None` gives exactly rosinality's architecture.

Reading and writing checkpoint files (rosinality .pt, NVIDIA and TensorFlow network pickles, `convert`, `info`)
is checkpoints.py's job; this file holds only the networks.

Modulated convolution comes in two mathematically identical forms (see `ModulatedConv2d`): per-sample
("grouped") weights, as rosinality computes it, and one shared convolution with the style applied to the
activations ("shared"), which never builds a per-sample weight tensor. `form="auto"` picks the faster one.
"""

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)

# ------------------------------------------------------------------------------------------------
# Ops: FIR filtering (upfirdn2d) and bias + leaky ReLU


def make_kernel(k):
    """2-D FIR kernel from a 1-D (outer product) or 2-D list, normalised to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _as_separable(kernel):
    """(kx, ky) with kernel == ky[:, None] * kx[None, :] if the 2-D kernel has rank 1, else None."""
    if kernel.ndim != 2:
        return None
    ky = kernel.sum(1)  # [kh]
    kx = kernel.sum(0) / kernel.sum()  # [kw]
    if torch.allclose(ky[:, None] * kx[None, :], kernel, rtol=1e-6, atol=1e-8):
        return kx, ky
    return None


class _ConstantWeightConv2d(torch.autograd.Function):
    """F.conv2d whose weight (and bias) record no gradient: only the weight is saved for backward, since the input
    is needed only for the weight's gradient. The input's gradient is the same call autograd makes
    (convolution_backward, input only), so it is bit for bit autograd's, and it is differentiable again (path
    length through the generator's FIR filters)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, groups):
        ctx.save_for_backward(weight)
        ctx.conv = (input.shape, stride, padding, groups)
        return F.conv2d(input, weight, bias, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, groups = ctx.conv
        weight = weight.to(grad.dtype)  # under bfloat16 autocast (--precision bf16) the forward convolved in bfloat16
        return torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, 1, groups), None, None, None, None, None


def conv2d(input, weight, bias=None, stride=1, padding=0, groups=1):
    """F.conv2d, keeping less for backward where weight and bias are constant (FIR filters, a frozen
    discriminator in the generator step): then autograd would save the input only to never use it."""
    if torch.is_grad_enabled() and input.requires_grad and not weight.requires_grad and (bias is None or not bias.requires_grad):
        return _ConstantWeightConv2d.apply(input, weight, bias, stride, padding, groups)
    return F.conv2d(input, weight, bias, stride, padding, 1, groups)


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample, pad, FIR-filter and downsample, independently per channel (rosinality's `upfirdn2d`).

    input: [B, C, H, W]; kernel: [kh, kw]; up / down: int or (x, y); pad: (p0, p1) for both axes or
    (x0, x1, y0, y1). Output: [B, C, (H*up_y + py0 + py1 - kh) // down_y + 1, (same for W)]. Steps:
      1. upsample by zero insertion: up-1 zeros after every sample,
      2. pad with zeros (a negative pad crops),
      3. true convolution with `kernel` (i.e. correlation with the flipped kernel), "valid" mode,
      4. keep every `down`-th sample, starting at index 0.
    A rank-1 kernel (all StyleGAN2 kernels) is applied as two 1-D passes; results equal the 2-D pass.
    """
    up_x, up_y = _pair(up)
    down_x, down_y = _pair(down)
    pad = tuple(pad)
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    pad_x0, pad_x1, pad_y0, pad_y1 = pad
    batch, channel, in_h, in_w = input.shape

    out = input
    # 1. zero insertion: [B, C, H, 1, W, 1] padded to [B, C, H, up_y, W, up_x] then flattened
    if up_x > 1 or up_y > 1:
        out = out.reshape(batch, channel, in_h, 1, in_w, 1)
        out = F.pad(out, [0, up_x - 1, 0, 0, 0, up_y - 1])
        out = out.reshape(batch, channel, in_h * up_y, in_w * up_x)  # [B, C, H*up, W*up]
    # 2. pad (positive) and crop (negative)
    out = F.pad(out, [max(pad_x0, 0), max(pad_x1, 0), max(pad_y0, 0), max(pad_y1, 0)])
    out = out[
        :,
        :,
        max(-pad_y0, 0) : out.shape[2] - max(-pad_y1, 0),
        max(-pad_x0, 0) : out.shape[3] - max(-pad_x1, 0),
    ]
    # 3.+4. depthwise convolution with the flipped kernel, stride = down
    kernel = kernel.to(out.dtype)
    separable = _as_separable(kernel)
    if separable is not None:
        kx, ky = separable
        wx = torch.flip(kx, [0]).view(1, 1, 1, -1).expand(channel, 1, 1, -1)  # [C, 1, 1, kw]
        wy = torch.flip(ky, [0]).view(1, 1, -1, 1).expand(channel, 1, -1, 1)  # [C, 1, kh, 1]
        out = conv2d(out, wx, stride=(1, down_x), groups=channel)
        out = conv2d(out, wy, stride=(down_y, 1), groups=channel)
    else:
        w = torch.flip(kernel, [0, 1])[None, None].expand(channel, 1, -1, -1)  # [C, 1, kh, kw]
        out = conv2d(out, w, stride=(down_y, down_x), groups=channel)
    return out


class _BiasLeakyReLU(torch.autograd.Function):
    """scale * leaky_relu(input + bias), computed by the same ops as autograd would, but saving only its output
    for backward (which the next layer saves anyway: no extra memory) instead of the pre-activation input + bias
    (a whole activation map per layer). The gradient is the same ops in the same order as autograd's
    (grad * scale, then * negative_slope where the output is not positive), written with differentiable ops so
    that double backward (R1, path length) works; leaky ReLU's second derivative is zero, as autograd's."""

    @staticmethod
    def forward(ctx, input, bias, negative_slope, scale):
        x = input if bias is None else input + bias.view([1, bias.shape[0]] + [1] * (input.ndim - 2))
        out = F.leaky_relu(x, negative_slope) * scale
        ctx.save_for_backward(out)
        ctx.negative_slope, ctx.scale, ctx.has_bias = negative_slope, scale, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad = grad * ctx.scale
        # leaky ReLU's derivative: 1 where the input was positive (exactly where the output is), else the slope
        grad_input = torch.where(out > 0, grad, grad * ctx.negative_slope)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_input.sum_to_size([1, out.shape[1]] + [1] * (out.ndim - 2)).flatten()
        return grad_input, grad_bias, None, None


def fused_leaky_relu(input, bias=None, negative_slope=0.2, scale=SQRT2):
    """scale * leaky_relu(input + bias), bias broadcast over dim 1 (rosinality's `fused_leaky_relu`); saves only its
    output for backward (_BiasLeakyReLU)."""
    return _BiasLeakyReLU.apply(input, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    """scale * leaky_relu(x + bias), then clamped to [-clamp, clamp] when clamp is set (NVIDIA's conv_clamp)."""

    def __init__(self, channel, bias=True, negative_slope=0.2, scale=SQRT2, clamp=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale
        self.clamp = clamp

    def forward(self, input):
        out = fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)
        if self.clamp is not None:
            out = out.clamp(-self.clamp, self.clamp)
        return out


class Upsample(nn.Module):
    """2x upsampling with a FIR kernel (H -> 2H)."""

    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, input):
        return upfirdn2d(input, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter with padding (before a strided conv, or after a transposed one)."""

    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        kernel = make_kernel(kernel)
        if upsample_factor > 1:
            kernel = kernel * upsample_factor**2
        self.register_buffer("kernel", kernel)
        self.pad = pad

    def forward(self, input):
        return upfirdn2d(input, self.kernel, pad=self.pad)


# ------------------------------------------------------------------------------------------------
# Equalised-learning-rate layers


class PixelNorm(nn.Module):
    def forward(self, input):
        # x / sqrt(mean_c x^2 + 1e-8)
        return input * torch.rsqrt(torch.mean(input**2, dim=1, keepdim=True) + 1e-8)


class EqualConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, input):
        return conv2d(input, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True, bias_init=0, lr_mul=1, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, input):
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(input, self.weight * self.scale), bias)
        return F.linear(input, self.weight * self.scale, bias)


# ------------------------------------------------------------------------------------------------
# Generator blocks


class ModulatedConv2d(nn.Module):
    """Modulated convolution with optional demodulation and 2x upsampling.

    With s = modulation(w) [B, I] and the equalised weight W [O, I, k, k] (times 1/sqrt(I k^2)):
      W'_{b,o,i,...} = W_{o,i,...} * s_{b,i}
      d_{b,o} = 1 / sqrt(sum_{i,kh,kw} W'^2_{b,o,i,kh,kw} + 1e-8)        (if demodulate, else 1)
      out_b = conv(x_b, W'_b * d_b)
    Two forms compute this:
      "grouped": build W'_b d_b per sample and run one grouped conv (groups = B), as rosinality does;
      "shared":  out_b = d_b * conv(x_b * s_b, W), one ordinary conv shared by the batch; d comes from
                 d_{b,o}^{-2} = sum_i s_{b,i}^2 sum_{kh,kw} W_{o,i,kh,kw}^2 + 1e-8, a [B, I] x [I, O] product.
    Both are equal within float error; `form="auto"` uses "shared" whenever gradients are recorded or the
    batch has more than one sample (faster on CPU and GPU in `bench.py`), "grouped" otherwise.
    """

    def __init__(
        self,
        in_channel,
        out_channel,
        kernel_size,
        style_dim,
        demodulate=True,
        upsample=False,
        downsample=False,
        blur_kernel=(1, 3, 3, 1),
        form="auto",
    ):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample
        self.form = form
        factor = 2
        if upsample:
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def __repr__(self):
        return (
            f"{self.__class__.__name__}({self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"upsample={self.upsample}, downsample={self.downsample})"
        )

    def pick_form(self, batch):
        if self.form != "auto":
            return self.form
        return "shared" if (torch.is_grad_enabled() or batch > 1) else "grouped"

    def forward(self, input, style):
        batch, in_channel, height, width = input.shape
        style = self.modulation(style)  # s: [B, I]
        weight = self.scale * self.weight[0]  # W: [O, I, k, k]
        if self.pick_form(batch) == "shared":
            return self._forward_shared(input, style, weight)
        return self._forward_grouped(input, style, weight)

    def _forward_grouped(self, input, style, weight):
        batch, in_channel, height, width = input.shape
        # W'_{b,o,i} = W_{o,i} s_{b,i}
        weight = weight[None] * style[:, None, :, None, None]  # [B, O, I, k, k]
        if self.demodulate:
            # d_{b,o} = rsqrt(sum_{i,kh,kw} W'^2 + eps)
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)  # [B, O]
            weight = weight * demod[:, :, None, None, None]
        k = self.kernel_size
        input = input.reshape(1, batch * in_channel, height, width)  # [1, B*I, H, W]
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * in_channel, self.out_channel, k, k)  # [B*I, O, k, k]
            out = F.conv_transpose2d(input, weight, padding=0, stride=2, groups=batch)
            out = out.reshape(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)  # [B, O, 2H, 2W]
        weight = weight.reshape(batch * self.out_channel, in_channel, k, k)  # [B*O, I, k, k]
        if self.downsample:
            out = F.conv2d(self.blur(input), weight, padding=0, stride=2, groups=batch)
        else:
            out = F.conv2d(input, weight, padding=self.padding, groups=batch)
        return out.reshape(batch, self.out_channel, out.shape[2], out.shape[3])  # [B, O, H', W']

    def _forward_shared(self, input, style, weight):
        # x_b * s_b, then one convolution with the shared W
        input = input * style[:, :, None, None]  # [B, I, H, W]
        if self.upsample:
            out = F.conv_transpose2d(input, weight.transpose(0, 1), padding=0, stride=2)
            out = self.blur(out)  # [B, O, 2H, 2W]
        elif self.downsample:
            out = F.conv2d(self.blur(input), weight, padding=0, stride=2)
        else:
            out = F.conv2d(input, weight, padding=self.padding)  # [B, O, H, W]
        if self.demodulate:
            # d_{b,o} = rsqrt(sum_i s_{b,i}^2 sum_{kh,kw} W_{o,i,kh,kw}^2 + eps)
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum([2, 3]).t() + self.eps)  # [B, O]
            out = out * demod[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise=None):
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        # x + lambda * noise, noise ~ N(0, 1) per pixel, shared by channels
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, input):
        return self.input.repeat(input.shape[0], 1, 1, 1)  # [B, C, 4, 4]


class StyledConv(nn.Module):
    def __init__(
        self, in_channel, out_channel, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1), demodulate=True, clamp=None
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channel, out_channel, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel, demodulate=demodulate
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel, clamp=clamp)

    def forward(self, input, style, noise=None):
        out = self.conv(input, style)
        out = self.noise(out, noise=noise)
        return self.activate(out)


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1), clamp=None):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.clamp = clamp

    def forward(self, input, style, skip=None):
        out = self.conv(input, style) + self.bias  # [B, 3, H, W]
        if self.clamp is not None:
            out = out.clamp(-self.clamp, self.clamp)  # NVIDIA clamps this layer's output, not the sum below
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def channel_table(channel_multiplier=2, channel_cap=None):
    """Channels per resolution, as in rosinality (and official StyleGAN2 config-f), optionally capped."""
    table = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
    }
    if channel_cap is not None:
        table = {res: min(ch, channel_cap) for res, ch in table.items()}
    return table


def _log2_size(size):
    log_size = int(math.log2(size)) if size > 0 else 0
    if size < 8 or 2**log_size != size or size > 1024:
        raise ValueError(f"size must be a power of two between 8 and 1024, got {size}")
    return log_size


class Generator(nn.Module):
    def __init__(
        self,
        size,
        style_dim=512,
        n_mlp=8,
        channel_multiplier=2,
        blur_kernel=[1, 3, 3, 1],
        lr_mlp=0.01,
        channel_cap=None,
        conv_clamp=None,
    ):
        """conv_clamp: clamp every styled conv's and ToRGB's output to [-conv_clamp, conv_clamp], as NVIDIA's
        networks do when trained with fp16 (None: no clamp, rosinality's behaviour)."""
        super().__init__()
        self.size = size
        self.style_dim = style_dim
        self.n_mlp = n_mlp
        self.channel_multiplier = channel_multiplier
        self.channel_cap = channel_cap
        self.lr_mlp = lr_mlp
        self.conv_clamp = conv_clamp

        layers = [PixelNorm()]
        for _ in range(n_mlp):
            layers.append(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu"))
        self.style = nn.Sequential(*layers)

        self.channels = channel_table(channel_multiplier, channel_cap)
        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel, clamp=conv_clamp)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False, clamp=conv_clamp)

        self.log_size = _log2_size(size)
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()

        in_channel = self.channels[4]
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(
                StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel, clamp=conv_clamp)
            )
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel, clamp=conv_clamp))
            self.to_rgbs.append(ToRGB(out_channel, style_dim, clamp=conv_clamp))
            in_channel = out_channel

        self.n_latent = self.log_size * 2 - 2

    def make_noise(self):
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            for _ in range(2):
                noises.append(torch.randn(1, 1, 2**i, 2**i, device=device))
        return noises

    def mean_latent(self, n_latent):
        latent_in = torch.randn(n_latent, self.style_dim, device=self.input.input.device)
        return self.style(latent_in).mean(0, keepdim=True)  # [1, style_dim]

    def get_latent(self, input):
        return self.style(input)

    def set_modconv_form(self, form):
        """'auto', 'grouped' or 'shared' for every modulated convolution (see ModulatedConv2d)."""
        if form not in ("auto", "grouped", "shared"):
            raise ValueError(f"unknown modulated-conv form {form!r}")
        for module in self.modules():
            if isinstance(module, ModulatedConv2d):
                module.form = form

    def forward(
        self,
        styles,
        return_latents=False,
        inject_index=None,
        truncation=1,
        truncation_latent=None,
        input_is_latent=False,
        noise=None,
        randomize_noise=True,
        return_feats=False,
        feats_upto=None,
    ):
        """styles: list of z (or w with input_is_latent) [B, style_dim], or one W+ code [B, n_latent, style_dim].

        Returns (image [B, 3, size, size], latent [B, n_latent, style_dim] or None); with return_feats=True
        (image, feats) where feats are the num_layers styled-conv outputs in forward order; with both,
        (image, latent, feats). feats_upto=k stops right after feats[k] and returns (None, feats[:k+1]):
        the layers after it and the image are not computed (and draw no noise).
        """
        if feats_upto is not None and not 0 <= feats_upto < self.num_layers:
            raise ValueError(f"feats_upto must be in [0, {self.num_layers - 1}], got {feats_upto}")
        if not input_is_latent:
            styles = [self.style(s) for s in styles]

        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

        if truncation < 1:
            # w' = w_avg + psi (w - w_avg)
            styles = [truncation_latent + truncation * (style - truncation_latent) for style in styles]

        if len(styles) < 2:
            inject_index = self.n_latent
            if styles[0].ndim < 3:
                latent = styles[0].unsqueeze(1).repeat(1, inject_index, 1)  # [B, n_latent, style_dim]
            else:
                latent = styles[0]
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            latent2 = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
            latent = torch.cat([latent, latent2], 1)  # [B, n_latent, style_dim]

        feats = []
        out = self.input(latent)  # [B, C4, 4, 4]
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        feats.append(out)
        if feats_upto is not None and feats_upto < 1:
            return None, feats
        skip = self.to_rgb1(out, latent[:, 1])  # [B, 3, 4, 4]

        i = 1
        for conv_up, conv, noise1, noise2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = conv_up(out, latent[:, i], noise=noise1)  # [B, C, 2H, 2W]
            feats.append(out)
            if feats_upto is not None and len(feats) > feats_upto:
                return None, feats
            out = conv(out, latent[:, i + 1], noise=noise2)
            feats.append(out)
            if feats_upto is not None and len(feats) > feats_upto:
                return None, feats
            skip = to_rgb(out, latent[:, i + 2], skip)  # [B, 3, 2H, 2W]
            i += 2

        image = skip
        if return_feats and return_latents:
            return image, latent, feats
        if return_feats:
            return image, feats
        if return_latents:
            return image, latent
        return image, None


# ------------------------------------------------------------------------------------------------
# Discriminator


class ConvLayer(nn.Sequential):
    def __init__(
        self, in_channel, out_channel, kernel_size, downsample=False, blur_kernel=(1, 3, 3, 1), bias=True, activate=True, clamp=None
    ):
        layers = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(
            EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride, bias=bias and not activate)
        )
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias, clamp=clamp))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_channel, out_channel, blur_kernel=(1, 3, 3, 1), clamp=None):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel, clamp=clamp)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel, clamp=clamp)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False)

    def forward(self, input):
        out = self.conv2(self.conv1(input))
        # (residual + skip) / sqrt(2)
        return (out + self.skip(input)) / SQRT2


class Discriminator(nn.Module):
    def __init__(self, size, channel_multiplier=2, blur_kernel=[1, 3, 3, 1], channel_cap=None, conv_clamp=None, stddev_group=4):
        """conv_clamp: clamp the output of every activated conv (FromRGB, conv1, conv2, final_conv) to
        [-conv_clamp, conv_clamp] as NVIDIA's fp16 networks do (None: rosinality). stddev_group: minibatch-stddev
        group size (4 in rosinality; None pools the whole batch)."""
        super().__init__()
        self.size = size
        self.channel_multiplier = channel_multiplier
        self.channel_cap = channel_cap
        self.conv_clamp = conv_clamp
        self.channels = channel_table(channel_multiplier, channel_cap)
        channels = self.channels

        convs = [ConvLayer(3, channels[size], 1, clamp=conv_clamp)]
        log_size = _log2_size(size)
        in_channel = channels[size]
        for i in range(log_size, 2, -1):
            out_channel = channels[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, blur_kernel, clamp=conv_clamp))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)

        self.stddev_group = stddev_group
        self.stddev_feat = 1
        # None: the stddev groups are formed over the batch D is given. Under torchrun, runtime.distribute_discriminator
        # sets a function x -> (the global batch gathered over the processes, this process's rows of it)
        self.batch_gather = None
        self.final_conv = ConvLayer(in_channel + 1, channels[4], 3, clamp=conv_clamp)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, channels[4], activation="fused_lrelu"),
            EqualLinear(channels[4], 1),
        )

    @property
    def n_feature_maps(self):
        """FromRGB + (conv1, conv2) per ResBlock + final_conv: 14 at 256 px."""
        return 2 * len(self.convs)

    def feature_map_shapes(self):
        """[(channels, resolution)] of the maps `feature_maps` returns, in the same order."""
        shapes = [(self.channels[self.size], self.size)]
        res = self.size
        for block in list(self.convs)[1:]:
            shapes.append((block.conv1[-2].weight.shape[0], res))
            res //= 2
            shapes.append((block.conv2[-2].weight.shape[0], res))
        shapes.append((self.channels[4], 4))
        return shapes

    def minibatch_stddev(self, out):
        pooled, rows = (out, None) if self.batch_gather is None else self.batch_gather(out)
        batch, channel, height, width = pooled.shape
        group = batch if self.stddev_group is None else min(batch, self.stddev_group)
        if batch % group:
            raise ValueError(f"discriminator batch {batch} is not divisible by its stddev group {group}")
        # sample b is pooled with the samples having the same b mod (B / group)
        stddev = pooled.view(group, -1, self.stddev_feat, channel // self.stddev_feat, height, width)
        # sigma = sqrt(Var_group + 1e-8), averaged over (C, H, W)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)  # [B/group, F, C/F, H, W]
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)  # [B/group, F, 1, 1]
        stddev = stddev.repeat(group, 1, height, width)  # [B, F, H, W]
        if rows is not None:
            stddev = stddev[rows]  # [B/N, F, H, W], this process's rows of the global batch
        return torch.cat([out, stddev], 1)

    def forward(self, input, return_feats=False):
        """Logits [B, 1]; with return_feats=True, (logits, the n_feature_maps maps of `feature_maps`)."""
        if return_feats:
            feats, logits = self._trunk(input, None)
            return logits, feats
        out = self.convs(input)  # [B, C4, 4, 4]
        out = self.minibatch_stddev(out)  # [B, C4 + 1, 4, 4]
        out = self.final_conv(out)  # [B, C4, 4, 4]
        return self.final_linear(out.flatten(1))  # [B, 1]

    def feature_maps(self, input, stop_after=None):
        """Intermediate maps in CDC's order: FromRGB, conv1 and conv2 of every ResBlock, final_conv.

        stop_after: index of the last map to compute (None: all); nothing after it is evaluated, not even the
        skip branch of the block it ends in.
        """
        feats, _ = self._trunk(input, stop_after)
        return feats

    def _trunk(self, input, stop_after):
        last = self.n_feature_maps - 1 if stop_after is None else stop_after
        if not 0 <= last < self.n_feature_maps:
            raise ValueError(f"stop_after must be in [0, {self.n_feature_maps - 1}], got {stop_after}")
        blocks = list(self.convs)
        out = blocks[0](input)  # [B, C_size, size, size]
        feats = [out]
        for block in blocks[1:]:
            if len(feats) > last:
                return feats, None
            hidden = block.conv1(out)  # [B, C_in, H, W]
            feats.append(hidden)
            if len(feats) > last:
                return feats, None
            hidden = block.conv2(hidden)  # [B, C_out, H/2, W/2]
            feats.append(hidden)
            if len(feats) > last:
                return feats, None
            out = (hidden + block.skip(out)) / SQRT2
        out = self.minibatch_stddev(out)  # [B, C4 + 1, 4, 4]
        out = self.final_conv(out)  # [B, C4, 4, 4]
        feats.append(out)
        return feats, self.final_linear(out.flatten(1))  # [B, 1]
