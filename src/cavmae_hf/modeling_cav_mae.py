"""PyTorch CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al., ICLR 2023)."""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_cav_mae import CavMaeConfig, CavMaeError

logger = logging.get_logger(__name__)

AUDIO, VISUAL, JOINT = "audio", "visual", "joint"

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_cav_mae.CavMaeConfig",
    "AutoModel": "modeling_cav_mae.CavMaeModel",
    "AutoModelForPreTraining": "modeling_cav_mae.CavMaeForPreTraining",
    "AutoModelForAudioClassification": "modeling_cav_mae.CavMaeForAudioVisualClassification",
}


def _can_inspect_values() -> bool:
    """Whether checks that read tensor values (NaN, ranges) may run: not while `torch.compile` traces the model,
    where reading a value would break the graph (shapes and types are still checked there)."""
    return not torch.compiler.is_compiling()


class CavMaeInputError(CavMaeError):
    """An input handed to a CAV-MAE model has the wrong shape, size or values for its configuration."""


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CavMaeModelOutput(ModelOutput):
    r"""
    Outputs of [`CavMaeModel`]. With B the batch, Na / Nv the audio / visual patches and D the hidden size:

    last_hidden_state (`torch.FloatTensor` of shape `(B, Na + Nv, D)`):
        Joint stream (audio then visual tokens through the shared layers with their joint LayerNorms, then the
        joint final LayerNorm). `None` unless both modalities are given.
    audio_last_hidden_state (`torch.FloatTensor` of shape `(B, Na, D)`):
        Audio stream after the shared layers with their audio LayerNorms, then `norm_a`.
    visual_last_hidden_state (`torch.FloatTensor` of shape `(B, Nv, D)`):
        Visual stream after the shared layers with their visual LayerNorms, then `norm_v`.
    pooler_output (`torch.FloatTensor` of shape `(B, D)`): mean of `last_hidden_state` over tokens.
    audio_embeds (`torch.FloatTensor` of shape `(B, D)`): mean of `audio_last_hidden_state` over tokens.
    visual_embeds (`torch.FloatTensor` of shape `(B, D)`): mean of `visual_last_hidden_state` over tokens.
    hidden_states, audio_hidden_states, visual_hidden_states (`tuple(torch.FloatTensor)`):
        With `output_hidden_states=True`: the input of each stream's first layer and the output of every layer.
        The audio and visual streams run their modality-specific layers then the shared layers; the joint stream
        starts from the concatenated outputs of the modality-specific layers.
    attentions, audio_attentions, visual_attentions (`tuple(torch.FloatTensor)`):
        With `output_attentions=True` and eager attention: attention weights of each layer of each stream,
        `(B, heads, N, N)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    audio_last_hidden_state: torch.FloatTensor | None = None
    visual_last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    visual_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    audio_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    visual_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_attentions: tuple[torch.FloatTensor, ...] | None = None
    visual_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CavMaeForPreTrainingOutput(ModelOutput):
    r"""
    Outputs of [`CavMaeForPreTraining`]. Loss components are unweighted; `loss` is
    `mae_loss_weight * (audio_mae_loss + visual_mae_loss) + contrastive_loss_weight * contrastive_loss`.
    A component whose weight is 0 is not computed and is `None`.

    loss (`torch.FloatTensor` of shape `()`): the weighted total.
    mae_loss (`torch.FloatTensor` of shape `()`): `audio_mae_loss + visual_mae_loss`.
    audio_mae_loss, visual_mae_loss (`torch.FloatTensor` of shape `()`): mean squared error on removed patches.
    contrastive_loss (`torch.FloatTensor` of shape `()`): InfoNCE between pooled audio and visual streams.
    contrastive_accuracy (`torch.FloatTensor` of shape `()`): share of clips whose own pair scores highest.
    audio_logits (`torch.FloatTensor` of shape `(B, Na, patch_size**2)`): reconstructed audio patches.
    visual_logits (`torch.FloatTensor` of shape `(B, Nv, patch_size**2 * num_channels)`): reconstructed patches.
    audio_mask, visual_mask (`torch.FloatTensor` of shape `(B, Na)` / `(B, Nv)`): 1 for removed patches.
    audio_ids_restore, visual_ids_restore (`torch.LongTensor` of shape `(B, Na)` / `(B, Nv)`): the permutation
        that puts the shuffled (kept then removed) tokens back in patch order.
    last_hidden_state (`torch.FloatTensor` of shape `(B, Na_kept + Nv_kept, D)`): joint encoder output of the
        kept tokens (the decoder's input). `None` when the decoder is not run.
    audio_embeds, visual_embeds (`torch.FloatTensor` of shape `(B, D)`): pooled masked modality streams used by
        the contrastive loss. `None` when the contrastive loss is not computed.
    """

    loss: torch.FloatTensor | None = None
    mae_loss: torch.FloatTensor | None = None
    audio_mae_loss: torch.FloatTensor | None = None
    visual_mae_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    contrastive_accuracy: torch.FloatTensor | None = None
    audio_logits: torch.FloatTensor | None = None
    visual_logits: torch.FloatTensor | None = None
    audio_mask: torch.FloatTensor | None = None
    visual_mask: torch.FloatTensor | None = None
    audio_ids_restore: torch.LongTensor | None = None
    visual_ids_restore: torch.LongTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    visual_embeds: torch.FloatTensor | None = None


@dataclass
class CavMaeClassifierOutput(ModelOutput):
    r"""
    Outputs of [`CavMaeForAudioVisualClassification`].

    loss (`torch.FloatTensor` of shape `()`): loss following `config.problem_type`, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(B, num_labels)`): class scores. With several frames per clip these are
        the aggregated scores: the per-frame probabilities (softmax, or sigmoid for multi-label) are averaged and
        mapped back to logits, so that `softmax(logits)` / `sigmoid(logits)` is the frame-averaged probability.
    frame_logits (`torch.FloatTensor` of shape `(B, F, num_labels)`): per-frame scores, when
        `pixel_values` has a frame axis.
    pooled_output (`torch.FloatTensor` of shape `(B, D)` or `(B, F, D)`): what the head classified.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    frame_logits: torch.FloatTensor | None = None
    pooled_output: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings, masking, patches
# ----------------------------------------------------------------------------------------------------------------
def sincos_1d_position_embeddings(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding `[len(positions), dim]` in float64: sines of all frequencies, then cosines."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * frequencies.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_position_embeddings(dim: int, rows: int, cols: int) -> torch.Tensor:
    """
    Fixed 2-D sin-cos position embeddings `[rows * cols, dim]` (float32) for row-major patch grids.

    Token `r * cols + c` gets the column's 1-D embedding in its first `dim / 2` channels and the row's in the
    rest. For audio (rows = frequency, cols = time) this is the layout of the released checkpoints, whose grid
    was built by reshaping a (rows, cols) meshgrid without a transpose. Computed in float64, as the reference.
    """
    row_index, col_index = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    embeddings = torch.cat(
        [sincos_1d_position_embeddings(dim // 2, col_index), sincos_1d_position_embeddings(dim // 2, row_index)], dim=1
    )
    return embeddings.to(torch.float32)


def mask_tokens(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """
    Keep the `int(N * (1 - mask_ratio))` tokens of each sample with the smallest `noise`.

    Args:
        tokens: `[B, N, D]`. noise: `[B, N]`.
    Returns:
        kept `[B, N_keep, D]` (in ascending-noise order), mask `[B, N]` (1 = removed, in patch order),
        ids_restore `[B, N]` (argsort of the shuffle: gathers the shuffled sequence back into patch order).
    """
    kept, mask, ids_restore, _ = _mask_tokens(tokens, mask_ratio, noise)
    return kept, mask, ids_restore


def _mask_tokens(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """[`mask_tokens`], also returning the removed patches' indices `[B, N - N_keep]` (for the loss)."""
    batch_size, length, dim = tokens.shape
    num_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :num_keep].unsqueeze(-1).expand(-1, -1, dim))
    mask = (ids_restore >= num_keep).to(tokens.dtype)
    return kept, mask, ids_restore, ids_shuffle[:, num_keep:]


def structured_audio_noise(
    batch_size: int, grid: tuple[int, int], mask_ratio: float, mode: str, device, generator=None
) -> torch.Tensor:
    """
    Masking noise `[B, F * T]` for the audio grid `(F, T)` (frequency-major tokens) that removes whole time
    columns (`"time"`: `int(T * ratio)` of them), frequency rows (`"freq"`: `int(F * ratio)`) or both (`"tf"`:
    `int(T * ratio * 0.7)` columns and `int(F * ratio * 0.7)` rows), as the reference's structured masking.
    Chosen columns/rows get noise 1.1 (above any uniform draw), so they are removed first.
    """
    freq, time = grid
    noise = torch.rand(batch_size, freq, time, device=device, generator=generator)
    share = 0.7 if mode == "tf" else 1.0
    if mode in ("time", "tf"):
        columns = _random_subsets(batch_size, time, int(time * mask_ratio * share), device, generator)
        noise.scatter_(2, columns.unsqueeze(1).expand(-1, freq, -1), 1.1)
    if mode in ("freq", "tf"):
        rows = _random_subsets(batch_size, freq, int(freq * mask_ratio * share), device, generator)
        noise.scatter_(1, rows.unsqueeze(2).expand(-1, -1, time), 1.1)
    return noise.reshape(batch_size, freq * time)


def _random_subsets(batch_size: int, population: int, count: int, device, generator) -> torch.Tensor:
    """`[B, count]` indices: a uniformly random subset of `range(population)` per row."""
    draws = torch.rand(batch_size, population, device=device, generator=generator)
    return torch.argsort(draws, dim=1)[:, :count]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, C, H, W]` -> `[B, (H/p) * (W/p), p * p * C]`, row-major patches, channels last within a patch."""
    batch_size, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch_size, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch_size, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of [`patchify`]: `[B, rows * cols, p * p * C]` -> `[B, C, rows * p, cols * p]`."""
    rows, cols = grid
    batch_size = patches.shape[0]
    images = patches.reshape(batch_size, rows, cols, patch_size, patch_size, channels)
    images = images.permute(0, 5, 1, 3, 2, 4)
    return images.reshape(batch_size, channels, rows * patch_size, cols * patch_size)


def spectrogram_to_image(input_features: torch.Tensor) -> torch.Tensor:
    """`[B, T, F]` spectrogram -> `[B, 1, F, T]` single-channel image (frequency as height), the model's view."""
    return input_features.unsqueeze(1).transpose(2, 3)


def image_to_spectrogram(image: torch.Tensor) -> torch.Tensor:
    """Inverse of [`spectrogram_to_image`]."""
    return image.squeeze(1).transpose(1, 2)


def reconstruction_loss(
    images: torch.Tensor,
    predictions: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    ids_removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Mean squared error over the removed patches. `images` `[B, C, H, W]`, `predictions` `[B, N, p*p*C]`,
    `mask` `[B, N]`. With `norm_pix_loss` the target patches are standardised (unbiased variance, eps 1e-6).
    Given `ids_removed` `[B, N_removed]` (the removed patches; the same number in every sample, as masking gives),
    targets and errors are computed for those patches only, instead of for all patches and then weighted by `mask`.
    """
    target = patchify(images, patch_size)
    if ids_removed is not None:
        index = ids_removed.unsqueeze(-1)
        target = torch.gather(target, 1, index.expand(-1, -1, target.shape[-1]))
        predictions = torch.gather(predictions, 1, index.expand(-1, -1, predictions.shape[-1]))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = (predictions - target).pow(2).mean(dim=-1)
    if ids_removed is not None:
        return per_patch.mean()
    return (per_patch * mask).sum() / mask.sum()


def contrastive_loss(
    audio_embeds: torch.Tensor,
    visual_embeds: torch.Tensor,
    temperature: float,
    bidirectional: bool = False,
    gather_from_all_processes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    InfoNCE between pooled audio and visual embeddings `[B, D]`; returns `(loss, accuracy)`.

    Similarities `s = normalize(audio) @ normalize(visual).T / temperature`. One-directional (the reference
    default): for each visual clip, its audio is classified among all audio clips (log-softmax over dim 0).
    Bidirectional averages that with the visual-given-audio term. The accuracy counts clips whose true pair
    scores highest, in the same direction(s).

    With `gather_from_all_processes` under `torch.distributed`, embeddings of every process are gathered with
    gradient, so that negatives come from the global batch; every process then computes the same global loss and
    DDP's gradient averaging gives exactly the single-process gradient of the concatenated batch.
    """
    audio_embeds = nn.functional.normalize(audio_embeds, dim=-1)
    visual_embeds = nn.functional.normalize(visual_embeds, dim=-1)
    if gather_from_all_processes and _distributed_world_size() > 1:
        audio_embeds = _all_gather_with_grad(audio_embeds)
        visual_embeds = _all_gather_with_grad(visual_embeds)
    similarity = audio_embeds @ visual_embeds.T / temperature
    directions = (similarity, similarity.T) if bidirectional else (similarity,)
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    losses = [-torch.diagonal(nn.functional.log_softmax(scores, dim=0)).mean() for scores in directions]
    accuracies = [(scores.argmax(dim=0) == targets).float().mean() for scores in directions]
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class _AllGatherWithGrad(torch.autograd.Function):
    """
    `[b, D]` per process -> `[sum of b, D]`, every process's rows in rank order. Backward sums the incoming gradients
    over processes (each computed the loss over all rows) and returns this process's slice of the sum.
    """

    @staticmethod
    def forward(ctx, tensor):
        distributed = torch.distributed
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(distributed.get_world_size())]
        distributed.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
        sizes = [int(size) for size in sizes]
        # collectives need equal shapes: pad to the largest batch (a process may have skipped a broken clip)
        largest = max(sizes)
        padded = nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, largest - tensor.shape[0]))
        gathered = [torch.empty_like(padded) for _ in sizes]
        distributed.all_gather(gathered, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, distributed.get_rank()
        return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous()
        torch.distributed.all_reduce(grad)
        return grad.split(ctx.sizes, dim=0)[ctx.rank]


def _all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _AllGatherWithGrad.apply(tensor)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    # scaling the queries [B, H, N, d] rather than the scores [B, H, N, N]: one pass over far fewer numbers, in
    # the forward and in the backward (long token sequences, such as the decoder's 708, made it a fifth of a step)
    attn_weights = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class CavMaeAttention(nn.Module):
    """
    Multi-head self-attention with a fused query/key/value projection (the checkpoints' layout).

    Takes one stream `[B, N, D]`, or several streams packed as rows `[R, D]` (see [`CavMaeLayer`]): the projections
    then run once over all rows, and attention within each stream.
    """

    def __init__(self, config: CavMaeConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, segments=None):
        """
        `[B, N, D]` -> (`[B, N, D]`, attention weights `[B, heads, N, N]` or None). With `segments`, `hidden_states`
        are packed rows `[R, D]` and the result is (`[R, D]`, a tuple of each stream's weights or None).
        """
        qkv = _apply_linear(self.qkv, hidden_states)
        if segments is None:
            return self.attend_projected(qkv, output_attentions)
        outputs, weights = [], []
        for piece, (_, batch_size, length) in zip(qkv.split(_segment_rows(segments)), segments):
            attn_output, attn_weights = self._attend(piece.view(batch_size, length, -1), output_attentions)
            outputs.append(attn_output.reshape(batch_size * length, -1))
            weights.append(attn_weights)
        return _apply_linear(self.proj, torch.cat(outputs)), (tuple(weights) if output_attentions else None)

    def attend_projected(self, qkv: torch.Tensor, output_attentions: bool = False):
        """The attention after the query/key/value projection: `[B, N, 3 * D]` -> (`[B, N, D]`, weights or None)."""
        attn_output, attn_weights = self._attend(qkv, output_attentions)
        return _apply_linear(self.proj, attn_output), attn_weights

    def _attend(self, qkv: torch.Tensor, output_attentions: bool):
        """`[B, N, 3 * D]` projections -> attention output `[B, N, D]` (query, key and value stay views of `qkv`)."""
        batch_size, length, _ = qkv.shape
        query, key, value = qkv.view(batch_size, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return attn_output.reshape(batch_size, length, -1), attn_weights


# Matrix products on CPU ---------------------------------------------------------------------------------------------
# PyTorch runs float32 matmuls on CPU through MKL, whose kernels on non-Intel x86 CPUs (e.g. AMD EPYC) use AVX2 even
# where AVX-512 is available; oneDNN, PyTorch's other CPU backend, uses AVX-512 there, which doubles the throughput
# of the model's linear layers (measured on an AMD EPYC: ~210 vs ~440 GFLOP/s on 2 cores). The products stay IEEE
# float32 (only the summation order differs, ~1e-6 relative). So on CPU in float32 (without autocast) the linear
# layers' forward and both backward products go through oneDNN. Set `ONEDNN_CPU_LINEAR = False` on this module (or
# the environment variable `CAVMAE_ONEDNN_LINEAR=0` before import) to use PyTorch's default instead.
ONEDNN_CPU_LINEAR = os.environ.get("CAVMAE_ONEDNN_LINEAR", "1") != "0"


def _find_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):  # PyTorch built without oneDNN
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


def _onednn_applicable(*tensors) -> bool:
    """Whether the products of these tensors (`None` ignored) can run through oneDNN's float32 kernels."""
    # Under torch.compile the compiler chooses the kernels (inductor does not lower this op with plain weights).
    if not ONEDNN_CPU_LINEAR or _ONEDNN_LINEAR is None or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(
        tensor is None
        or (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type == "cpu" and tensor.dtype == torch.float32)
        for tensor in tensors
    )


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(inputs, weight, bias)` without autograd (inside the functions below, or without gradients)."""
    if _onednn_applicable(inputs, weight, bias):
        return _ONEDNN_LINEAR(inputs, weight, bias, "none", [], "")
    return nn.functional.linear(inputs, weight, bias)


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


def _apply_linear(linear: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`linear(inputs)`, through oneDNN on CPU in float32 when `linear` is a bare `nn.Linear`."""
    if not _is_plain_linear(linear) or not _onednn_applicable(inputs, linear.weight, linear.bias):
        return linear(inputs)
    if torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in linear.parameters())):
        return _LinearFunction.apply(inputs, linear.weight, linear.bias)
    return _linear(inputs, linear.weight, linear.bias)


class _GeluLinearFunction(torch.autograd.Function):
    """
    `linear(gelu(x), weight, bias)` that keeps only `x` for the backward pass and recomputes `gelu(x)` there.

    Autograd would otherwise keep both the MLP's pre-activation (for GELU's backward) and its activation (for the
    second linear's weight gradient): each `intermediate_size` wide, together half of what a layer keeps for the
    backward pass. Recomputing the GELU costs one elementwise pass. Mixed precision is handled explicitly (the
    backward runs outside autocast): products run in the dtype of the forward's output, gradients come back in the
    dtypes of the inputs, as autocast's casts would give them.
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


def _is_plain(module: nn.Module, cls: type) -> bool:
    """A bare `cls` module (not a subclass such as a quantised or adapter layer, no hooks, forward not replaced)."""
    return (
        type(module) is cls
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and "forward" not in module.__dict__
    )


def _is_plain_linear(module: nn.Module) -> bool:
    return _is_plain(module, nn.Linear)


def _recomputes_in_backward(hidden_states: torch.Tensor, module: nn.Module) -> bool:
    """Whether a recomputing function should replace `module`'s stored activations: only while recording gradients."""
    return (
        CavMaeMLP.recompute_activation
        and torch.is_grad_enabled()
        and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters(recurse=False)))
    )


def _norm_linear(norm: nn.Module, linear: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`linear(norm(hidden_states))`, recomputing the normalised states in the backward pass when training."""
    if (
        _recomputes_in_backward(hidden_states, linear)
        and _is_plain(norm, nn.LayerNorm)
        and norm.weight is not None
        and _is_plain_linear(linear)
    ):
        return _LayerNormLinearFunction.apply(hidden_states, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
    return _apply_linear(linear, norm(hidden_states))


class CavMaeMLP(nn.Module):
    """
    `fc2(act(fc1(x)))`. While gradients are recorded and the activation is the exact GELU, the activation is
    recomputed in the backward pass instead of being stored ([`_GeluLinearFunction`]); likewise the layers' inputs
    to the query/key/value projection and to `fc1` are re-normalised in the backward pass instead of being stored
    ([`_LayerNormLinearFunction`]). Together this cuts the activation memory of training by more than a third for
    ~1-2 % more time. Set `CavMaeMLP.recompute_activation = False` to store everything instead. Inference, and
    modules that are not bare `nn.Linear` / `nn.LayerNorm` (quantised, adapted or hooked), run the plain modules.
    """

    recompute_activation = True

    def __init__(self, config: CavMaeConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self._exact_gelu = config.hidden_act == "gelu"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activate_and_project(_apply_linear(self.fc1, hidden_states))

    def activate_and_project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`fc2(act(h))` for the output `h` of `fc1`."""
        if self._exact_gelu and _recomputes_in_backward(hidden_states, self.fc2) and _is_plain_linear(self.fc2):
            return _GeluLinearFunction.apply(hidden_states, self.fc2.weight, self.fc2.bias)
        return _apply_linear(self.fc2, self.activation(hidden_states))


def _segment_rows(segments) -> list[int]:
    return [batch_size * length for _, batch_size, length in segments]


class CavMaeLayer(GradientCheckpointingLayer):
    """
    Pre-norm transformer layer whose attention and MLP may serve several streams. Each stream in `streams` has
    its own pair of LayerNorms (`layernorm_before[stream]`, `layernorm_after[stream]`): a modality-specific
    layer has one stream, a shared layer three (audio, visual, joint), a decoder layer one (joint).

    Called with `hidden_states` `[B, N, D]` and `stream` a name, it runs one stream. Called with packed rows
    `[R, D]` and `stream` a tuple of `(name, batch_size, length)` segments (rows in that order, each segment a
    stream's `[batch_size, length, D]` flattened), it runs several streams at once: each segment gets its own
    LayerNorms and attends within itself, while the projections and the MLP, whose weights the streams share, run
    once over all rows (larger matrix products, and one weight-gradient product per weight instead of one per
    stream).
    """

    def __init__(self, config: CavMaeConfig, hidden_size: int, num_heads: int, intermediate_size: int, streams):
        super().__init__()
        self.attention = CavMaeAttention(config, hidden_size, num_heads)
        self.mlp = CavMaeMLP(config, hidden_size, intermediate_size)
        self.layernorm_before = nn.ModuleDict({s: nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) for s in streams})
        self.layernorm_after = nn.ModuleDict({s: nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) for s in streams})
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, stream, output_attentions: bool = False):
        if isinstance(stream, str):
            qkv = _norm_linear(self.layernorm_before[stream], self.attention.qkv, hidden_states)
            attention_output, attn_weights = self.attention.attend_projected(qkv, output_attentions)
            hidden_states = hidden_states + self.dropout(attention_output)
            intermediate = _norm_linear(self.layernorm_after[stream], self.mlp.fc1, hidden_states)
            hidden_states = hidden_states + self.dropout(self.mlp.activate_and_project(intermediate))
            return hidden_states, attn_weights
        segments = stream
        normed = _per_segment(self.layernorm_before, hidden_states, segments)
        attention_output, attn_weights = self.attention(normed, output_attentions, segments)
        hidden_states = hidden_states + self.dropout(attention_output)
        normed = _per_segment(self.layernorm_after, hidden_states, segments)
        hidden_states = hidden_states + self.dropout(self.mlp(normed))
        return hidden_states, attn_weights


def _per_segment(norms: nn.ModuleDict, rows: torch.Tensor, segments) -> torch.Tensor:
    """Apply each segment's own LayerNorm to its rows of `rows` `[R, D]`."""
    pieces = rows.split(_segment_rows(segments))
    return torch.cat([norms[name](piece) for piece, (name, _, _) in zip(pieces, segments)])


class CavMaeEmbeddings(nn.Module):
    """
    Patch projection + fixed 2-D sin-cos position embedding + learned modality embedding, for each modality.
    Audio `[B, T, F]` is seen as a one-channel image of height F and width T: its tokens are frequency-major
    (`f * (T / p) + t`). Frames `[B, C, H, W]` give row-major tokens.
    """

    def __init__(self, config: CavMaeConfig):
        super().__init__()
        self.config = config
        size, patch = config.hidden_size, config.patch_size
        self.audio_patch_embeddings = nn.Conv2d(1, size, kernel_size=patch, stride=patch)
        self.visual_patch_embeddings = nn.Conv2d(config.num_channels, size, kernel_size=patch, stride=patch)
        self.audio_position_embeddings = nn.Parameter(torch.zeros(1, config.num_audio_patches, size))
        self.visual_position_embeddings = nn.Parameter(torch.zeros(1, config.num_visual_patches, size))
        self.audio_modality_embedding = nn.Parameter(torch.zeros(1, 1, size))
        self.visual_modality_embedding = nn.Parameter(torch.zeros(1, 1, size))

    def embed_audio(self, input_features: torch.Tensor) -> torch.Tensor:
        """`[B, T, F]` -> `[B, Na, D]`."""
        # Inputs come in float32 from the feature extractor; a model loaded in half precision takes them in its dtype.
        image = spectrogram_to_image(input_features).to(self.audio_patch_embeddings.weight.dtype)
        patches = self.audio_patch_embeddings(image).flatten(2).transpose(1, 2)
        return patches + self.audio_position_embeddings + self.audio_modality_embedding

    def embed_visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, Nv, D]`."""
        pixel_values = pixel_values.to(self.visual_patch_embeddings.weight.dtype)
        patches = self.visual_patch_embeddings(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.visual_position_embeddings + self.visual_modality_embedding


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base
# ----------------------------------------------------------------------------------------------------------------
class CavMaePreTrainedModel(PreTrainedModel):
    config: CavMaeConfig
    config_class = CavMaeConfig
    base_model_prefix = "cav_mae"
    main_input_name = "input_features"
    input_modalities = ("audio", "image")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CavMaeLayer", "CavMaeEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """The reference initialisation: xavier-uniform linears and patch projections (as if linear), zero biases,
        unit LayerNorms, normal(0.02) modality and mask tokens, fixed 2-D sin-cos position embeddings."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CavMaeEmbeddings):
            for projection in (module.audio_patch_embeddings, module.visual_patch_embeddings):
                _init_patch_projection(projection)
            _init_position_embeddings(module.audio_position_embeddings, self.config.audio_grid_size)
            _init_position_embeddings(module.visual_position_embeddings, self.config.visual_grid_size)
            init.normal_(module.audio_modality_embedding, std=std)
            init.normal_(module.visual_modality_embedding, std=std)
        elif isinstance(module, CavMaeDecoder):
            _init_position_embeddings(module.audio_position_embeddings, self.config.audio_grid_size)
            _init_position_embeddings(module.visual_position_embeddings, self.config.visual_grid_size)
            for token in (module.mask_token, module.audio_modality_embedding, module.visual_modality_embedding):
                init.normal_(token, std=std)

    def _freeze_position_embeddings(self):
        trainable = self.config.trainable_position_embeddings
        for name, parameter in self.named_parameters():
            if name.endswith("position_embeddings"):
                parameter.requires_grad_(trainable)

    def post_init(self):
        super().post_init()
        self._freeze_position_embeddings()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameters, so the configured freezing is applied again afterwards.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze_position_embeddings()
        return loaded

    def save_pretrained(self, *args, **kwargs):
        # Every class travels with the saved code, so the checkpoint can name them all for trust_remote_code users.
        if self._auto_class is not None:
            self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(*args, **kwargs)


def _init_patch_projection(projection: nn.Conv2d):
    # The reference initialises the projection like a linear layer and keeps PyTorch's default conv bias.
    if not getattr(projection.weight, "_is_hf_initialized", False):
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    fan_in = projection.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    init.uniform_(projection.bias, -bound, bound)


def _init_position_embeddings(parameter: nn.Parameter, grid: tuple[int, int]):
    table = sincos_2d_position_embeddings(parameter.shape[-1], *grid)
    init.copy_(parameter, table.unsqueeze(0).to(parameter.device, parameter.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _StreamTrace:
    """What a stream collects on its way through layers, when asked for."""

    hidden_states: list | None = None
    attentions: list | None = None

    @classmethod
    def start(cls, output_hidden_states: bool, output_attentions: bool):
        return cls([] if output_hidden_states else None, [] if output_attentions else None)

    def copy(self):
        return _StreamTrace(
            None if self.hidden_states is None else list(self.hidden_states),
            None if self.attentions is None else list(self.attentions),
        )

    def as_tuples(self):
        return (
            None if self.hidden_states is None else tuple(self.hidden_states),
            None if self.attentions is None else tuple(self.attentions),
        )


class CavMaeModel(CavMaePreTrainedModel):
    """
    The CAV-MAE encoder. Audio and frames are embedded, run through their modality-specific layers, then
    through the shared layers as up to three streams: audio alone, visual alone, and joint (audio then visual
    tokens), each with its own LayerNorms and a final LayerNorm (`norm_a`, `norm_v`, `norm` in the reference).
    """

    def __init__(self, config: CavMaeConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = CavMaeEmbeddings(config)
        size, heads, inner = config.hidden_size, config.num_attention_heads, config.intermediate_size
        specific = config.num_modality_specific_layers
        self.audio_layers = nn.ModuleList([CavMaeLayer(config, size, heads, inner, (AUDIO,)) for _ in range(specific)])
        self.visual_layers = nn.ModuleList([CavMaeLayer(config, size, heads, inner, (VISUAL,)) for _ in range(specific)])
        self.shared_layers = nn.ModuleList(
            [CavMaeLayer(config, size, heads, inner, (AUDIO, VISUAL, JOINT)) for _ in range(config.num_shared_layers)]
        )
        self.final_layernorm = nn.ModuleDict(
            {s: nn.LayerNorm(size, eps=config.layer_norm_eps) for s in (AUDIO, VISUAL, JOINT)}
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.audio_patch_embeddings

    # Building blocks shared by every head -------------------------------------------------------------------
    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, N, D]` of `input_features` (`modality="audio"`) or `pixel_values` (`"visual"`)."""
        if modality == AUDIO:
            return self.embeddings.embed_audio(inputs)
        return self.embeddings.embed_visual(inputs)

    def encode_modality(self, tokens: torch.Tensor, modality: str, trace: _StreamTrace | None = None) -> torch.Tensor:
        """Run `tokens` `[B, N, D]` through the modality-specific layers of `modality`."""
        layers = self.audio_layers if modality == AUDIO else self.visual_layers
        return self._run_layers(layers, tokens, modality, trace)

    def encode_shared(self, tokens: torch.Tensor, stream: str, trace: _StreamTrace | None = None) -> torch.Tensor:
        """Run `tokens` through the shared layers with the LayerNorms of `stream`, then its final LayerNorm."""
        tokens = self._run_layers(self.shared_layers, tokens, stream, trace)
        return self.final_layernorm[stream](tokens)

    def encode_shared_streams(self, streams, traces=None) -> list:
        """
        Run several streams through the shared layers at once: `streams` is a sequence of `(tokens [B, N, D], name)`
        (names may repeat); returns each stream's output after its final LayerNorm, as [`encode_shared`] would.
        The streams are packed as rows, so that the shared projections and MLPs run as one matrix product per weight
        (see [`CavMaeLayer`]). `traces` (one per stream, or None) collect hidden states / attention weights.
        """
        streams = list(streams)
        traces = list(traces) if traces is not None else [None] * len(streams)
        if len(streams) == 1:
            (tokens, name), trace = streams[0], traces[0]
            return [self.encode_shared(tokens, name, trace)]
        segments = tuple((name, tokens.shape[0], tokens.shape[1]) for tokens, name in streams)
        traces = [trace or _StreamTrace() for trace in traces]
        output_attentions = any(trace.attentions is not None for trace in traces)
        for (tokens, _), trace in zip(streams, traces):
            if trace.hidden_states is not None and not trace.hidden_states:
                trace.hidden_states.append(tokens)
        rows = torch.cat([tokens.reshape(-1, tokens.shape[-1]) for tokens, _ in streams])
        for layer in self.shared_layers:
            rows, attn_weights = layer(rows, segments, output_attentions)
            pieces = _unpack(rows, segments)
            for index, trace in enumerate(traces):
                if trace.hidden_states is not None:
                    trace.hidden_states.append(pieces[index])
                if trace.attentions is not None:
                    trace.attentions.append(attn_weights[index])
        return [self.final_layernorm[name](piece) for piece, (name, _, _) in zip(_unpack(rows, segments), segments)]

    def _run_layers(self, layers, hidden_states, stream, trace):
        trace = trace or _StreamTrace()
        output_attentions = trace.attentions is not None
        if trace.hidden_states is not None and not trace.hidden_states:
            trace.hidden_states.append(hidden_states)
        for layer in layers:
            hidden_states, attn_weights = layer(hidden_states, stream, output_attentions)
            if trace.hidden_states is not None:
                trace.hidden_states.append(hidden_states)
            if output_attentions:
                trace.attentions.append(attn_weights)
        return hidden_states

    def encode_both_modalities(self, input_features, pixel_values, output_hidden_states=False, output_attentions=False):
        """Embeddings and modality-specific layers of whichever inputs are given: `{modality: (tokens, trace)}`."""
        encoded = {}
        for modality, inputs in ((AUDIO, input_features), (VISUAL, pixel_values)):
            if inputs is not None:
                trace = _StreamTrace.start(output_hidden_states, output_attentions)
                encoded[modality] = (self.encode_modality(self.embed(modality, inputs), modality, trace), trace)
        return encoded

    # Forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> CavMaeModelOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(B, audio_length, num_mel_bins)`, *optional*):
                Normalised log-mel fbank from [`CavMaeFeatureExtractor`].
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)`, *optional*):
                Normalised frames from [`CavMaeFeatureExtractor`].
            output_hidden_states / output_attentions / return_dict: as everywhere in Transformers.

        Either or both modalities may be given; the joint stream (`last_hidden_state`, `pooler_output`) needs both.
        """
        output_hidden_states, output_attentions, return_dict = self._resolve_output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        validate_inputs(self.config, input_features, pixel_values)
        encoded = self.encode_both_modalities(input_features, pixel_values, output_hidden_states, output_attentions)

        # The modality streams and the joint stream go through the shared layers together.
        streams = [(tokens, modality) for modality, (tokens, _) in encoded.items()]
        traces = [trace for _, trace in encoded.values()]
        if len(encoded) == 2:
            joint_trace = _StreamTrace.start(output_hidden_states, output_attentions)
            streams.append((torch.cat([encoded[AUDIO][0], encoded[VISUAL][0]], dim=1), JOINT))
            traces.append(joint_trace)
        stream_outputs = self.encode_shared_streams(streams, traces)

        outputs = {}
        for modality, stream_output, trace in zip(encoded, stream_outputs, traces):
            hidden, attentions = trace.as_tuples()
            outputs[f"{modality}_last_hidden_state"] = stream_output
            outputs[f"{modality}_embeds"] = stream_output.mean(dim=1)
            outputs[f"{modality}_hidden_states"] = hidden
            outputs[f"{modality}_attentions"] = attentions
        if len(encoded) == 2:
            joint_output = stream_outputs[2]
            outputs["last_hidden_state"] = joint_output
            outputs["pooler_output"] = joint_output.mean(dim=1)
            outputs["hidden_states"], outputs["attentions"] = joint_trace.as_tuples()

        result = CavMaeModelOutput(**outputs)
        return result if return_dict else result.to_tuple()

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Pooled audio embeddings `[B, D]` (mean of the audio stream), for retrieval."""
        validate_inputs(self.config, input_features, None)
        tokens = self.encode_modality(self.embed(AUDIO, input_features), AUDIO)
        return self.encode_shared(tokens, AUDIO).mean(dim=1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled visual embeddings `[B, D]` (mean of the visual stream), for retrieval."""
        validate_inputs(self.config, None, pixel_values)
        tokens = self.encode_modality(self.embed(VISUAL, pixel_values), VISUAL)
        return self.encode_shared(tokens, VISUAL).mean(dim=1)

    def _resolve_output_flags(self, output_hidden_states, output_attentions, return_dict):
        config = self.config
        return (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.output_attentions if output_attentions is None else output_attentions,
            config.return_dict if return_dict is None else return_dict,
        )


def _unpack(rows: torch.Tensor, segments) -> list:
    """Packed rows `[R, D]` -> each segment's `[batch_size, length, D]` (views)."""
    return [
        piece.view(batch_size, length, -1)
        for piece, (_, batch_size, length) in zip(rows.split(_segment_rows(segments)), segments)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------
def validate_inputs(config: CavMaeConfig, input_features, pixel_values, allow_frames: bool = False):
    """Raise a `CavMaeInputError` naming the problem when inputs do not fit the configuration."""
    if input_features is None and pixel_values is None:
        raise CavMaeInputError("Give at least one of `input_features` (audio) or `pixel_values` (frames).")
    batch_sizes = {}
    if input_features is not None:
        _check_tensor("input_features", input_features)
        expected = (config.audio_length, config.num_mel_bins)
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != expected:
            raise CavMaeInputError(
                f"`input_features` must have shape (batch, {expected[0]}, {expected[1]}) = (batch, audio_length, "
                f"num_mel_bins) for this model, got {tuple(input_features.shape)}. Use CavMaeFeatureExtractor with "
                f"max_length={expected[0]} and num_mel_bins={expected[1]}."
            )
        batch_sizes["input_features"] = input_features.shape[0]
    if pixel_values is not None:
        _check_tensor("pixel_values", pixel_values)
        expected = (config.num_channels, config.image_size, config.image_size)
        ranks = (4, 5) if allow_frames else (4,)
        if pixel_values.dim() not in ranks or tuple(pixel_values.shape[-3:]) != expected:
            frames_hint = " or (batch, num_frames, C, H, W)" if allow_frames else ""
            raise CavMaeInputError(
                f"`pixel_values` must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}){frames_hint} "
                f"for this model, got {tuple(pixel_values.shape)}."
                + ("" if allow_frames else " Only CavMaeForAudioVisualClassification takes a frame axis.")
            )
        if pixel_values.dim() == 5 and pixel_values.shape[1] == 0:
            raise CavMaeInputError(
                f"`pixel_values` has 0 frames (shape {tuple(pixel_values.shape)}): give at least one frame per clip, "
                "or leave `pixel_values` out for audio-only input."
            )
        batch_sizes["pixel_values"] = pixel_values.shape[0]
    if 0 in batch_sizes.values():
        raise CavMaeInputError("Empty batch: inputs have batch size 0.")
    if len(set(batch_sizes.values())) > 1:
        raise CavMaeInputError(
            f"Audio and frames have different batch sizes: input_features {batch_sizes['input_features']}, "
            f"pixel_values {batch_sizes['pixel_values']}."
        )


def _check_tensor(name: str, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise CavMaeInputError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if not tensor.is_floating_point():
        raise CavMaeInputError(f"`{name}` must be a floating-point tensor, got {tensor.dtype}.")
    if _can_inspect_values() and not bool(torch.isfinite(tensor).all()):
        raise CavMaeInputError(f"`{name}` contains NaN or Inf values.")


# ----------------------------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------------------------
class CavMaeDecoder(nn.Module):
    """
    Reconstructs both modalities from the joint stream of kept tokens: projection to the decoder width, mask
    tokens at removed positions, decoder position and modality embeddings, transformer layers, one prediction
    head per modality.
    """

    def __init__(self, config: CavMaeConfig):
        super().__init__()
        self.config = config
        size = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, size))
        self.audio_position_embeddings = nn.Parameter(torch.zeros(1, config.num_audio_patches, size))
        self.visual_position_embeddings = nn.Parameter(torch.zeros(1, config.num_visual_patches, size))
        self.audio_modality_embedding = nn.Parameter(torch.zeros(1, 1, size))
        self.visual_modality_embedding = nn.Parameter(torch.zeros(1, 1, size))
        self.layers = nn.ModuleList(
            [
                CavMaeLayer(config, size, config.decoder_num_attention_heads, config.decoder_intermediate_size, (JOINT,))
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.audio_prediction = nn.Linear(size, config.patch_size**2)
        self.visual_prediction = nn.Linear(size, config.patch_size**2 * config.num_channels)

    def forward(
        self,
        latent: torch.Tensor,
        num_audio_kept: int,
        audio_ids_restore: torch.Tensor,
        visual_ids_restore: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `latent` `[B, Na_kept + Nv_kept, D]` (kept audio tokens first) -> predicted audio patches `[B, Na, p*p]`
        and visual patches `[B, Nv, p*p*C]`, in patch order.
        """
        hidden = _apply_linear(self.decoder_embed, latent)
        audio = self._restore_order(hidden[:, :num_audio_kept], audio_ids_restore)
        visual = self._restore_order(hidden[:, num_audio_kept:], visual_ids_restore)
        audio = audio + self.audio_position_embeddings + self.audio_modality_embedding
        visual = visual + self.visual_position_embeddings + self.visual_modality_embedding
        hidden = torch.cat([audio, visual], dim=1)
        for layer in self.layers:
            hidden, _ = layer(hidden, JOINT)
        hidden = self.decoder_norm(hidden)
        num_audio = audio_ids_restore.shape[1]
        return (
            _apply_linear(self.audio_prediction, hidden[:, :num_audio]),
            _apply_linear(self.visual_prediction, hidden[:, num_audio:]),
        )

    def _restore_order(self, kept: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens to the kept tokens and gather everything back into patch order."""
        batch_size, num_kept, dim = kept.shape
        mask_tokens = self.mask_token.expand(batch_size, ids_restore.shape[1] - num_kept, dim)
        shuffled = torch.cat([kept, mask_tokens], dim=1)
        return torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))


class CavMaeForPreTraining(CavMaePreTrainedModel):
    """
    CAV-MAE pretraining: masked reconstruction of both modalities from the joint stream, plus InfoNCE between the
    pooled (masked) audio and visual streams. Masking ratios, mode and loss weights are read from the config at
    every call.
    """

    def __init__(self, config: CavMaeConfig):
        super().__init__(config)
        self.cav_mae = CavMaeModel(config)
        self.decoder = CavMaeDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.cav_mae.get_input_embeddings()

    def forward(
        self,
        input_features: torch.Tensor,
        pixel_values: torch.Tensor,
        audio_noise: torch.Tensor | None = None,
        visual_noise: torch.Tensor | None = None,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
    ) -> CavMaeForPreTrainingOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(B, audio_length, num_mel_bins)`): normalised fbank.
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)`): frames.
            audio_noise (`torch.FloatTensor` of shape `(B, Na)`, *optional*): fixes the audio mask: the patches with
                the smallest noise are kept. Without it, uniform noise (structured per `audio_mask_mode`) is drawn.
            visual_noise (`torch.FloatTensor` of shape `(B, Nv)`, *optional*): the same for the frames.
            labels (*optional*): accepted and ignored, so that one labelled dataset serves pretraining and
                fine-tuning (as the reference's data loader does).
        """
        config = self.config
        config.validate_cav_mae()
        return_dict = config.return_dict if return_dict is None else return_dict
        if input_features is None or pixel_values is None:
            raise CavMaeInputError("CavMaeForPreTraining needs both `input_features` and `pixel_values`.")
        validate_inputs(config, input_features, pixel_values)
        if config.mae_loss_weight == 0 and config.contrastive_loss_weight == 0:
            raise CavMaeInputError("mae_loss_weight and contrastive_loss_weight are both 0: there is nothing to train.")
        batch_size = input_features.shape[0]
        audio_noise = self._audio_noise(audio_noise, batch_size, input_features.device)
        visual_noise = self._visual_noise(visual_noise, batch_size, pixel_values.device)

        model = self.cav_mae
        audio, audio_mask, audio_ids_restore, audio_ids_removed = _mask_tokens(
            model.embed(AUDIO, input_features), config.audio_mask_ratio, audio_noise
        )
        visual, visual_mask, visual_ids_restore, visual_ids_removed = _mask_tokens(
            model.embed(VISUAL, pixel_values), config.visual_mask_ratio, visual_noise
        )
        audio = model.encode_modality(audio, AUDIO)
        visual = model.encode_modality(visual, VISUAL)
        outputs = {
            "audio_mask": audio_mask,
            "visual_mask": visual_mask,
            "audio_ids_restore": audio_ids_restore,
            "visual_ids_restore": visual_ids_restore,
        }
        # The joint stream (for the decoder) and the modality streams (for the contrastive loss) share one pass
        # through the shared layers.
        streams = []
        if config.mae_loss_weight != 0:
            streams.append((torch.cat([audio, visual], dim=1), JOINT))
        if config.contrastive_loss_weight != 0:
            streams += [(audio, AUDIO), (visual, VISUAL)]
        stream_outputs = model.encode_shared_streams(streams)
        loss = 0.0
        if config.mae_loss_weight != 0:
            latent = stream_outputs.pop(0)
            audio_logits, visual_logits = self.decoder(latent, audio.shape[1], audio_ids_restore, visual_ids_restore)
            audio_mae_loss = reconstruction_loss(
                spectrogram_to_image(input_features),
                audio_logits,
                audio_mask,
                config.patch_size,
                config.norm_pix_loss,
                audio_ids_removed,
            )
            visual_mae_loss = reconstruction_loss(
                pixel_values, visual_logits, visual_mask, config.patch_size, config.norm_pix_loss, visual_ids_removed
            )
            mae_loss = audio_mae_loss + visual_mae_loss
            loss = loss + config.mae_loss_weight * mae_loss
            outputs.update(
                last_hidden_state=latent,
                audio_logits=audio_logits,
                visual_logits=visual_logits,
                audio_mae_loss=audio_mae_loss,
                visual_mae_loss=visual_mae_loss,
                mae_loss=mae_loss,
            )
        if config.contrastive_loss_weight != 0:
            audio_embeds, visual_embeds = (stream.mean(dim=1) for stream in stream_outputs)
            c_loss, c_accuracy = contrastive_loss(
                audio_embeds,
                visual_embeds,
                config.contrastive_temperature,
                bidirectional=config.bidirectional_contrastive,
                gather_from_all_processes=config.contrastive_negatives == "global",
            )
            loss = loss + config.contrastive_loss_weight * c_loss
            outputs.update(
                audio_embeds=audio_embeds,
                visual_embeds=visual_embeds,
                contrastive_loss=c_loss,
                contrastive_accuracy=c_accuracy,
            )
        result = CavMaeForPreTrainingOutput(loss=loss, **outputs)
        return result if return_dict else result.to_tuple()

    def _audio_noise(self, noise, batch_size, device):
        config = self.config
        if noise is not None:
            return _checked_noise("audio_noise", noise, (batch_size, config.num_audio_patches), device)
        if config.audio_mask_mode == "unstructured":
            return torch.rand(batch_size, config.num_audio_patches, device=device)
        return structured_audio_noise(
            batch_size, config.audio_grid_size, config.audio_mask_ratio, config.audio_mask_mode, device
        )

    def _visual_noise(self, noise, batch_size, device):
        shape = (batch_size, self.config.num_visual_patches)
        if noise is not None:
            return _checked_noise("visual_noise", noise, shape, device)
        return torch.rand(*shape, device=device)


def _checked_noise(name: str, noise: torch.Tensor, shape: tuple[int, int], device) -> torch.Tensor:
    """`noise` on `device` once it is known to be a finite real tensor of `shape` (batch, patches): the mask keeps
    the patches of smallest noise, which NaN (sorted last) or a wrong shape would silently change."""
    if not isinstance(noise, torch.Tensor):
        raise CavMaeInputError(f"`{name}` must be a torch.Tensor of shape {shape}, got {type(noise).__name__}.")
    if tuple(noise.shape) != shape:
        raise CavMaeInputError(f"`{name}` must have shape {shape} (batch, patches), got {tuple(noise.shape)}.")
    if noise.dtype == torch.bool or noise.is_complex():
        raise CavMaeInputError(f"`{name}` must hold real numbers (float or int), got {noise.dtype}.")
    if noise.is_floating_point() and _can_inspect_values() and not bool(torch.isfinite(noise).all()):
        raise CavMaeInputError(f"`{name}` contains NaN or Inf values: the mask it gives would be arbitrary.")
    return noise.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
class CavMaeClassificationHead(nn.Module):
    """LayerNorm + Linear on a pooled stream (`mlp_head` in the reference)."""

    def __init__(self, config: CavMaeConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.dense(self.layernorm(pooled))


class CavMaeForAudioVisualClassification(CavMaePreTrainedModel):
    """
    CAV-MAE with a classification head on a mean-pooled stream, per `config.classification_mode`:

    - `"multimodal"`: the joint stream. Given only one modality, the pooled joint stream (of that modality alone)
      and the pooled modality stream are averaged, as the reference's missing-modality inference.
    - `"audio"` / `"visual"`: the audio / visual stream alone.

    `pixel_values` may carry a frame axis `[B, F, C, H, W]`: each frame is classified with the clip's audio,
    whose modality-specific layers run once per clip, and the per-frame probabilities are averaged.
    """

    def __init__(self, config: CavMaeConfig):
        super().__init__(config)
        self.cav_mae = CavMaeModel(config)
        self.classifier = CavMaeClassificationHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.cav_mae.get_input_embeddings()

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> CavMaeClassifierOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(B, audio_length, num_mel_bins)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, F, C, H, W)`, *optional*).
            labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`,
                *optional*): class indices (single-label), multi-hot targets (multi-label) or values (regression).
        """
        config = self.config
        return_dict = config.return_dict if return_dict is None else return_dict
        validate_inputs(config, input_features, pixel_values, allow_frames=True)
        self._check_mode_inputs(input_features, pixel_values)
        num_frames = pixel_values.shape[1] if pixel_values is not None and pixel_values.dim() == 5 else None
        if num_frames is not None:
            pixel_values = pixel_values.flatten(0, 1)
        if config.classification_mode == AUDIO:
            num_frames = None  # the frames play no part

        pooled = self.pool(input_features, pixel_values, num_frames or 1)
        logits = self.classifier(pooled)
        frame_logits = None
        if num_frames is not None:
            frame_logits = logits.unflatten(0, (-1, num_frames))
            pooled = pooled.unflatten(0, (-1, num_frames))
            logits = self.aggregate_frames(frame_logits)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        result = CavMaeClassifierOutput(loss=loss, logits=logits, frame_logits=frame_logits, pooled_output=pooled)
        return result if return_dict else result.to_tuple()

    def pool(self, input_features, pixel_values, num_frames: int = 1) -> torch.Tensor:
        """
        Pooled features `[B * num_frames, D]` for the head (`[B, D]` in audio mode). `pixel_values` are
        `[B * num_frames, C, H, W]`; the audio modality-specific layers run once per clip.
        """
        mode = self.config.classification_mode
        model = self.cav_mae
        if mode != VISUAL and input_features is not None:
            audio = model.encode_modality(model.embed(AUDIO, input_features), AUDIO)
        else:
            audio = None
        if mode != AUDIO and pixel_values is not None:
            visual = model.encode_modality(model.embed(VISUAL, pixel_values), VISUAL)
        else:
            visual = None
        if mode == AUDIO:
            return model.encode_shared(audio, AUDIO).mean(dim=1)
        if mode == VISUAL:
            return model.encode_shared(visual, VISUAL).mean(dim=1)
        if audio is not None and visual is not None:
            joint = torch.cat([audio.repeat_interleave(num_frames, dim=0), visual], dim=1)
            return model.encode_shared(joint, JOINT).mean(dim=1)
        present, modality = (audio, AUDIO) if audio is not None else (visual, VISUAL)
        joint, alone = model.encode_shared_streams([(present, JOINT), (present, modality)])
        return (joint.mean(dim=1) + alone.mean(dim=1)) / 2

    def _check_mode_inputs(self, input_features, pixel_values):
        mode = self.config.classification_mode
        if mode == AUDIO and input_features is None:
            raise CavMaeInputError("classification_mode='audio' needs `input_features`.")
        if mode == VISUAL and pixel_values is None:
            raise CavMaeInputError("classification_mode='visual' needs `pixel_values`.")

    @property
    def _problem_type(self) -> str:
        if self.config.problem_type is not None:
            return self.config.problem_type
        return "regression" if self.config.num_labels == 1 else "single_label_classification"

    def aggregate_frames(self, frame_logits: torch.Tensor) -> torch.Tensor:
        """
        `[B, F, L]` per-frame logits -> `[B, L]` logits of the frame-averaged probabilities (softmax, or sigmoid
        for multi-label); regression outputs are averaged.
        """
        problem_type = self._problem_type
        if problem_type == "regression":
            return frame_logits.mean(dim=1)
        if problem_type == "multi_label_classification":
            probabilities = torch.sigmoid(frame_logits.float()).mean(dim=1)
            eps = torch.finfo(probabilities.dtype).tiny
            logits = torch.log(probabilities.clamp_min(eps)) - torch.log1p(-probabilities).clamp_min(math.log(eps))
            return logits.to(frame_logits.dtype)
        log_probabilities = torch.log_softmax(frame_logits.float(), dim=-1)
        return (torch.logsumexp(log_probabilities, dim=1) - math.log(frame_logits.shape[1])).to(frame_logits.dtype)

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        The loss of `logits` `[B, num_labels]` against `labels`, per the problem type: class indices `[B]` (or soft
        targets `[B, num_labels]`) for single-label, multi-hot targets `[B, num_labels]` in [0, 1] for multi-label,
        values `[B]` / `[B, num_labels]` for regression. Labels of the wrong shape, batch size or range, or holding
        NaN / Inf, raise a `CavMaeInputError` naming the problem rather than a loss that is silently wrong.
        """
        labels = _checked_labels(labels, logits)
        problem_type = self._problem_type
        if problem_type == "regression":
            return nn.functional.mse_loss(logits, _regression_targets(labels, logits).to(logits.dtype))
        if problem_type == "multi_label_classification":
            return nn.functional.binary_cross_entropy_with_logits(logits, _target_matrix(labels, logits, "Multi-label"))
        if labels.dim() == 2 and labels.is_floating_point() and labels.shape[1] > 1:
            # soft targets (e.g. mixup or label smoothing)
            return nn.functional.cross_entropy(logits, _target_matrix(labels, logits, "Soft-target"))
        return nn.functional.cross_entropy(logits, _class_indices(labels, logits))


IGNORE_INDEX = -100  # cross_entropy's default ignore_index: a clip with this label adds nothing to the loss


def _checked_labels(labels, logits: torch.Tensor) -> torch.Tensor:
    """`labels` as a tensor on the logits' device, after the checks every problem type shares."""
    if not isinstance(labels, torch.Tensor):
        raise CavMaeInputError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_complex():
        raise CavMaeInputError(f"`labels` must hold real numbers, got {labels.dtype}.")
    if labels.dim() == 0 or labels.shape[0] != logits.shape[0]:
        got = tuple(labels.shape)
        raise CavMaeInputError(
            f"`labels` has shape {got} but the batch holds {logits.shape[0]} clip(s): give one label (or one row of "
            "targets) per clip."
        )
    if labels.is_floating_point() and _can_inspect_values() and not bool(torch.isfinite(labels).all()):
        raise CavMaeInputError("`labels` contains NaN or Inf values.")
    return labels.to(logits.device)


def _target_matrix(labels: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Targets `[B, num_labels]` in [0, 1] for a multi-label (BCE) or soft-target (cross-entropy) loss."""
    if labels.shape != logits.shape:
        raise CavMaeInputError(
            f"{kind} `labels` must have shape {tuple(logits.shape)} (batch, num_labels), got {tuple(labels.shape)}."
        )
    targets = labels.to(logits.dtype)
    if _can_inspect_values() and (bool((targets < 0).any()) or bool((targets > 1).any())):
        raise CavMaeInputError(
            f"{kind} `labels` must lie in [0, 1], got values from {float(targets.min()):g} to {float(targets.max()):g}."
        )
    return targets


def _class_indices(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Single-label class indices `[B]` in [0, num_labels) (or `IGNORE_INDEX`) from `[B]` or `[B, 1]` labels."""
    num_labels = logits.shape[1]
    if labels.dim() > 2 or (labels.dim() == 2 and labels.shape[1] != 1):
        raise CavMaeInputError(
            f"Single-label `labels` must be class indices of shape ({logits.shape[0]},), or soft targets of shape "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}. For several labels per clip set "
            "config.problem_type = 'multi_label_classification' and give multi-hot targets."
        )
    indices = labels.reshape(-1)
    if indices.dtype == torch.bool:
        raise CavMaeInputError("Single-label `labels` must be class indices (integers), got bool.")
    if indices.is_floating_point() and _can_inspect_values():
        if not bool((indices == indices.round()).all()):
            raise CavMaeInputError("Single-label `labels` must be whole class indices, got fractional values.")
    indices = indices.long()
    invalid = (indices != IGNORE_INDEX) & ((indices < 0) | (indices >= num_labels))
    if _can_inspect_values() and bool(invalid.any()):
        bad = sorted({int(value) for value in indices[invalid][:5]})
        raise CavMaeInputError(
            f"Single-label `labels` must be class indices in [0, {num_labels - 1}] (or {IGNORE_INDEX} to ignore a "
            f"clip); got {bad}. num_labels is {num_labels}."
        )
    return indices


def _regression_targets(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Regression targets with the logits' shape `[B, num_labels]`, from `[B]` (one output) or `[B, num_labels]`."""
    if labels.shape == logits.shape:
        return labels
    if logits.shape[1] == 1 and labels.dim() == 1:
        return labels.unsqueeze(1)
    raise CavMaeInputError(
        f"Regression `labels` must have shape {tuple(logits.shape)} (batch, num_labels)"
        + (f" or ({logits.shape[0]},)" if logits.shape[1] == 1 else "")
        + f", got {tuple(labels.shape)}."
    )
