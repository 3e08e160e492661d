"""netdsl's Triton kernels as PyTorch operators with gradients: what `GraphModule(backend="triton")` runs.

Each operator is a `torch.library.custom_op` (namespace `netdsl`) whose forward is one of netdsl's kernels
(codegen/); its backward, registered with `register_autograd`, calls a second operator (`<name>_backward`)
that runs netdsl's backward kernel, so autograd, optimizers, DDP and `torch.compile` (which traces the
backward too, and sees each operator as one opaque call, its shapes given by `register_fake`) compose with
them as with any PyTorch op:

    conv2d          conv + bias + activation       backward: dgrad and wgrad (codegen/conv_backward.py)
    linear          fc + bias + activation          backward: codegen/fc_backward.py
    lrn_maxpool     [ReLU] + LRN + max-pooling      backward: a gather over the windows (lrn_pool_backward.py)
    batch_norm      batch statistics, running ones  backward: codegen/batchnorm_train.py
    dropout         a counter-based random stream   backward: the same mask regenerated (codegen/dropout.py)
    cross_entropy   the loss on logits              backward: its gradient, computed with the loss

PyTorch's advice for Triton kernels in training is `torch.library.triton_op`, which lets torch.compile see
into the kernel; that tracing cannot run under Triton's interpreter (this project's CPU path), so the
operators are opaque `custom_op`s: the same autograd and torch.compile contract, tested without a GPU.
A dropout's seed is drawn from torch's generator, so a checkpoint's random state replays its masks.
"""

from __future__ import annotations

import torch

from netdsl.codegen import (
    batchnorm_train,
    conv,
    conv_backward,
    elementwise,
    elementwise_backward,
    fc,
    fc_backward,
    lrn_pool_backward,
    pool,
    pool_backward,
)
from netdsl.codegen import cross_entropy as ce
from netdsl.codegen import dropout as dropout_kernels
from netdsl.codegen.windows import four_pads, output_length
from netdsl.ir.ops import layer_pads

Tensor = torch.Tensor


# --- conv + bias + activation ------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::conv2d", mutates_args=())
def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    slope: float,
    precision: str,
    backward: str = "netdsl",
) -> Tensor:
    return conv.conv2d(
        x.contiguous(), weight.contiguous(), bias, tuple(stride), tuple(padding), tuple(dilation), groups,
        activation, slope, precision,
    )  # fmt: skip


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, slope, precision, backward="netdsl"):
    top, left, bottom, right = four_pads(tuple(padding))
    height = output_length(x.shape[2], weight.shape[2], stride[0], top, bottom, dilation[0])
    width = output_length(x.shape[3], weight.shape[3], stride[1], left, right, dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], height, width))


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation, groups, activation, slope, precision, backward = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.args = (bias is not None, list(stride), list(padding), list(dilation), groups, activation, slope, precision,
                backward)  # fmt: skip


@torch.library.custom_op("netdsl::conv2d_backward", mutates_args=())
def conv2d_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    output: Tensor,
    has_bias: bool,
    input_grad: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str,
    slope: float,
    precision: str,
    backward: str = "netdsl",
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dx and dbias empty where not asked for. `backward`: "netdsl" runs netdsl's
    dgrad and wgrad kernels, "torch" PyTorch's convolution backward (cuDNN on a GPU) on the masked gradient."""
    if backward == "torch":
        return _torch_conv_backward(
            grad, x, weight, output, has_bias, input_grad, stride, padding, dilation, groups, activation, slope
        )
    dx, dw, db = conv_backward.conv2d_backward(
        grad.contiguous(), output.contiguous(), x.contiguous(), weight.contiguous(), bias=has_bias,
        stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups, activation=activation,
        slope=slope, input_precision=precision, input_grad=input_grad,
    )  # fmt: skip
    return _or_empty(dx, x), dw, _or_empty(db, x)


@conv2d_backward.register_fake
def _(grad, x, weight, output, has_bias, input_grad, *_args):
    return _weighted_grads(x, weight, has_bias, input_grad)


def _conv2d_backward(ctx, grad):
    x, weight, output = ctx.saved_tensors
    has_bias, *args = ctx.args
    dx, dw, db = conv2d_backward(grad, x, weight, output, has_bias, ctx.needs_input_grad[0], *args)
    return _or_none(dx), dw, _or_none(db), None, None, None, None, None, None, None, None


