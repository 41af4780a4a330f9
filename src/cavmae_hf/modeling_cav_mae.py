"""PyTorch CAV-MAE: Contrastive Audio-Visual Masked Autoencoder (Gong et al., ICLR 2023)."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .kernels_cav_mae import gelu_linear, layer_norm_linear, linear_layer
from .configuration_cav_mae import CavMaeConfig, CavMaeError
from .feature_extraction_cav_mae import CavMaeFeatureExtractor

logger = logging.get_logger(__name__)

AUDIO, VISUAL, JOINT = "audio", "visual", "joint"
STREAMS = (AUDIO, VISUAL, JOINT)

FEATURE_EXTRACTOR_FILE = "preprocessor_config.json"

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_cav_mae.CavMaeConfig",
    "AutoModel": "modeling_cav_mae.CavMaeModel",
    "AutoModelForPreTraining": "modeling_cav_mae.CavMaeForPreTraining",
    "AutoModelForAudioClassification": "modeling_cav_mae.CavMaeForAudioVisualClassification",
}

# Why Transformers' output capturing (`_can_record_outputs` with forward hooks) is not used: the shared layers run the
# audio, visual and joint streams packed into one matrix of rows (see `CavMaeLayer`), so a hook on a layer sees the
# rows of all three streams at once. The encoder collects each stream's hidden states and attention weights itself
# (`_StreamTrace`), and `can_return_tuple` gives the tuple outputs.


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
    Outputs of [`CavMaeModel`]. With B the batch, F the frames per clip (when `pixel_values` has a frame axis, the
    visual and joint entries carry it after the batch axis), Na / Nv the audio / visual tokens (the kept ones when
    masking) and D the hidden size:

    last_hidden_state (`torch.FloatTensor` of shape `(B, [F,] Na + Nv, D)`):
        Joint stream: audio then visual tokens through the shared layers with their joint LayerNorms, then the
        joint final LayerNorm. Computed when both modalities are given (or when `streams` asks for it; with one
        modality it holds that modality's tokens).
    audio_last_hidden_state (`torch.FloatTensor` of shape `(B, Na, D)`):
        Audio stream after the shared layers with their audio LayerNorms, then `norm_a`.
    visual_last_hidden_state (`torch.FloatTensor` of shape `(B, [F,] Nv, D)`):
        Visual stream after the shared layers with their visual LayerNorms, then `norm_v`.
    pooler_output (`torch.FloatTensor` of shape `(B, [F,] D)`): mean of `last_hidden_state` over tokens.
    audio_embeds (`torch.FloatTensor` of shape `(B, D)`): mean of `audio_last_hidden_state` over tokens.
    visual_embeds (`torch.FloatTensor` of shape `(B, [F,] D)`): mean of `visual_last_hidden_state` over tokens.
    hidden_states (`tuple(torch.FloatTensor)`): with `output_hidden_states=True`, those of the first stream of
        `streams` (by default the joint stream when both modalities are given, else the given modality's stream):
        its embeddings and the output of every layer on its way (modality-specific layers, then shared layers),
        `num_hidden_layers + 1` tensors. The joint stream's entries before the shared layers are the audio and
        visual tokens side by side. The modality streams' own are returned by `get_audio_features` /
        `get_image_features`.
    attentions (`tuple(torch.FloatTensor)`): with `output_attentions=True` (eager attention is used then), the
        attention weights `(B, [F,] heads, N, N)` of every layer on the same stream's way. In the joint stream the
        modality-specific layers attend within each modality, so their weights are block-diagonal.
    audio_mask, visual_mask (`torch.FloatTensor` of shape `(B, all audio / visual patches)`):
        When masking: 1 for removed patches, in patch order.
    audio_ids_restore, visual_ids_restore (`torch.LongTensor` of the same shapes):
        When masking: the permutation that puts the shuffled (kept then removed) tokens back in patch order.
    """

    last_hidden_state: torch.FloatTensor | None = None
    audio_last_hidden_state: torch.FloatTensor | None = None
    visual_last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    visual_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_mask: torch.FloatTensor | None = None
    visual_mask: torch.FloatTensor | None = None
    audio_ids_restore: torch.LongTensor | None = None
    visual_ids_restore: torch.LongTensor | None = None


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
    hidden_states, attentions (`tuple(torch.FloatTensor)`): with `output_hidden_states` / `output_attentions`, those
        of the encoder's joint stream of kept tokens (see [`CavMaeModelOutput`]).
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
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CavMaeClassifierOutput(ModelOutput):
    r"""
    Outputs of [`CavMaeForAudioVisualClassification`].

    loss (`torch.FloatTensor` of shape `()`): loss following `config.problem_type`, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(B, num_labels)`): class scores. With several frames per clip these are
        the aggregated scores: the per-frame probabilities (softmax, or sigmoid for multi-label) are averaged and
        mapped back to logits, so that `softmax(logits)` / `sigmoid(logits)` is the frame-averaged probability.
    frame_logits (`torch.FloatTensor` of shape `(B, F, num_labels)`): per-frame scores, when `pixel_values` has a
        frame axis. Left out of `Trainer`'s predictions (`config.keys_to_ignore_at_inference`).
    hidden_states, attentions (`tuple(torch.FloatTensor)`): with `output_hidden_states` / `output_attentions`, those
        of the stream the head classifies (see [`CavMaeModelOutput`]).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    frame_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


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
    dim = tokens.shape[-1]
    num_kept = num_kept_tokens(tokens.shape[1], mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(tokens, 1, ids_shuffle[:, :num_kept].unsqueeze(-1).expand(-1, -1, dim))
    mask = (ids_restore >= num_kept).to(tokens.dtype)
    return kept, mask, ids_restore


def num_kept_tokens(length: int, mask_ratio: float) -> int:
    return int(length * (1 - mask_ratio))


def removed_patch_ids(ids_restore: torch.Tensor, num_kept: int) -> torch.Tensor:
    """The indices `[B, N - num_kept]` of the removed patches, from a masking's `ids_restore` (its inverse is the
    shuffle: kept tokens first)."""
    return torch.argsort(ids_restore, dim=1)[:, num_kept:]


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


@dataclass(frozen=True)
class Segment:
    """`batch_size * length` consecutive rows of a packed matrix that belong to one stream `[batch_size, length, D]`."""

    stream: str
    batch_size: int
    length: int

    @property
    def rows(self) -> int:
        return self.batch_size * self.length


def pack(streams: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, tuple[Segment, ...]]:
    """`[(tokens [B, N, D], stream name), ...]` -> (rows `[sum of B * N, D]`, their segments)."""
    segments = tuple(Segment(name, tokens.shape[0], tokens.shape[1]) for tokens, name in streams)
    if len(streams) == 1:
        return streams[0][0].reshape(-1, streams[0][0].shape[-1]), segments
    return torch.cat([tokens.reshape(-1, tokens.shape[-1]) for tokens, _ in streams]), segments


def unpack(rows: torch.Tensor, segments: Sequence[Segment]) -> list[torch.Tensor]:
    """Inverse of [`pack`]: each segment's `[batch_size, length, D]` (views of `rows`)."""
    pieces = rows.split([segment.rows for segment in segments])
    return [piece.view(segment.batch_size, segment.length, -1) for piece, segment in zip(pieces, segments)]


