"""The decoder rewritten for serving: the same function from the same weights, computed
channels-last, with a matrix product where the training module's transposed convolution runs
far below the core's rate.

Why (docs/performance.md has the layer-by-layer table): a ConvTranspose2d(k=4, stride=2,
padding=1) with few output channels is slow in oneDNN (the last layer, 32 channels to 1, took
as long as the 512 -> 3136 linear layer for a fiftieth of its work). The same map is one matrix
product of every input pixel's channels with all sixteen taps,

    cols[b, i, j, (sy, py, sx, px), c] = sum_k x[b, i, j, k] W[k, c, 2 sy + py, 2 sx + px]

followed by four shifted adds: tap (ky, kx) of input pixel (i, j) lands on output pixel
(2 i - 1 + ky, 2 j - 1 + kx), so the taps with the same (sy, sx) form one [2H, 2W] picture
shifted by (2 sy, 2 sx). Exactly the multiply-adds of the original (a sub-pixel 3x3
convolution does 2.25 times as many). With many output channels (64 -> 32) oneDNN's own kernel
is at its rate and beat this form, provided it is fed channels-last memory: so that layer stays
a transposed convolution, on a channels-last view. Activations stay [B, H, W, C] throughout,
and the linear layer before the first convolution writes its outputs in (h, w, c) order, so
nothing is transposed at run time. The results differ from the training module's only in
rounding (a few 1e-7 per pixel on real digits; trainer.export checks 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model import Decoder, ResBlock

# A transposed convolution with fewer output channels than this becomes a GEMM: oneDNN's kernels
# run those far below the core's rate (32 -> 1: 50 µs per row for 0.2 MFLOP), while with many
# output channels (64 -> 32) the library's own kernel on channels-last data beat the GEMM form
# (docs/performance.md has both hosts' tables).
GEMM_BELOW_CHANNELS = 8


class ImageLinear(nn.Module):
    """Linear(in, C*H*W) whose outputs are laid out [B, H, W, C] (the training module's are
    [B, C, H, W] after its Unflatten): the same numbers, its rows permuted once here."""

    def __init__(self, linear: nn.Linear, shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = shape
        weight = linear.weight.detach().view(c, h, w, -1).permute(1, 2, 0, 3).reshape(c * h * w, -1)
        bias = linear.bias.detach().view(c, h, w).permute(1, 2, 0).reshape(-1)
        # addmm(bias, x, weight_t): the product x W^T with W^T stored contiguous, as Linear computes it
        self.register_buffer("weight_t", weight.t().contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.h, self.w, self.c = h, w, c

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight_t).view(-1, self.h, self.w, self.c)


class ConvTransposeGemm(nn.Module):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) on channels-last input: one GEMM of the
    input pixels with the sixteen taps, then four shifted adds into the output (module doc)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if conv.kernel_size != (4, 4) or conv.stride != (2, 2) or conv.padding != (1, 1):
            raise ValueError(f"only kernel 4, stride 2, padding 1 is rewritten, not {conv}")
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.output_padding != (0, 0):
            raise ValueError(f"groups, dilation and output padding are not rewritten: {conv}")
        cin, cout = conv.weight.shape[:2]
        # [cin, cout, ky, kx] -> [cin, (ky, kx, cout)] with ky = 2 sy + py, kx = 2 sx + px
        taps = conv.weight.detach().permute(0, 2, 3, 1).reshape(cin, 16 * cout)
        self.register_buffer("taps", taps.contiguous())
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(cout)
        self.register_buffer("bias", bias.contiguous())
        self.cout = cout

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, cin = x.shape
        c = self.cout
        cols = torch.mm(x.reshape(-1, cin), self.taps).view(b, h, w, 2, 2, 2, 2, c)
        # The output with a one-pixel border (the transposed convolution's padding), bias first,
        # seen as [B, H + 1, 2, W + 1, 2, C]: row 2 (i + sy) + py is (i + sy, py), so the taps
        # (sy, *, sx, *) of every input pixel land in one strided slice, added without a copy.
        out = self.bias.expand(b, 2 * h + 2, 2 * w + 2, c).contiguous()
        grid = out.view(b, h + 1, 2, w + 1, 2, c)
        for sy in range(2):
            for sx in range(2):
                grid[:, sy : sy + h, :, sx : sx + w] += cols[:, :, :, sy, :, sx].permute(0, 1, 3, 2, 4, 5)
        return out[:, 1:-1, 1:-1]


class ChannelsFirstView(nn.Module):
    """A layer of the training module run as it was, on a [B, C, H, W] view of the
    channels-last activations (channels-last memory, no copy either side): a transposed
    convolution with many output channels, which oneDNN runs near its rate on that memory,
    or a residual block, which the serving form does not rewrite."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


class FastDecoder(nn.Module):
    """decoder(z) -> Bernoulli logits [B, C, H, W], the training Decoder's function."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        spatial = False  # whether the activations are images yet ([B, H, W, C])
        modules = list(decoder.net)
        for i, layer in enumerate(modules):
            following = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(layer, nn.Linear) and isinstance(following, nn.Unflatten):
                layers.append(ImageLinear(layer, tuple(following.unflattened_size)))  # type: ignore[arg-type]
            elif isinstance(layer, nn.Unflatten):
                spatial = True  # ImageLinear already shaped its output
            elif isinstance(layer, nn.ConvTranspose2d) and layer.out_channels < GEMM_BELOW_CHANNELS:
                layers.append(ConvTransposeGemm(layer))
            elif isinstance(layer, nn.ConvTranspose2d | ResBlock):
                layers.append(ChannelsFirstView(layer))
            elif isinstance(layer, nn.SiLU):
                layers.append(SiLU())
            elif isinstance(layer, nn.Linear) and not spatial:
                layers.append(layer)
            else:
                raise ValueError(f"the fast decoder does not know how to rewrite {layer}")
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        x = self.net(z)
        # [B, H, W, C] -> [B, C, H, W]: a view when C is 1 (grayscale), as for MNIST
        return x.permute(0, 3, 1, 2).contiguous()
