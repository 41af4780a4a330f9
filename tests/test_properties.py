"""Property-based tests (hypothesis) of the masking and of the converter's key mapping."""

import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cavmae_hf.convert_original_checkpoint import CheckpointConversionError, map_key, map_state_dict
from cavmae_hf.modeling_cav_mae import mask_tokens, structured_audio_noise


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 5),
    length=st.integers(1, 40),
    ratio=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_masking_counts_and_restore_indices(batch_size, length, ratio, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, length, 3, generator=generator)
    noise = torch.rand(batch_size, length, generator=generator)
    kept, mask, ids_restore = mask_tokens(tokens, ratio, noise)
    num_keep = int(length * (1 - ratio))
    assert kept.shape == (batch_size, num_keep, 3)
    assert (mask.sum(dim=1) == length - num_keep).all()
    assert (ids_restore.sort(dim=1).values == torch.arange(length)).all()
    # the kept tokens are exactly the unmasked ones, and they have the smallest noise
    for sample in range(batch_size):
        unmasked = tokens[sample][mask[sample] == 0]
        assert torch.equal(kept[sample].sort(dim=0).values, unmasked.sort(dim=0).values)
        if 0 < num_keep < length:
            assert noise[sample][mask[sample] == 0].max() <= noise[sample][mask[sample] == 1].min()


@settings(max_examples=40, deadline=None)
@given(
    freq=st.integers(1, 8),
    time=st.integers(1, 20),
    ratio=st.floats(0.0, 0.99),
    mode=st.sampled_from(["time", "freq", "tf"]),
)
def test_structured_masks_remove_whole_lines_first(freq, time, ratio, mode):
    noise = structured_audio_noise(3, (freq, time), ratio, mode, "cpu")
    tokens = torch.zeros(3, freq * time, 1)
    _, mask, _ = mask_tokens(tokens, ratio, noise)
    grid = mask.reshape(3, freq, time).bool()
    flagged = (noise > 1.0).reshape(3, freq, time)
    removed = freq * time - int(freq * time * (1 - ratio))
    for sample in range(3):
        if flagged[sample].sum() <= removed:
            assert grid[sample][flagged[sample]].all()  # every flagged line is removed
        else:
            assert not grid[sample][~flagged[sample]].any()  # nothing outside the flagged lines is removed


ORIGINAL_KEY = st.one_of(
    st.builds(
        "{}.{}.{}.{}".format,
        st.sampled_from(["blocks_a", "blocks_v", "blocks_u", "decoder_blocks"]),
        st.integers(0, 15),
        st.sampled_from(["norm1", "norm2", "norm1_a", "norm2_v", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
        st.sampled_from(["weight", "bias"]),
    ),
    st.sampled_from(["pos_embed_a", "modality_v", "mask_token", "norm.weight", "mlp_head.1.bias", "decoder_pred_a.weight"]),
)
NOISE_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.one_of(ORIGINAL_KEY, NOISE_KEY), min_size=1, max_size=30, unique=True))
def test_key_mapping_accounts_for_every_key(keys):
    mapping = map_state_dict({key: torch.zeros(1) for key in keys})
    # every key is mapped, declared unused, or reported: nothing disappears silently
    assert len(mapping.state_dict) + len(mapping.unused) + len(mapping.unmapped) == len(keys)
    # distinct original keys never collide on one of ours
    assert len(set(mapping.state_dict)) == len(mapping.state_dict)
    for key in mapping.unused:
        assert re.fullmatch(r"(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.(weight|bias)", key)


@settings(max_examples=100, deadline=None)
@given(key=ORIGINAL_KEY)
def test_known_keys_always_map(key):
    assert map_key(key) is not None


def test_conversion_error_is_a_value_error():
    assert issubclass(CheckpointConversionError, ValueError)


def test_module_names_without_a_tensor_suffix_do_not_map():
    assert map_key("norm") is None and map_key("decoder_embed") is None