class CavMaeAttention(nn.Module):
    """
    Multi-head self-attention with a fused query/key/value projection (the checkpoints' layout), over packed rows:
    the projections run once over the rows of every segment, attention within each segment.
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

    def forward(self, qkv: torch.Tensor, segments: Sequence[Segment], output_attentions: bool = False):
        """
        Projected rows `qkv` `[R, 3 * D]` -> (`[R, D]`, a tuple of each segment's attention weights
        `[batch_size, heads, length, length]` or None).
        """
        outputs, weights = [], []
        for piece, segment in zip(unpack(qkv, segments), segments):
            attn_output, attn_weights = self._attend(piece, output_attentions)
            outputs.append(attn_output.reshape(segment.rows, -1))
            weights.append(attn_weights)
        attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return linear_layer(self.proj, attn_output), (tuple(weights) if output_attentions else None)

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


class CavMaeMLP(nn.Module):
    """`fc2(act(fc1(x)))`; see `kernels_cav_mae.py` for how the products run and what is kept for the backward pass."""

    def __init__(self, config: CavMaeConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activate_and_project(linear_layer(self.fc1, hidden_states))

    def activate_and_project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`fc2(act(h))` for the output `h` of `fc1`."""
        return gelu_linear(self.fc2, hidden_states, self.activation)


class CavMaeLayer(GradientCheckpointingLayer):
    """
    Pre-norm transformer layer whose attention and MLP may serve several streams. Each stream in `streams` has its
    own pair of LayerNorms (`layernorm_before[stream]`, `layernorm_after[stream]`): a modality-specific layer has one
    stream, a shared layer three (audio, visual, joint), a decoder layer one (joint).

    It takes packed rows `[R, D]` and their [`Segment`]s (see [`pack`]): each segment gets its stream's LayerNorms
    and attends within itself, while the projections and the MLP, whose weights the streams share, run once over all
    rows (larger matrix products, and one weight-gradient product per weight instead of one per stream).
    """

    def __init__(self, config: CavMaeConfig, hidden_size: int, num_heads: int, intermediate_size: int, streams):
        super().__init__()
        self.attention = CavMaeAttention(config, hidden_size, num_heads)
        self.mlp = CavMaeMLP(config, hidden_size, intermediate_size)
        self.layernorm_before = nn.ModuleDict({s: nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) for s in streams})
        self.layernorm_after = nn.ModuleDict({s: nn.LayerNorm(hidden_size, eps=config.layer_norm_eps) for s in streams})
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, segments: Sequence[Segment], output_attentions: bool = False):
        """Rows `[R, D]` -> (rows `[R, D]`, each segment's attention weights or None)."""
        qkv = self._norm_linear(self.layernorm_before, self.attention.qkv, hidden_states, segments)
        attention_output, attn_weights = self.attention(qkv, segments, output_attentions)
        hidden_states = hidden_states + self.dropout(attention_output)
        intermediate = self._norm_linear(self.layernorm_after, self.mlp.fc1, hidden_states, segments)
        hidden_states = hidden_states + self.dropout(self.mlp.activate_and_project(intermediate))
        return hidden_states, attn_weights

    @staticmethod
    def _norm_linear(norms: nn.ModuleDict, linear: nn.Linear, rows: torch.Tensor, segments) -> torch.Tensor:
        """`linear` of the rows, each segment normalised by its own stream's LayerNorm."""
        if len(segments) == 1:
            return layer_norm_linear(norms[segments[0].stream], linear, rows)
        pieces = rows.split([segment.rows for segment in segments])
        normed = torch.cat([norms[segment.stream](piece) for piece, segment in zip(pieces, segments)])
        return linear_layer(linear, normed)