conv2d.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# --- fc + bias + activation --------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::linear", mutates_args=())
def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, slope: float, precision: str,
    backward: str = "netdsl",
) -> Tensor:
    return fc.linear(x.contiguous(), weight.contiguous(), bias, activation, slope, precision)


@linear.register_fake
def _(x, weight, bias, activation, slope, precision, backward="netdsl"):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, activation, slope, precision, backward = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.args = (bias is not None, activation, slope, precision, backward)


@torch.library.custom_op("netdsl::linear_backward", mutates_args=())
def linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    output: Tensor,
    has_bias: bool,
    input_grad: bool,
    activation: str,
    slope: float,
    precision: str,
    backward: str = "netdsl",
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dx and dbias empty where not asked for. `backward`: "netdsl" runs netdsl's
    kernels, "torch" two matrix products of PyTorch's (cuBLAS on a GPU) on the masked gradient."""
    if backward == "torch":
        masked = _masked(grad, output, activation, slope)
        dx = masked @ weight if input_grad else None
        db = masked.sum(0) if has_bias else None
        return _or_empty(dx, x), masked.t() @ x, _or_empty(db, x)
    grads = fc_backward.linear_backward(
        grad.contiguous(), output, x.contiguous(), weight.contiguous(), has_bias=has_bias, activation=activation,
        slope=slope, input_precision=precision, input_grad=input_grad,
    )  # fmt: skip
    dx = grads.inputs[0] if grads.inputs is not None else None
    return _or_empty(dx, x), grads.weight, _or_empty(grads.bias, x)


@linear_backward.register_fake
def _(grad, x, weight, output, has_bias, input_grad, *_args):
    return _weighted_grads(x, weight, has_bias, input_grad)


def _linear_backward(ctx, grad):
    x, weight, output = ctx.saved_tensors
    has_bias, *args = ctx.args
    dx, dw, db = linear_backward(grad, x, weight, output, has_bias, ctx.needs_input_grad[0], *args)
    return _or_none(dx), dw, _or_none(db), None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- [ReLU] + LRN + max-pooling ----------------------------------------------------------------------------


@torch.library.custom_op("netdsl::lrn_maxpool", mutates_args=())
def lrn_maxpool(
    x: Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    groups: int,
    pool_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    ceil_mode: bool,
    relu_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, argmax, scale): the two last are what the backward reads (not differentiable)."""
    return lrn_pool_backward.lrn_maxpool_train(
        x.contiguous(), size, alpha, beta, k, tuple(pool_size), tuple(pool_stride), tuple(pool_padding), ceil_mode,
        relu_first, groups,
    )  # fmt: skip


@lrn_maxpool.register_fake
def _(x, size, alpha, beta, k, groups, pool_size, pool_stride, pool_padding, ceil_mode, relu_first):
    top, left, bottom, right = four_pads(tuple(pool_padding))
    height = output_length(x.shape[2], pool_size[0], pool_stride[0], top, bottom, 1, ceil_mode)
    width = output_length(x.shape[3], pool_size[1], pool_stride[1], left, right, 1, ceil_mode)
    shape = (x.shape[0], x.shape[1], height, width)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8), x.new_empty(shape, dtype=torch.float32)


def _lrn_maxpool_setup(ctx, inputs, output) -> None:
    x, *args = inputs
    ctx.save_for_backward(x, output[1], output[2])
    ctx.args = args
    ctx.mark_non_differentiable(output[1], output[2])


@torch.library.custom_op("netdsl::lrn_maxpool_backward", mutates_args=())
def lrn_maxpool_backward(
    grad: Tensor,
    x: Tensor,
    argmax: Tensor,
    scale: Tensor,
    size: int,
    alpha: float,
    beta: float,
    k: float,
    groups: int,
    pool_size: list[int],
    pool_stride: list[int],
    pool_padding: list[int],
    ceil_mode: bool,
    relu_first: bool,
) -> Tensor:
    return lrn_pool_backward.lrn_maxpool_backward(
        grad.contiguous(), x.contiguous(), argmax, scale, size, alpha, beta, k, tuple(pool_size), tuple(pool_stride),
        tuple(pool_padding), ceil_mode, relu_first, groups,
    )  # fmt: skip


@lrn_maxpool_backward.register_fake
def _(grad, x, *_args):
    return x.new_empty(x.shape)


def _lrn_maxpool_backward(ctx, grad, _argmax_grad, _scale_grad):
    x, argmax, scale = ctx.saved_tensors
    return lrn_maxpool_backward(grad, x, argmax, scale, *ctx.args), *(None,) * 10


lrn_maxpool.register_autograd(_lrn_maxpool_backward, setup_context=_lrn_maxpool_setup)


# --- pooling and activations ---------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::max_pool", mutates_args=())
def max_pool(
    x: Tensor, size: list[int], stride: list[int], padding: list[int], dilation: list[int], ceil_mode: bool
) -> tuple[Tensor, Tensor]:
    """(output, argmax): each window's winner as a small offset, what the backward gathers with."""
    out, argmax = pool_backward.max_pool2d_train(
        x.contiguous(), tuple(size), tuple(stride), tuple(padding), ceil_mode, dilation=tuple(dilation)
    )
    return out, argmax


