"""
Faster and leaner versions of the few operations CAV-MAE's layers are made of: a linear layer, LayerNorm followed by a
linear layer, and exact GELU followed by a linear layer. Each computes what the plain PyTorch modules compute; the
modeling file calls [`linear_layer`], [`layer_norm_linear`] and [`gelu_linear`] instead of the modules.

- Matrix products on CPU. PyTorch runs float32 matmuls on CPU through MKL, whose kernels on non-Intel x86 CPUs (e.g.
  AMD EPYC) use AVX2 even where AVX-512 is available; oneDNN, PyTorch's other CPU backend, uses AVX-512 there, which
  doubles the throughput of the linear layers (measured on an AMD EPYC: ~210 vs ~440 GFLOP/s on 2 cores). The products
  stay IEEE float32 (only the summation order differs, ~1e-6 relative). So on CPU in float32, the forward and both
  backward products of every linear layer go through oneDNN.
- bfloat16 on CPU. Where the CPU has bfloat16 instructions (AVX512-BF16, AMX, Arm's BF16), oneDNN's bfloat16
  products (float32 accumulation) are used both for a model loaded in bfloat16 and under bfloat16 autocast, where
  the operands are cast to the autocast dtype first, as autocast would cast them for `nn.Linear`; LayerNorm and the
  residual stream then stay in float32, as under autocast without these kernels. On other devices and dtypes the
  products are PyTorch's `linear` / `mm` in the same dtypes.
- Memory while training. LayerNorm + linear keeps only its input for the backward pass and re-normalises it there;
  GELU + linear keeps only the pre-activation and recomputes the GELU. Together this cuts the activation memory of
  training by more than a third for ~1-2 % more time.

One switch: `ENABLED = False` on this module (or the environment variable `CAVMAE_FAST_KERNELS=0` before import) runs
the plain modules everywhere. The fast paths also stand aside by themselves where they do not apply: modules that are
not bare `nn.Linear` / `nn.LayerNorm` (quantised, adapted or hooked), under `torch.compile` (the compiler chooses the
kernels), and, for the oneDNN products, off the CPU, or in dtypes other than float32 and (where the CPU supports it)
bfloat16.

This file imports only torch and the standard library, so that it travels with `save_pretrained` checkpoints.
"""

import os

import torch
from torch import nn

ENABLED = os.environ.get("CAVMAE_FAST_KERNELS", "1") != "0"


def _find_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # PyTorch built without oneDNN
        return None


def _find_onednn_dtypes() -> tuple:
    if _ONEDNN_LINEAR is None:
        return ()
    try:
        bfloat16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bfloat16 = False
    return (torch.float32, torch.bfloat16) if bfloat16 else (torch.float32,)


_ONEDNN_LINEAR = _find_onednn_linear()
_ONEDNN_DTYPES = _find_onednn_dtypes()