class CavMaeEmbeddings(nn.Module):
    """
    Patch projection + fixed 2-D sin-cos position embedding + learned modality embedding, for each modality, and
    the random masking of pretraining. Audio `[B, T, F]` is seen as a one-channel image of height F and width T: its
    tokens are frequency-major (`f * (T / p) + t`). Frames `[B, C, H, W]` give row-major tokens.
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

    def embed(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, N, D]` of `input_features` `[B, T, F]` (`modality="audio"`) or `pixel_values` `[B, C, H, W]`."""
        if modality == AUDIO:
            projection, position, kind = (
                self.audio_patch_embeddings,
                self.audio_position_embeddings,
                self.audio_modality_embedding,
            )
            inputs = spectrogram_to_image(inputs)
        else:
            projection, position, kind = (
                self.visual_patch_embeddings,
                self.visual_position_embeddings,
                self.visual_modality_embedding,
            )
        # Inputs come in float32 from the feature extractor; a model loaded in half precision takes them in its dtype.
        patches = projection(inputs.to(projection.weight.dtype)).flatten(2).transpose(1, 2)
        return patches + position + kind

    def mask(self, modality: str, tokens: torch.Tensor, noise: torch.Tensor | None):
        """
        Pretraining's masking of `tokens` `[B, N, D]`: the `int(N * (1 - ratio))` tokens of smallest `noise` `[B, N]`
        are kept (`audio_mask_ratio` / `visual_mask_ratio`); without `noise`, uniform noise is drawn (for audio,
        structured per `audio_mask_mode`). Returns (kept `[B, N_keep, D]`, mask `[B, N]` with 1 = removed,
        ids_restore `[B, N]`).
        """
        config = self.config
        ratio = config.audio_mask_ratio if modality == AUDIO else config.visual_mask_ratio
        batch_size, length = tokens.shape[:2]
        if noise is not None:
            noise = _checked_noise(f"{modality}_noise", noise, (batch_size, length), tokens.device)
        elif modality == AUDIO and config.audio_mask_mode != "unstructured":
            noise = structured_audio_noise(
                batch_size, config.audio_grid_size, ratio, config.audio_mask_mode, tokens.device
            )
        else:
            noise = torch.rand(batch_size, length, device=tokens.device)
        return mask_tokens(tokens, ratio, noise)


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

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        config = self.config
        return {
            "input_features": torch.zeros(2, config.audio_length, config.num_mel_bins, device=self.device),
            "pixel_values": torch.zeros(
                2, config.num_channels, config.image_size, config.image_size, device=self.device
            ),
        }

    def frozen_parameter_names(self) -> set[str]:
        """
        Parameters this model keeps out of training. The sin-cos position embeddings, unless
        `config.trainable_position_embeddings` (the reference freezes them in pretraining and trains them when
        fine-tuning). Subclasses add the parameters their training cannot reach.
        """
        if self.config.trainable_position_embeddings:
            return set()
        return {name for name, _ in self.named_parameters() if name.endswith("position_embeddings")}

    def freeze_parameters(self):
        """Apply [`frozen_parameter_names`]: those parameters stop requiring gradients, all others require them."""
        frozen = self.frozen_parameter_names()
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name not in frozen)

    def post_init(self):
        super().post_init()
        self.freeze_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameters, so the configured freezing is applied again afterwards.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_parameters()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every class travels with the saved code, so the checkpoint can name them all for trust_remote_code users,
        # and so does the pipeline code, which `transformers.pipeline(..., trust_remote_code=True)` finds through
        # `custom_pipelines`.
        if self._auto_class is not None:
            self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
            self.config.custom_pipelines = REMOTE_CODE_PIPELINES
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:
            _copy_remote_pipeline_code(save_directory)
        _save_fitting_feature_extractor(self.config, save_directory)
        return result