@max_pool.register_fake
def _(x, size, stride, padding, dilation, ceil_mode):
    shape = _pooled(x, size, stride, padding, dilation, ceil_mode)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int8)


def _max_pool_setup(ctx, inputs, output) -> None:
    x, *args = inputs
    ctx.save_for_backward(output[1])
    ctx.input_shape, ctx.args = tuple(x.shape), args
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op("netdsl::max_pool_backward", mutates_args=())
def max_pool_backward(
    grad: Tensor,
    argmax: Tensor,
    input_shape: list[int],
    size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
) -> Tensor:
    return pool_backward.max_pool2d_backward(
        grad.contiguous(), argmax, tuple(input_shape), tuple(size), tuple(stride), tuple(padding), ceil_mode,
        dilation=tuple(dilation),
    )  # fmt: skip


@max_pool_backward.register_fake
def _(grad, argmax, input_shape, *_args):
    return grad.new_empty(tuple(input_shape))


def _max_pool_backward(ctx, grad, _argmax_grad):
    (argmax,) = ctx.saved_tensors
    return max_pool_backward(grad, argmax, list(ctx.input_shape), *ctx.args), None, None, None, None, None


max_pool.register_autograd(_max_pool_backward, setup_context=_max_pool_setup)


@torch.library.custom_op("netdsl::avg_pool", mutates_args=())
def avg_pool(
    x: Tensor,
    size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    count_pad: bool,
) -> Tensor:
    window = (tuple(size), tuple(stride), tuple(padding), ceil_mode, count_pad)
    return pool.pool2d(x.contiguous(), "avg", *window, dilation=tuple(dilation))


@avg_pool.register_fake
def _(x, size, stride, padding, dilation, ceil_mode, count_pad):
    return x.new_empty(_pooled(x, size, stride, padding, dilation, ceil_mode))


def _avg_pool_setup(ctx, inputs, output) -> None:
    ctx.input_shape, ctx.args = tuple(inputs[0].shape), inputs[1:]


@torch.library.custom_op("netdsl::avg_pool_backward", mutates_args=())
def avg_pool_backward(
    grad: Tensor,
    input_shape: list[int],
    size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    count_pad: bool,
) -> Tensor:
    return pool_backward.avg_pool2d_backward(
        grad.contiguous(), tuple(input_shape), tuple(size), tuple(stride), tuple(padding), ceil_mode, count_pad,
        dilation=tuple(dilation),
    )  # fmt: skip


@avg_pool_backward.register_fake
def _(grad, input_shape, *_args):
    return grad.new_empty(tuple(input_shape))


def _avg_pool_backward(ctx, grad):
    return avg_pool_backward(grad, list(ctx.input_shape), *ctx.args), None, None, None, None, None, None


avg_pool.register_autograd(_avg_pool_backward, setup_context=_avg_pool_setup)


@torch.library.custom_op("netdsl::activation", mutates_args=())
def activation(x: Tensor, kind: str, slope: float) -> Tensor:
    """relu or leaky_relu on its own (where no conv or fc before it took it as its epilogue)."""
    x = x.contiguous()
    return elementwise.relu(x) if kind == "relu" else elementwise.leaky_relu(x, slope)


@activation.register_fake
def _(x, kind, slope):
    return x.new_empty(x.shape)


def _activation_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)
    ctx.kind, ctx.slope = inputs[1], inputs[2]


@torch.library.custom_op("netdsl::activation_backward", mutates_args=())
def activation_backward(grad: Tensor, output: Tensor, kind: str, slope: float) -> Tensor:
    return elementwise_backward.activation_backward(grad.contiguous(), output.contiguous(), kind, slope)


@activation_backward.register_fake
def _(grad, output, kind, slope):
    return grad.new_empty(grad.shape)


def _activation_backward(ctx, grad):
    (output,) = ctx.saved_tensors
    return activation_backward(grad, output, ctx.kind, ctx.slope), None, None