# Public entry points -----------------------------------------------------------------------------------------------
def linear_layer(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`module(inputs)` for an `nn.Linear`, through oneDNN on CPU in float32 and bfloat16 (also under autocast)."""
    if not _is_plain(module, nn.Linear):
        return module(inputs)
    operands = _autocast_operands(inputs, module.weight, module.bias)
    if not _onednn_applicable(*operands):
        return module(inputs)
    if _records_gradients(inputs, module):
        return _LinearFunction.apply(*operands)
    return _ONEDNN_LINEAR(*operands, "none", [], "")


def layer_norm_linear(norm: nn.Module, module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`module(norm(hidden_states))`, re-normalising in the backward pass instead of storing the normalised states."""
    if (
        _records_gradients(hidden_states, module)
        and _is_plain(norm, nn.LayerNorm)
        and norm.weight is not None
        and _is_plain(module, nn.Linear)
    ):
        return _LayerNormLinearFunction.apply(
            hidden_states, norm.weight, norm.bias, norm.eps, module.weight, module.bias
        )
    return linear_layer(module, norm(hidden_states))


def gelu_linear(module: nn.Module, hidden_states: torch.Tensor, activation: nn.Module) -> torch.Tensor:
    """`module(activation(hidden_states))`; for the exact GELU, recomputed in the backward pass instead of stored."""
    if _is_exact_gelu(activation) and _records_gradients(hidden_states, module) and _is_plain(module, nn.Linear):
        return _GeluLinearFunction.apply(hidden_states, module.weight, module.bias)
    return linear_layer(module, activation(hidden_states))


# Applicability -----------------------------------------------------------------------------------------------------
def _is_plain(module: nn.Module, cls: type) -> bool:
    """A bare `cls` module (not a subclass such as a quantised or adapter layer, no hooks, forward not replaced)."""
    return (
        type(module) is cls
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _is_exact_gelu(activation: nn.Module) -> bool:
    """PyTorch's erf GELU, or Transformers' `GELUActivation` (`ACT2FN["gelu"]`) wrapping it."""
    if type(activation) is nn.GELU:
        return activation.approximate == "none"
    return type(activation).__name__ == "GELUActivation" and getattr(activation, "act", None) is nn.functional.gelu


def _records_gradients(hidden_states: torch.Tensor, module: nn.Module) -> bool:
    """Whether a recomputing function should replace `module`'s stored activations: only while recording gradients."""
    return (
        ENABLED
        and not torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False)))
    )


def _onednn_applicable(*tensors) -> bool:
    """Whether the products of these tensors (`None` ignored), all of one dtype, can run through oneDNN's kernels."""
    if not ENABLED or not _ONEDNN_DTYPES or torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    return dtype in _ONEDNN_DTYPES and all(
        tensor is None
        or (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type == "cpu" and tensor.dtype == dtype)
        for tensor in tensors
    )


