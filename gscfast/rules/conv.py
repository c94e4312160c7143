"""Convolutions and pooling over feature maps (``[C, L]`` samples for the 1-d modules, ``[C, H,
W]`` for the 2-d ones), BackPACK-style: each rule's VJP is the transposed operation torch's own
backward runs (``convolution_backward``, ``avg_pool2d_backward``, the max-pool index scatter), so
the chain engine pushes stacks of cotangent rows through them as batches of feature maps.

The 1-d modules run as their 2-d forms on ``[N, C, 1, L]`` (a kernel ``1 x k``), which is how
torch computes them too; one code path serves both. The rules take and give flat feature maps
channels-last (``rules.base``): their 2-d views are ``channels_last`` tensors, on which oneDNN's
convolution and pooling kernels run without reordering (the input-gradient convolutions of W7,
``bench/``, 2-3x faster than on C-ordered maps). Output shapes are found by running the
operation on a meta tensor, so every option (``ceil_mode``, ``padding="same"``, ...) gives
torch's shape and torch's error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NumericalError
from .base import ForwardCtx, Rule, Shape, numel, register

_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


class SpatialRule(Rule):
    """A rule over feature maps of ``nd`` spatial dimensions (1 or 2), computed in 2-d."""

    keeps_shape = False
    layout = "cl"
    nd: int = 2

    def sample_ndim(self) -> int:
        return self.nd + 1

    def shape_2d(self, shape: Shape) -> tuple[int, int, int]:
        """A sample's ``[C, H, W]`` in 2-d form (``H = 1`` for a 1-d map ``[C, L]``)."""
        return (shape[0], shape[1], shape[2]) if self.nd == 2 else (shape[0], 1, shape[1])

    def as_2d(self, t: Tensor, shape: Shape) -> Tensor:
        """Flat channels-last ``[..., prod(spatial) * C]`` -> ``[N, C, H, W]`` (a
        ``channels_last`` view)."""
        C, H, W = self.shape_2d(shape)
        return t.reshape(-1, H, W, C).permute(0, 3, 1, 2)

    @staticmethod
    def flat(t: Tensor, *lead: int) -> Tensor:
        """``[N, C, H, W]`` -> flat channels-last ``[*lead, H * W * C]`` (a view of a
        ``channels_last`` tensor)."""
        return t.permute(0, 2, 3, 1).reshape(*lead, -1)

    def input_2d(self, g: Tensor) -> tuple[int, int, int, int]:
        """The input's 2-d shape ``(N, C, H, W)`` for the batch of ``g``."""
        assert self.shape_in is not None  # bound before use (Program.bind)
        return (g.shape[0], *self.shape_2d(self.shape_in))

    def like_input(self, g: Tensor, shape: tuple[int, int, int, int] | None = None) -> Tensor:
        """An uninitialized ``channels_last`` tensor of the input's 2-d shape (or ``shape``) for
        the batch of ``g``, for backward ops that read only its shape and memory format (the
        format of their result; its pages are never touched)."""
        return torch.empty(
            shape or self.input_2d(g),
            dtype=g.dtype,
            device=g.device,
            memory_format=torch.channels_last,
        )

    def pair(self, v: Any, fill: int) -> tuple[int, int]:
        """A 1-d or 2-d module's ``int``/tuple option as its 2-d form (``fill`` on the extra H)."""
        t = tuple(v) if isinstance(v, (tuple, list)) else (v,) * self.nd
        return (fill, t[0]) if self.nd == 1 else (t[0], t[1])

    def run(self, x: Tensor) -> Tensor:
        """The operation on a batch ``[N, C, H, W]``."""
        raise NotImplementedError

    def backward(self, g: Tensor) -> Tensor:
        """``v J`` for a linear operation: ``g [N, C', H', W']`` -> ``[N, C, H, W]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        assert self.shape_in is not None  # bound before use (Program.bind)
        D, b, _ = x.shape
        return self.flat(self.run(self.as_2d(x, self.shape_in)), D, b), None

    def vjp(self, v: Tensor, saved: Any) -> Tensor:
        assert self.shape_out is not None  # bound before use (Program.bind)
        return self.flat(self.backward(self.as_2d(v, self.shape_out)), *v.shape[:-1])

    def out_shape(self, shape: Shape) -> Shape:
        C = self.channels()
        if len(shape) != self.nd + 1 or (C is not None and shape[0] != C):
            dims = (
                ["C" if C is None else C, "L"]
                if self.nd == 1
                else ["C" if C is None else C, "H", "W"]
            )
            raise self._refuse_shape(shape, "feature maps " + str(dims).replace("'", ""))
        meta = torch.empty(1, *shape, device="meta")
        try:
            y = self.run(self.as_2d(meta, shape))
        except RuntimeError as e:
            raise ValueError(
                f"{self.path} ({type(self.module).__name__}) does not take samples of shape "
                f"{list(shape)}: {e}"
            ) from e
        return tuple(y.shape[1:]) if self.nd == 2 else (y.shape[1], y.shape[3])

    def channels(self) -> int | None:
        """The number of input channels the module needs, or None for any."""
        return None


@register
class ConvRule(SpatialRule):
    """``nn.Conv1d`` and ``nn.Conv2d``, every option (stride, padding including ``"same"`` and
    the padding modes, dilation, groups, bias). ``J`` is the convolution's own linear map, so
    ``v J`` is the transposed convolution (``convolution_backward`` for the input); a padding
    mode other than zeros is an explicit pad whose VJP autograd takes (a fold of the border)."""

    module_types = (nn.Conv1d, nn.Conv2d)
    kind = "conv"

    def __init__(self, module: nn.Conv1d | nn.Conv2d, path: str) -> None:
        super().__init__(module, path)
        self.nd = 1 if isinstance(module, nn.Conv1d) else 2
        w = module.weight.detach()
        self.weight = w.unsqueeze(2) if self.nd == 1 else w  # [out, in / groups, kH, kW]
        self.bias: Tensor | None = None if module.bias is None else module.bias.detach()
        self.stride = self.pair(module.stride, 1)
        self.dilation = self.pair(module.dilation, 1)
        self.groups = module.groups
        k = self.pair(module.kernel_size, 1)
        if isinstance(module.padding, str):  # "valid" or "same" (torch's split: extra on the right)
            tot = (
                [0, 0]
                if module.padding == "valid"
                else [d * (n - 1) for d, n in zip(self.dilation, k)]
            )
            self.pads = [(t // 2, t - t // 2) for t in tot]
        else:
            p = self.pair(module.padding, 0)
            self.pads = [(p[0], p[0]), (p[1], p[1])]
        self.mode = _PAD_MODES[module.padding_mode]
        # zeros on both sides alike: the convolution pads itself; else an explicit F.pad
        self.inner = self.mode == "constant" and all(a == b for a, b in self.pads)
        self.f_pad = [n for a, b in reversed(self.pads) for n in (a, b)]  # F.pad: last dim first

    def channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def run(self, x: Tensor) -> Tensor:
        w = (
            self.weight
            if x.device.type != "meta"
            else torch.empty(self.weight.shape, device="meta")
        )
        b = None if self.bias is None or x.device.type == "meta" else self.bias
        if self.inner:
            return F.conv2d(
                x, w, b, self.stride, [a for a, _ in self.pads], self.dilation, self.groups
            )
        x = F.pad(x, self.f_pad, mode=self.mode)
        return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)

    def backward(self, g: Tensor) -> Tensor:
        N, C, H, W = self.input_2d(g)
        pads = [a for a, _ in self.pads]
        if not self.inner:  # the gradient on the padded map, then the pad's VJP
            (t, b), (l, r) = self.pads
            H, W, pads = H + t + b, W + l + r, [0, 0]
        # read for its shape and format only; not an expanded scalar: with a stride-0 input
        # torch takes a slower kernel (2x here)
        gx = torch.ops.aten.convolution_backward(
            g,
            self.like_input(g, (N, C, H, W)),
            self.weight,
            None,
            self.stride,
            pads,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            (True, False, False),
        )[0]
        return gx if self.inner else self._pad_vjp(gx)

    def _pad_vjp(self, g: Tensor) -> Tensor:
        """``g`` on the padded map -> on the map: the VJP of ``F.pad`` (a linear map)."""
        if self.mode == "constant":  # zeros: the border is dropped
            (t, _), (l, _) = self.pads
            H, W = g.shape[2] - sum(self.pads[0]), g.shape[3] - sum(self.pads[1])
            return g[:, :, t : t + H, l : l + W]
        size = (
            g.shape[0],
            g.shape[1],
            g.shape[2] - sum(self.pads[0]),
            g.shape[3] - sum(self.pads[1]),
        )
        z = torch.zeros(size, dtype=g.dtype, device=g.device, requires_grad=True)
        with torch.enable_grad():
            (out,) = torch.autograd.grad(F.pad(z, self.f_pad, mode=self.mode), z, g)
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})


@register
class AvgPoolRule(SpatialRule):
    """``nn.AvgPool1d`` and ``nn.AvgPool2d``, every option; linear, so ``v J`` is torch's
    ``avg_pool2d_backward`` (which reads only the input's shape)."""

    module_types = (nn.AvgPool1d, nn.AvgPool2d)
    kind = "avg_pool"

    def __init__(self, module: nn.AvgPool1d | nn.AvgPool2d, path: str) -> None:
        super().__init__(module, path)
        self.nd = 1 if isinstance(module, nn.AvgPool1d) else 2
        self.k = self.pair(module.kernel_size, 1)
        self.s = self.pair(module.stride if module.stride else module.kernel_size, 1)
        self.p = self.pair(module.padding, 0)
        self.ceil, self.count_pad = bool(module.ceil_mode), bool(module.count_include_pad)
        self.divisor = getattr(module, "divisor_override", None)

    def run(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.k, self.s, self.p, self.ceil, self.count_pad, self.divisor)

    def backward(self, g: Tensor) -> Tensor:
        N, C, H, W = self.input_2d(g)
        (kh, kw), (Ho, Wo) = self.k, g.shape[2:]
        if self.s == self.k and self.p == (0, 0) and (H, W) == (Ho * kh, Wo * kw):
            # windows that tile the map: each entry gets its window's value / count, a broadcast
            # (about 1.7x faster than avg_pool2d_backward on W7's maps); channels-last throughout
            g = g.permute(0, 2, 3, 1) * (1 / (self.divisor or kh * kw))  # [N, Ho, Wo, C]
            g = g[:, :, None, :, None].expand(N, Ho, kh, Wo, kw, C).reshape(N, H, W, C)
            return g.permute(0, 3, 1, 2)
        return torch.ops.aten.avg_pool2d_backward(
            g, self.like_input(g), self.k, self.s, self.p, self.ceil, self.count_pad, self.divisor
        )


@register
class AdaptiveAvgPoolRule(SpatialRule):
    """``nn.AdaptiveAvgPool1d`` and ``nn.AdaptiveAvgPool2d``; linear, ``v J`` by torch's
    ``_adaptive_avg_pool2d_backward``."""

    module_types = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    kind = "adaptive_avg_pool"

    def __init__(self, module: nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d, path: str) -> None:
        super().__init__(module, path)
        self.nd = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
        out = module.output_size
        self.size = (
            (1, out[0] if isinstance(out, (tuple, list)) else out)
            if self.nd == 1
            else ((out, out) if not isinstance(out, (tuple, list)) else tuple(out))
        )

    def run(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.size)  # type: ignore[arg-type]  # (h, w), None kept

    def backward(self, g: Tensor) -> Tensor:
        return torch.ops.aten._adaptive_avg_pool2d_backward(
            g.contiguous(memory_format=torch.channels_last), self.like_input(g)
        )


@register
class MaxPoolRule(SpatialRule):
    """``nn.MaxPool1d`` and ``nn.MaxPool2d``, every option: ``J`` routes each output to the input
    entry torch's max picks (``return_indices``; the first of ties, as autograd routes it), so
    ``v J`` scatters ``v`` there, summing where windows overlap."""

    module_types = (nn.MaxPool1d, nn.MaxPool2d)
    kind = "max_pool"

    def __init__(self, module: nn.MaxPool1d | nn.MaxPool2d, path: str) -> None:
        super().__init__(module, path)
        if module.return_indices:
            raise TypeError(
                f"{path} ({module}) returns (values, indices), not a feature map; gscfast "
                "measures modules whose output is one tensor"
            )
        self.nd = 1 if isinstance(module, nn.MaxPool1d) else 2
        self.k = self.pair(module.kernel_size, 1)
        self.s = self.pair(module.stride if module.stride else module.kernel_size, 1)
        self.p = self.pair(module.padding, 0)
        self.dil = self.pair(module.dilation, 1)
        self.ceil = bool(module.ceil_mode)

    def run(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.k, self.s, self.p, self.dil, self.ceil)

    def forward(self, x: Tensor, ctx: ForwardCtx) -> tuple[Tensor, Any]:
        assert self.shape_in is not None  # bound before use (Program.bind)
        D, b, _ = x.shape
        h = self.as_2d(x, self.shape_in)
        y, idx = F.max_pool2d(h, self.k, self.s, self.p, self.dil, self.ceil, return_indices=True)
        C, HW = h.shape[1], h.shape[2] * h.shape[3]  # indices count within a channel's map
        if bool(((idx < 0) | (idx >= HW)).any()) or bool(torch.isneginf(y).any()):
            raise NumericalError(
                f"{self.path} ({type(self.module).__name__}) outputs -inf: a window lies entirely "
                "in its padding (torch gives -inf there, with a zero gradient), or its input holds "
                "-inf; use less padding or a larger input"
            )
        if not ctx.save:
            return self.flat(y, D, b), None
        # each output's input entry in the flat channels-last order: position * C + channel
        idx = idx * C + torch.arange(C, device=idx.device).reshape(1, C, 1, 1)
        return self.flat(y, D, b), ctx.rows(self.flat(idx, D, b))

    def vjp(self, v: Tensor, saved: Tensor) -> Tensor:
        assert self.shape_in is not None  # bound before use (Program.bind)
        shape = torch.broadcast_shapes(v.shape, saved.shape)
        d_in = numel(self.shape_in)
        out = v.new_zeros(*shape[:-1], d_in)
        return out.scatter_add_(-1, saved.expand(shape), v.expand(shape))


__all__ = ["AdaptiveAvgPoolRule", "AvgPoolRule", "ConvRule", "MaxPoolRule", "SpatialRule"]