activation.register_autograd(_activation_backward, setup_context=_activation_setup)


def _pooled(x, size, stride, padding, dilation, ceil_mode) -> tuple[int, ...]:
    top, left, bottom, right = four_pads(tuple(padding))
    height = output_length(x.shape[2], size[0], stride[0], top, bottom, dilation[0], ceil_mode)
    width = output_length(x.shape[3], size[1], stride[1], left, right, dilation[1], ceil_mode)
    return (x.shape[0], x.shape[1], height, width)


# --- batch norm in training --------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::batch_norm", mutates_args=())
def batch_norm(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, mean, inverse std, new running mean, new running var): functional, as autograd wants; the
    caller keeps the new running statistics (`batch_norm_train` below)."""
    new_mean, new_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = batchnorm_train.batch_norm_forward(
        x.contiguous(), weight, bias, new_mean, new_var, momentum=momentum, eps=eps
    )
    return y, mean, invstd, new_mean, new_var


@batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    channels = x.shape[1]
    stats = [x.new_empty((channels,), dtype=torch.float32) for _ in range(2)]
    running = [running_mean.new_empty(running_mean.shape), running_var.new_empty(running_var.shape)]
    return x.new_empty(x.shape), *stats, *running


def _batch_norm_setup(ctx, inputs, output) -> None:
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])


@torch.library.custom_op("netdsl::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = batchnorm_train.batch_norm_backward(grad.contiguous(), x.contiguous(), weight, mean, invstd)
    return dx, dweight, dbias


@batch_norm_backward.register_fake
def _(grad, x, weight, mean, invstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _batch_norm_backward(ctx, grad, *_others):
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(grad, x, weight, mean, invstd)
    return dx, dweight, dbias, None, None, None, None


batch_norm.register_autograd(_batch_norm_backward, setup_context=_batch_norm_setup)


def batch_norm_train(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float, eps: float
) -> Tensor:
    """Batch norm on the batch's statistics, the running ones updated in place (PyTorch's convention)."""
    y, _mean, _invstd, new_mean, new_var = batch_norm(x, weight, bias, running_mean, running_var, momentum, eps)
    with torch.no_grad():
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y


# --- dropout -------------------------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::dropout", mutates_args=())
def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    return dropout_kernels.dropout(x.contiguous(), p, seed)


@dropout.register_fake
def _(x, p, seed):
    return x.new_empty(x.shape)


def _dropout_setup(ctx, inputs, output) -> None:
    ctx.p, ctx.seed = inputs[1], inputs[2]


@torch.library.custom_op("netdsl::dropout_backward", mutates_args=())
def dropout_backward(grad: Tensor, p: float, seed: int) -> Tensor:
    return dropout_kernels.dropout_backward(grad.contiguous(), p, seed)


@dropout_backward.register_fake
def _(grad, p, seed):
    return grad.new_empty(grad.shape)


def _dropout_backward(ctx, grad):
    return dropout_backward(grad, ctx.p, ctx.seed), None, None


dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def dropout_seed() -> int:
    """A fresh seed from torch's generator: a run's saved random state replays every mask."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


# --- the loss --------------------------------------------------------------------------------------------------