def _autocast_operands(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The operands of a linear layer as autocast would pass them to the product: cast to the autocast dtype when
    autocast is on for their device (a cast autograd records, so gradients reach the float32 weights), else as
    they are."""
    device_type = inputs.device.type
    if not torch.is_autocast_enabled(device_type) or not inputs.is_floating_point():
        return inputs, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return inputs.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# Products ----------------------------------------------------------------------------------------------------------
def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(inputs, weight, bias)` without autograd (inside the functions below), in the autocast dtype if on."""
    operands = _autocast_operands(inputs, weight, bias)
    if _onednn_applicable(*operands):
        return _ONEDNN_LINEAR(*operands, "none", [], "")
    return nn.functional.linear(*operands)


def _grad_input_product(grad_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad_rows [M, N] @ weight [N, K]`: the input gradient of a linear layer."""
    if _onednn_applicable(grad_rows, weight):
        return _ONEDNN_LINEAR(grad_rows, weight.t(), None, "none", [], "")
    return grad_rows.mm(weight)


def _grad_weight_product(grad_rows: torch.Tensor, input_rows: torch.Tensor) -> torch.Tensor:
    """`grad_rows.T [N, M] @ input_rows [M, K]`: the weight gradient of a linear layer."""
    if _onednn_applicable(grad_rows, input_rows):
        # oneDNN's linear contracts the last dimension of both operands, so one of them is transposed into a copy:
        # the gradient [M, N], or the input [M, K] (then the [K, N] product is transposed back), whichever is less.
        rows, out_features, in_features = grad_rows.shape[0], grad_rows.shape[1], input_rows.shape[1]
        if rows * out_features <= (rows + out_features) * in_features:
            return _ONEDNN_LINEAR(grad_rows.t().contiguous(), input_rows.t(), None, "none", [], "")
        return _ONEDNN_LINEAR(input_rows.t().contiguous(), grad_rows.t(), None, "none", [], "").t().contiguous()
    return grad_rows.t().mm(input_rows)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1])


# Autograd functions ------------------------------------------------------------------------------------------------
class _LinearFunction(torch.autograd.Function):
    """A linear layer whose forward and backward products go through [`_linear`] and the gradient products."""

    @staticmethod
    def forward(ctx, inputs, weight, bias):
        ctx.save_for_backward(inputs, weight)
        ctx.has_bias = bias is not None
        return _linear(inputs, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        grad_rows = _rows(grad_output)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _grad_input_product(grad_rows, weight).view(inputs.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _grad_weight_product(grad_rows, _rows(inputs))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_input, grad_weight, grad_bias


class _GeluLinearFunction(torch.autograd.Function):
    """
    `linear(gelu(x), weight, bias)` that keeps only `x` for the backward pass and recomputes `gelu(x)` there.

    Autograd would otherwise keep both the MLP's pre-activation (for GELU's backward) and its activation (for the
    second linear's weight gradient): each `intermediate_size` wide, together half of what a layer keeps for the
    backward pass. Mixed precision is handled explicitly (the backward runs outside autocast): products run in the
    dtype of the forward's output, gradients come back in the dtypes of the inputs, as autocast's casts would give them.
    """

    @staticmethod
    def forward(ctx, hidden_states, weight, bias):
        output = _linear(nn.functional.gelu(hidden_states), weight, bias)
        ctx.save_for_backward(hidden_states, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        grad_rows = _rows(grad_output)
        if ctx.needs_input_grad[1]:
            activation = nn.functional.gelu(hidden_states).to(grad_output.dtype)
            grad_weight = _grad_weight_product(grad_rows, _rows(activation)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_activation = _grad_input_product(grad_rows, weight.to(grad_output.dtype))
            grad_activation = grad_activation.view(hidden_states.shape).to(hidden_states.dtype)
            grad_input = torch.ops.aten.gelu_backward(grad_activation, hidden_states)
        return grad_input, grad_weight, grad_bias


class _LayerNormLinearFunction(torch.autograd.Function):
    """
    `linear(layer_norm(x), weight, bias)` that keeps only `x` (which the residual stream holds anyway) for the
    backward pass and recomputes the normalised `x` there, instead of storing it for the linear's weight gradient.
    The LayerNorm runs in its forward dtype (that of `x` here, with or without autocast); products run in the
    dtype of the output; gradients come back in the dtypes of the inputs.
    """

    @staticmethod
    def forward(ctx, hidden_states, norm_weight, norm_bias, eps, weight, bias):
        normed = nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:], norm_weight, norm_bias, eps)
        output = _linear(normed, weight, bias)
        ctx.save_for_backward(hidden_states, norm_weight, norm_bias, weight)
        ctx.eps = eps
        ctx.norm_dtype = normed.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, norm_weight, norm_bias, weight = ctx.saved_tensors
        dtype, shape = ctx.norm_dtype, hidden_states.shape[-1:]
        inputs = hidden_states.to(dtype)
        gamma = None if norm_weight is None else norm_weight.to(dtype)
        beta = None if norm_bias is None else norm_bias.to(dtype)
        normed, mean, rstd = torch.native_layer_norm(inputs, shape, gamma, beta, ctx.eps)
        grad_rows = _rows(grad_output)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_weight = _grad_weight_product(grad_rows, _rows(normed).to(grad_output.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[5]:
            grad_bias = grad_rows.sum(0).to(ctx.bias_dtype)
        grad_input = grad_gamma = grad_beta = None
        if any(ctx.needs_input_grad[:3]):
            grad_normed = _grad_input_product(grad_rows, weight.to(grad_output.dtype))
            grad_normed = grad_normed.view(inputs.shape).to(dtype)
            grad_input, grad_gamma, grad_beta = torch.ops.aten.native_layer_norm_backward(
                grad_normed, inputs, shape, mean, rstd, gamma, beta, list(ctx.needs_input_grad[:3])
            )
            grad_input = None if grad_input is None else grad_input.to(hidden_states.dtype)
            grad_gamma = None if grad_gamma is None else grad_gamma.to(norm_weight.dtype)
            grad_beta = None if grad_beta is None else grad_beta.to(norm_bias.dtype)
        return grad_input, grad_gamma, grad_beta, None, grad_weight, grad_bias