# The pipelines as remote code: the module and the files it imports travel with every checkpoint (see
# `save_pretrained`). When `import cavmae_hf` has registered the same tasks, `CavMaeConfig.custom_pipelines` is
# empty, so that the installed pipelines serve (no trust_remote_code needed).
REMOTE_CODE_PIPELINES = {
    "audio-visual-classification": {
        "impl": "pipelines.AudioVisualClassificationPipeline",
        "pt": ["AutoModelForAudioClassification"],
        "tf": [],
        "type": "multimodal",
    },
    "audio-visual-feature-extraction": {
        "impl": "pipelines.AudioVisualFeatureExtractionPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    },
}


def _save_fitting_feature_extractor(config: CavMaeConfig, save_directory):
    """A `preprocessor_config.json` that fits the model, unless the directory has one (e.g. the `processing_class` a
    `Trainer` saves next to it), so that `AutoFeatureExtractor.from_pretrained` works on every saved model."""
    from pathlib import Path

    if not (Path(save_directory) / FEATURE_EXTRACTOR_FILE).is_file():
        CavMaeFeatureExtractor.from_model_config(config).save_pretrained(save_directory)


def _copy_remote_pipeline_code(save_directory):
    import shutil
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_import_files

    here = Path(__file__).resolve().parent
    pipeline_file = here / "pipelines.py"
    if not pipeline_file.is_file():  # a copy loaded as remote code that was saved without its pipelines
        return
    for source in [pipeline_file, *map(Path, get_relative_import_files(pipeline_file))]:
        shutil.copyfile(source, Path(save_directory) / source.name)


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

    def record(self, hidden_states: torch.Tensor | None = None, attentions: torch.Tensor | None = None):
        if self.hidden_states is not None and hidden_states is not None:
            self.hidden_states.append(hidden_states)
        if self.attentions is not None and attentions is not None:
            self.attentions.append(attentions)

    def as_tuples(self, reshape=None):
        reshape = reshape or (lambda tensor: tensor)
        return tuple(
            None if entries is None else tuple(reshape(entry) for entry in entries)
            for entries in (self.hidden_states, self.attentions)
        )


def _joint_trace(traces: dict, num_frames: int | None, output_hidden_states: bool, output_attentions: bool):
    """The joint stream's trace before the shared layers: the modality streams' entries side by side (the audio
    repeated for each frame), their attention weights block-diagonal."""
    trace = _StreamTrace.start(output_hidden_states, output_attentions)
    modalities = [m for m in (AUDIO, VISUAL) if m in traces]

    def side_by_side(entries, combine):
        if len(entries) == 2 and num_frames is not None:
            entries = (entries[0].repeat_interleave(num_frames, dim=0), entries[1])
        return combine(list(entries))

    if output_hidden_states:
        for entries in zip(*(traces[m].hidden_states for m in modalities)):
            trace.hidden_states.append(side_by_side(entries, lambda parts: torch.cat(parts, dim=1)))
    if output_attentions:
        for entries in zip(*(traces[m].attentions for m in modalities)):
            trace.attentions.append(side_by_side(entries, _block_diagonal))
    return trace


def _block_diagonal(weights: list[torch.Tensor]) -> torch.Tensor:
    """`[B, H, n_i, n_i]` attention weights -> `[B, H, sum n_i, sum n_i]` with the blocks on the diagonal."""
    if len(weights) == 1:
        return weights[0]
    total = sum(w.shape[-1] for w in weights)
    combined = weights[0].new_zeros(*weights[0].shape[:2], total, total)
    start = 0
    for block in weights:
        size = block.shape[-1]
        combined[..., start : start + size, start : start + size] = block
        start += size
    return combined


class CavMaeModel(CavMaePreTrainedModel):
    """
    The CAV-MAE encoder. Audio and frames are embedded, run through their modality-specific layers, then through the
    shared layers as up to three streams: audio alone, visual alone, and joint (audio then visual tokens), each with
    its own LayerNorms and a final LayerNorm (`norm_a`, `norm_v`, `norm` in the reference).

    Several frames per clip (`pixel_values` `[B, F, C, H, W]`) are encoded with the clip's audio, whose
    modality-specific layers run once per clip; the visual and joint outputs then carry the frame axis. Pretraining's
    masking happens here too (`apply_masking`, `audio_noise` / `visual_noise`).
    """

    # a pretraining or classification checkpoint loads into the encoder without its decoder / head being reported
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^classifier\."]

    def __init__(self, config: CavMaeConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = CavMaeEmbeddings(config)
        size, heads, inner = config.hidden_size, config.num_attention_heads, config.intermediate_size
        specific = config.num_modality_specific_layers
        self.audio_layers = nn.ModuleList([CavMaeLayer(config, size, heads, inner, (AUDIO,)) for _ in range(specific)])
        self.visual_layers = nn.ModuleList([CavMaeLayer(config, size, heads, inner, (VISUAL,)) for _ in range(specific)])
        self.shared_layers = nn.ModuleList(
            [CavMaeLayer(config, size, heads, inner, STREAMS) for _ in range(config.num_shared_layers)]
        )
        self.final_layernorm = nn.ModuleDict({s: nn.LayerNorm(size, eps=config.layer_norm_eps) for s in STREAMS})
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.audio_patch_embeddings

    @can_return_tuple
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        audio_noise: torch.Tensor | None = None,
        visual_noise: torch.Tensor | None = None,
        apply_masking: bool = False,
        streams: Sequence[str] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> CavMaeModelOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(B, audio_length, num_mel_bins)`, *optional*):
                Normalised log-mel fbank from [`CavMaeFeatureExtractor`].
            pixel_values (`torch.FloatTensor` of shape `(B, num_channels, image_size, image_size)` or
                `(B, F, num_channels, image_size, image_size)`, *optional*): normalised frames from
                [`CavMaeFeatureExtractor`], one or `F` per clip.
            audio_noise (`torch.FloatTensor` of shape `(B, num_audio_patches)`, *optional*): masks the audio tokens,
                keeping the `int(N * (1 - audio_mask_ratio))` of smallest noise. Implies `apply_masking`.
            visual_noise (`torch.FloatTensor` of shape `(B, num_visual_patches)`, *optional*): the same for frames.
            apply_masking (`bool`, *optional*, defaults to `False`): mask the tokens as in pretraining, with the
                noise given or, without it, noise drawn at random (structured for audio per `audio_mask_mode`).
            streams (`Sequence[str]`, *optional*): which streams to run through the shared layers, of `"joint"`,
                `"audio"` and `"visual"`; `hidden_states` / `attentions` are those of the first. Default: the joint
                stream when both modalities are given, then the modality streams of the given inputs. Streams not
                asked for are `None` in the output and cost nothing.
            output_hidden_states / output_attentions / return_dict: as everywhere in Transformers.
        """
        output_hidden_states, output_attentions = self._resolve_output_flags(output_hidden_states, output_attentions)
        validate_inputs(self.config, input_features, pixel_values, allow_frames=True)
        inputs = {m: x for m, x in ((AUDIO, input_features), (VISUAL, pixel_values)) if x is not None}
        streams = _checked_streams(streams, inputs)
        if JOINT not in streams:  # a modality no stream asked for is not encoded
            inputs = {m: x for m, x in inputs.items() if m in streams}
        num_frames = pixel_values.shape[1] if VISUAL in inputs and pixel_values.dim() == 5 else None
        if num_frames is not None:
            inputs[VISUAL] = pixel_values.flatten(0, 1)
        noises = {AUDIO: audio_noise, VISUAL: visual_noise}
        masking = apply_masking or audio_noise is not None or visual_noise is not None
        if masking and num_frames is not None:
            raise CavMaeInputError("Masking takes one frame per clip: give `pixel_values` of shape (B, C, H, W).")

        # hidden states and attention weights are collected for the first stream only (the one the output reports)
        first = streams[0]
        traced = {first} if first != JOINT else set(inputs)
        tokens, traces, outputs = {}, {}, {}
        for modality in inputs:
            embedded = self.embeddings.embed(modality, inputs[modality])
            if masking:
                embedded, outputs[f"{modality}_mask"], outputs[f"{modality}_ids_restore"] = self.embeddings.mask(
                    modality, embedded, noises[modality]
                )
            traces[modality] = _StreamTrace.start(
                output_hidden_states and modality in traced, output_attentions and modality in traced
            )
            layers = self.audio_layers if modality == AUDIO else self.visual_layers
            tokens[modality] = self._run_layers(layers, embedded, modality, traces[modality])
        if first == JOINT:
            traces[JOINT] = _joint_trace(traces, num_frames, output_hidden_states, output_attentions)

        shared_inputs = [(_joint_tokens(tokens, num_frames) if s == JOINT else tokens[s], s) for s in streams]
        shared_traces = [traces[first]] + [_StreamTrace() for _ in streams[1:]]
        stream_outputs = self.encode_shared_streams(shared_inputs, shared_traces)

        per_frame = (lambda t: t.unflatten(0, (-1, num_frames))) if num_frames is not None else (lambda t: t)
        for stream, output in zip(streams, stream_outputs):
            reshape = (lambda t: t) if stream == AUDIO else per_frame
            prefix = "" if stream == JOINT else f"{stream}_"
            outputs[f"{prefix}last_hidden_state"] = reshape(output)
            outputs["pooler_output" if stream == JOINT else f"{stream}_embeds"] = reshape(output.mean(dim=1))
        outputs["hidden_states"], outputs["attentions"] = traces[first].as_tuples(per_frame if first != AUDIO else None)
        return CavMaeModelOutput(**outputs)

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        The audio stream of `input_features` `(B, audio_length, num_mel_bins)`, as CLIP's / CLAP's
        `get_*_features`: `last_hidden_state` `(B, Na, D)`, `pooler_output` `(B, D)` (the mean-pooled audio
        embedding used for retrieval), and with the flags `hidden_states` / `attentions`.
        """
        return self._stream_features(AUDIO, input_features, output_hidden_states, output_attentions)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        The visual stream of `pixel_values` `(B, [F,] C, H, W)`: `last_hidden_state` `(B, [F,] Nv, D)`,
        `pooler_output` `(B, [F,] D)` (the mean-pooled visual embedding of each frame, used for retrieval), and with
        the flags `hidden_states` / `attentions`.
        """
        return self._stream_features(VISUAL, pixel_values, output_hidden_states, output_attentions)

    def _stream_features(self, modality: str, inputs, output_hidden_states, output_attentions):
        name = "input_features" if modality == AUDIO else "pixel_values"
        if inputs is None:
            raise CavMaeInputError(f"get_{'audio' if modality == AUDIO else 'image'}_features needs `{name}`.")
        out = self.forward(
            **{name: inputs},
            streams=(modality,),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=getattr(out, f"{modality}_last_hidden_state"),
            pooler_output=getattr(out, f"{modality}_embeds"),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    # Building blocks ------------------------------------------------------------------------------------------
    def encode_shared_streams(self, streams, traces=None) -> list[torch.Tensor]:
        """
        Run streams through the shared layers at once, then each through its final LayerNorm: `streams` is a sequence
        of `(tokens [B, N, D], name)` (names may repeat). The streams are packed as rows (see [`CavMaeLayer`]), so
        that the shared projections and MLPs run as one matrix product per weight. `traces` (one per stream, or None)
        collect hidden states / attention weights.
        """
        streams = list(streams)
        traces = list(traces) if traces is not None else [_StreamTrace() for _ in streams]
        for (tokens, _), trace in zip(streams, traces):
            if trace.hidden_states is not None and not trace.hidden_states:
                trace.record(hidden_states=tokens)
        rows, segments = pack(streams)
        output_attentions = any(trace.attentions is not None for trace in traces)
        for layer in self.shared_layers:
            rows, attn_weights = layer(rows, segments, output_attentions)
            for index, (piece, trace) in enumerate(zip(unpack(rows, segments), traces)):
                trace.record(piece, attn_weights[index] if attn_weights is not None else None)
        return [self.final_layernorm[s.stream](piece) for piece, s in zip(unpack(rows, segments), segments)]

    def _run_layers(self, layers, hidden_states: torch.Tensor, stream: str, trace: _StreamTrace) -> torch.Tensor:
        """`hidden_states` `[B, N, D]` through `layers` (one stream), recording into `trace`."""
        trace.record(hidden_states=hidden_states)
        rows, segments = pack([(hidden_states, stream)])
        output_attentions = trace.attentions is not None
        for layer in layers:
            rows, attn_weights = layer(rows, segments, output_attentions)
            trace.record(rows.view_as(hidden_states), attn_weights[0] if attn_weights is not None else None)
        return rows.view_as(hidden_states)

    def _resolve_output_flags(self, output_hidden_states, output_attentions):
        config = self.config
        return (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.output_attentions if output_attentions is None else output_attentions,
        )


def _checked_streams(streams, inputs: dict) -> tuple[str, ...]:
    if streams is None:
        return ((JOINT,) if len(inputs) == 2 else ()) + tuple(inputs)
    streams = tuple(streams)
    unknown = [s for s in streams if s not in STREAMS]
    if unknown or not streams or len(set(streams)) != len(streams):
        raise CavMaeInputError(f"`streams` must be distinct names of {STREAMS}, got {streams!r}.")
    missing = [s for s in streams if s != JOINT and s not in inputs]
    if missing:
        needed = {AUDIO: "input_features", VISUAL: "pixel_values"}
        raise CavMaeInputError(f"The {missing[0]} stream needs `{needed[missing[0]]}`.")
    return streams


def _joint_tokens(tokens: dict, num_frames: int | None) -> torch.Tensor:
    """The joint stream's input: audio then visual tokens (the audio repeated for each frame), or the one given."""
    if len(tokens) == 1:
        return next(iter(tokens.values()))
    audio = tokens[AUDIO] if num_frames is None else tokens[AUDIO].repeat_interleave(num_frames, dim=0)
    return torch.cat([audio, tokens[VISUAL]], dim=1)


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
                + ("" if allow_frames else " Pretraining takes one frame per clip.")
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
        hidden = linear_layer(self.decoder_embed, latent)
        audio = self._restore_order(hidden[:, :num_audio_kept], audio_ids_restore)
        visual = self._restore_order(hidden[:, num_audio_kept:], visual_ids_restore)
        audio = audio + self.audio_position_embeddings + self.audio_modality_embedding
        visual = visual + self.visual_position_embeddings + self.visual_modality_embedding
        hidden = torch.cat([audio, visual], dim=1)
        rows, segments = pack([(hidden, JOINT)])
        for layer in self.layers:
            rows, _ = layer(rows, segments)
        hidden = self.decoder_norm(rows.view_as(hidden))
        num_audio = audio_ids_restore.shape[1]
        return (
            linear_layer(self.audio_prediction, hidden[:, :num_audio]),
            linear_layer(self.visual_prediction, hidden[:, num_audio:]),
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

    @can_return_tuple
    def forward(
        self,
        input_features: torch.Tensor,
        pixel_values: torch.Tensor,
        audio_noise: torch.Tensor | None = None,
        visual_noise: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
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
            output_hidden_states / output_attentions / return_dict: as everywhere in Transformers.
        """
        config = self.config
        config.validate_cav_mae()
        if input_features is None or pixel_values is None:
            raise CavMaeInputError("CavMaeForPreTraining needs both `input_features` and `pixel_values`.")
        validate_inputs(config, input_features, pixel_values)
        if config.mae_loss_weight == 0 and config.contrastive_loss_weight == 0:
            raise CavMaeInputError("mae_loss_weight and contrastive_loss_weight are both 0: there is nothing to train.")
        # The joint stream (for the decoder) and the modality streams (for the contrastive loss) share one pass
        # through the shared layers; a loss of weight 0 does not run its streams.
        streams = ((JOINT,) if config.mae_loss_weight != 0 else ()) + (
            (AUDIO, VISUAL) if config.contrastive_loss_weight != 0 else ()
        )
        encoded = self.cav_mae(
            input_features=input_features,
            pixel_values=pixel_values,
            audio_noise=audio_noise,
            visual_noise=visual_noise,
            apply_masking=True,
            streams=streams,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        outputs = {
            name: getattr(encoded, name)
            for name in ("audio_mask", "visual_mask", "audio_ids_restore", "visual_ids_restore", "hidden_states", "attentions")
        }
        loss = 0.0
        if config.mae_loss_weight != 0:
            mae = self._reconstruction(encoded, input_features, pixel_values)
            loss = loss + config.mae_loss_weight * mae["mae_loss"]
            outputs.update(mae, last_hidden_state=encoded.last_hidden_state)
        if config.contrastive_loss_weight != 0:
            c_loss, c_accuracy = contrastive_loss(
                encoded.audio_embeds,
                encoded.visual_embeds,
                config.contrastive_temperature,
                bidirectional=config.bidirectional_contrastive,
                gather_from_all_processes=config.contrastive_negatives == "global",
            )
            loss = loss + config.contrastive_loss_weight * c_loss
            outputs.update(
                audio_embeds=encoded.audio_embeds,
                visual_embeds=encoded.visual_embeds,
                contrastive_loss=c_loss,
                contrastive_accuracy=c_accuracy,
            )
        return CavMaeForPreTrainingOutput(loss=loss, **outputs)

    def _reconstruction(self, encoded: CavMaeModelOutput, input_features, pixel_values) -> dict:
        """The decoder's patches and the reconstruction losses on the removed patches."""
        config = self.config
        num_audio_kept = num_kept_tokens(config.num_audio_patches, config.audio_mask_ratio)
        num_visual_kept = num_kept_tokens(config.num_visual_patches, config.visual_mask_ratio)
        audio_logits, visual_logits = self.decoder(
            encoded.last_hidden_state, num_audio_kept, encoded.audio_ids_restore, encoded.visual_ids_restore
        )
        audio_mae_loss = reconstruction_loss(
            spectrogram_to_image(input_features),
            audio_logits,
            encoded.audio_mask,
            config.patch_size,
            config.norm_pix_loss,
            removed_patch_ids(encoded.audio_ids_restore, num_audio_kept),
        )
        visual_mae_loss = reconstruction_loss(
            pixel_values,
            visual_logits,
            encoded.visual_mask,
            config.patch_size,
            config.norm_pix_loss,
            removed_patch_ids(encoded.visual_ids_restore, num_visual_kept),
        )
        return {
            "audio_logits": audio_logits,
            "visual_logits": visual_logits,
            "audio_mae_loss": audio_mae_loss,
            "visual_mae_loss": visual_mae_loss,
            "mae_loss": audio_mae_loss + visual_mae_loss,
        }


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
    CAV-MAE with a classification head on a mean-pooled stream of [`CavMaeModel`], per `config.classification_mode`:

    - `"multimodal"`: the joint stream. Given only one modality, the pooled joint stream (of that modality alone)
      and the pooled modality stream are averaged, as the reference's missing-modality inference.
    - `"audio"` / `"visual"`: the audio / visual stream alone.

    `pixel_values` may carry a frame axis `[B, F, C, H, W]`: each frame is classified with the clip's audio, whose
    modality-specific layers run once per clip, and the per-frame probabilities are averaged.

    Parameters that training in the configured mode cannot reach do not require gradients (see
    [`frozen_parameter_names`]): they keep their pretrained values, as they did in the reference's fine-tuning, and
    distributed training needs no `find_unused_parameters`. Set `classification_mode` before loading the model.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: CavMaeConfig):
        super().__init__(config)
        self.cav_mae = CavMaeModel(config)
        self.classifier = CavMaeClassificationHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.cav_mae.get_input_embeddings()

    def frozen_parameter_names(self) -> set[str]:
        """
        Besides the position embeddings: in `"multimodal"` mode, the audio and visual LayerNorms of the shared layers
        and the final audio / visual LayerNorms, which only missing-modality inference uses; in `"audio"` /
        `"visual"` mode, everything of the other modality and the joint stream's LayerNorms.
        """
        mode = self.config.classification_mode
        used_streams = {JOINT} if mode == "multimodal" else {mode}
        used_modalities = {AUDIO, VISUAL} if mode == "multimodal" else {mode}
        names = super().frozen_parameter_names()
        for name, _ in self.cav_mae.named_parameters():
            parts = name.split(".")
            if parts[0] in ("shared_layers", "final_layernorm"):  # LayerNorms by stream: `...layernorm_before.audio.*`
                stream = next((part for part in parts if part in STREAMS), None)
                unused = stream is not None and stream not in used_streams
            else:  # owned by a modality: `audio_layers.*`, `embeddings.visual_patch_embeddings.*`
                owner = next((m for m in (AUDIO, VISUAL) if any(part.startswith(f"{m}_") for part in parts)), None)
                unused = owner is not None and owner not in used_modalities
            if unused:
                names.add(f"{self.base_model_prefix}.{name}")
        return names

    @can_return_tuple
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> CavMaeClassifierOutput | tuple:
        r"""
        Args:
            input_features (`torch.FloatTensor` of shape `(B, audio_length, num_mel_bins)`, *optional*).
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, F, C, H, W)`, *optional*).
            labels (`torch.LongTensor` of shape `(B,)` or `torch.FloatTensor` of shape `(B, num_labels)`,
                *optional*): class indices (single-label), multi-hot targets (multi-label) or values (regression).
                With no `config.problem_type`, it is set from the labels at the first call, as Transformers'
                classifiers do.
            output_hidden_states / output_attentions / return_dict: as everywhere in Transformers.
        """
        mode = self.config.classification_mode
        self._check_mode_inputs(input_features, pixel_values)
        if mode == AUDIO:
            pixel_values = None  # the frames play no part
        elif mode == VISUAL:
            input_features = None
        present = [m for m, x in ((AUDIO, input_features), (VISUAL, pixel_values)) if x is not None]
        if mode != "multimodal":
            streams = (mode,)
        else:
            streams = (JOINT,) if len(present) == 2 else (JOINT, present[0] if present else AUDIO)
        encoded = self.cav_mae(
            input_features=input_features,
            pixel_values=pixel_values,
            streams=streams,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        pooled = self._pooled(encoded, streams)
        logits = self.classifier(pooled)
        frame_logits = None
        if pixel_values is not None and pixel_values.dim() == 5:
            frame_logits, logits = logits, self.aggregate_frames(logits)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return CavMaeClassifierOutput(
            loss=loss,
            logits=logits,
            frame_logits=frame_logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    @staticmethod
    def _pooled(encoded: CavMaeModelOutput, streams: tuple[str, ...]) -> torch.Tensor:
        """What the head classifies: `[B, D]`, or `[B, F, D]` per frame."""
        pooled = {AUDIO: encoded.audio_embeds, VISUAL: encoded.visual_embeds, JOINT: encoded.pooler_output}
        if len(streams) == 1:
            return pooled[streams[0]]
        return (pooled[JOINT] + pooled[streams[1]]) / 2  # missing-modality inference

    def _check_mode_inputs(self, input_features, pixel_values):
        mode = self.config.classification_mode
        if mode == AUDIO and input_features is None:
            raise CavMaeInputError("classification_mode='audio' needs `input_features`.")
        if mode == VISUAL and pixel_values is None:
            raise CavMaeInputError("classification_mode='visual' needs `pixel_values`.")
        if input_features is None and pixel_values is None:
            raise CavMaeInputError("Give at least one of `input_features` (audio) or `pixel_values` (frames).")

    def aggregate_frames(self, frame_logits: torch.Tensor) -> torch.Tensor:
        """
        `[B, F, L]` per-frame logits -> `[B, L]` logits of the frame-averaged probabilities (softmax, or sigmoid
        for multi-label); regression outputs are averaged.
        """
        problem_type = self._problem_type()
        if problem_type == "regression":
            return frame_logits.mean(dim=1)
        if problem_type == "multi_label_classification":
            probabilities = torch.sigmoid(frame_logits.float()).mean(dim=1)
            eps = torch.finfo(probabilities.dtype).tiny
            logits = torch.log(probabilities.clamp_min(eps)) - torch.log1p(-probabilities).clamp_min(math.log(eps))
            return logits.to(frame_logits.dtype)
        log_probabilities = torch.log_softmax(frame_logits.float(), dim=-1)
        return (torch.logsumexp(log_probabilities, dim=1) - math.log(frame_logits.shape[1])).to(frame_logits.dtype)

    def _problem_type(self, labels: torch.Tensor | None = None) -> str:
        """`config.problem_type`, or what the labels (or, without labels, `num_labels`) imply, as Transformers'
        classifiers decide it: one output is regression, integer labels single-label, float targets multi-label."""
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.config.num_labels == 1:
            return "regression"
        if labels is None or not labels.is_floating_point() or labels.dim() == 1:
            return "single_label_classification"
        return "multi_label_classification"

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        The loss of `logits` `[B, num_labels]` against `labels`, per the problem type: class indices `[B]` (or soft
        targets `[B, num_labels]`) for single-label, multi-hot targets `[B, num_labels]` in [0, 1] for multi-label,
        values `[B]` / `[B, num_labels]` for regression. Labels of the wrong shape, batch size or range, or holding
        NaN / Inf, raise a `CavMaeInputError` naming the problem rather than a loss that is silently wrong.
        """
        labels = _checked_labels(labels, logits)
        problem_type = self._problem_type(labels)
        if self.config.problem_type is None:
            self.config.problem_type = problem_type
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