@torch.library.custom_op("netdsl::cross_entropy", mutates_args=())
def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(mean loss, its gradient on the logits): one kernel computes both."""
    result = ce.cross_entropy(logits.contiguous(), target, label_smoothing=label_smoothing)
    return result.loss, result.grad


@cross_entropy.register_fake
def _(logits, target, label_smoothing):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _cross_entropy_backward(ctx, grad, _grad_grad):
    (gradient,) = ctx.saved_tensors
    return (gradient * grad).to(gradient.dtype), None, None


cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The 16-bit type autocast computes products in on `device`, when it is on there."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _masked(grad: Tensor, output: Tensor, activation: str, slope: float) -> Tensor:
    """The gradient at the pre-activation value, read from the saved output (as netdsl's kernels do)."""
    if activation == "relu":
        return torch.where(output > 0, grad, torch.zeros_like(grad))
    if activation == "leaky_relu":
        return torch.where(output > 0, grad, grad * slope)
    return grad


def _torch_conv_backward(
    grad, x, weight, output, has_bias, input_grad, stride, padding, dilation, groups, activation, slope
) -> tuple[Tensor, Tensor, Tensor]:
    """A conv's gradients by PyTorch's convolution backward; padding that differs between the ends of an
    axis (which it cannot express) is applied to the input first and cut from its gradient."""
    top, left, bottom, right = four_pads(tuple(padding))
    masked = _masked(grad, output, activation, slope)
    padded = x if (top, left) == (bottom, right) else torch.nn.functional.pad(x, (left, right, top, bottom))
    same = [0, 0] if padded is not x else [top, left]
    dx, dw, db = torch.ops.aten.convolution_backward(
        masked, padded, weight, [weight.shape[0]] if has_bias else None, list(stride), same, list(dilation), False,
        [0, 0], groups, [input_grad, True, has_bias],
    )  # fmt: skip
    if dx is not None and padded is not x:
        dx = dx[:, :, top : top + x.shape[2], left : left + x.shape[3]].contiguous()
    return _or_empty(dx, x), dw, _or_empty(db, x)


def _weighted_grads(x: Tensor, weight: Tensor, has_bias: bool, input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The shapes of (dx, dweight, dbias) of a conv or an fc, empty where not asked for (the fakes')."""
    dx = x.new_empty(x.shape if input_grad else (0,))
    return dx, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,))


def _or_empty(value: Tensor | None, like: Tensor) -> Tensor:
    """An operator returns tensors only: an empty one where there is no gradient."""
    return value if value is not None else like.new_empty((0,))


def _or_none(value: Tensor) -> Tensor | None:
    return None if value.numel() == 0 else value


# --- a training group, run -------------------------------------------------------------------------------------


def run_group(
    group, inputs: list[Tensor], tensors: dict[str, Tensor], training: bool, precision: str, backward: str = "netdsl"
) -> Tensor:
    """The output of one group of netdsl.compiler.training (its first layer's `inputs`, its weights
    `tensors` by name) on netdsl's kernels; `precision` is the dots' ("ieee" or "tf32"); `backward` says
    whose backward a conv or an fc runs ("netdsl" or "torch": netdsl.compiler.backward_choice)."""
    item = group.first
    low = _autocast_dtype(inputs[0].device)
    if low is not None and group.kind in ("conv2d", "linear"):
        # Under autocast (bf16 or fp16 training) the products take 16-bit operands, accumulated in fp32, as
        # PyTorch's own conv and matmul do there: the casts are autograd's, so the fp32 weights get fp32
        # gradients; the layers after read the 16-bit maps as they come.
        inputs = [t.to(low) for t in inputs]
        tensors = {name: t.to(low) for name, t in tensors.items()}
    if group.kind == "linear":  # each input flattened, then joined
        x = torch.cat([t.flatten(1) for t in inputs], dim=1) if len(inputs) > 1 else inputs[0].flatten(1)
        return linear(x, tensors["weight"], tensors.get("bias"), group.options["activation"], group.options["slope"],
                      precision, backward)  # fmt: skip
    x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)  # several inputs: joined on channels
    if group.kind == "conv2d":
        p = item.params
        pads = layer_pads(p, tuple(x.shape[2:]))
        return conv2d(
            x, tensors["weight"], tensors.get("bias"), list(p["stride"]), list(pads), list(p["dilation"]), p["groups"],
            group.options["activation"], group.options["slope"], precision, backward,
        )  # fmt: skip
    if group.kind == "lrn_maxpool":
        norm, pool = group.layers[-2], group.layers[-1]
        n, q = norm.params, pool.params
        pads = layer_pads(q, tuple(x.shape[2:]))
        y, _argmax, _scale = lrn_maxpool(
            x, n["size"], n["alpha"], n["beta"], n["k"], n.get("groups", 1), list(q["size"]), list(q["stride"]),
            list(pads), q["ceil"], group.options["relu_first"],
        )  # fmt: skip
        return y
    if group.kind == "pool":
        p = item.params
        pads = list(layer_pads(p, tuple(x.shape[2:])))
        size, stride, dilation = list(p["size"]), list(p["stride"]), list(p.get("dilation", (1, 1)))
        if item.op == "maxpool":
            return max_pool(x, size, stride, pads, dilation, p["ceil"])[0]
        return avg_pool(x, size, stride, pads, dilation, p["ceil"], p["count_pad"])
    if group.kind == "activation":
        return activation(x, item.op, float(item.params.get("slope", 0.0)))
    if group.kind == "batch_norm":
        p = item.params
        return batch_norm_train(
            x, tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"],
            p.get("momentum", 0.1), p["eps"],
        )  # fmt: skip
    if group.kind == "dropout":
        return dropout(x, item.params["rate"], dropout_seed()) if training else x
    raise ValueError(f"no kernel for a {group.kind} group")
