"""Masked reconstruction with a pretraining model, its un-normalisation and the PNG."""

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from inference_helpers import tiny_feature_extractor, write_clip
from PIL import Image
from transformers.testing_utils import CaptureLogger

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining
from cavmae_hf import reconstruction as reconstruction_module
from cavmae_hf.feature_extraction_cav_mae import IMAGENET_MEAN, IMAGENET_STD
from cavmae_hf.modeling_cav_mae import CavMaeInputError, patchify
from cavmae_hf.reconstruction import (
    masked_patch_errors,
    masking_noise,
    reconstruct,
    reconstruct_clip,
    render_reconstruction,
    rescale_normalised_patches,
)

AUDIO_MEAN, AUDIO_STD = -5.081, 4.4849


def pretraining_model(norm_pix_loss: bool) -> CavMaeForPreTraining:
    return CavMaeForPreTraining(CavMaeConfig(**tiny_config_kwargs(norm_pix_loss=norm_pix_loss))).eval()


def random_inputs(config, batch_size=2):
    return (
        torch.randn(batch_size, config.audio_length, config.num_mel_bins),
        torch.randn(batch_size, config.num_channels, config.image_size, config.image_size).clamp(-2, 2),
    )


def patch_mask(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """A `[rows, cols]` patch mask -> pixel mask `[rows * p, cols * p]`."""
    return np.kron(mask, np.ones((patch_size, patch_size))) > 0.5


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_visible_patches_are_the_original_and_masks_have_the_ratio(norm_pix_loss):
    model = pretraining_model(norm_pix_loss)
    audio, frames = random_inputs(model.config)
    results = reconstruct(model, audio, frames, audio_mask_ratio=0.5, visual_mask_ratio=0.75, seed=3)
    assert len(results) == 2
    for result in results:
        assert result.audio_mask.shape == (4, 8) and result.visual_mask.shape == (4, 4)
        assert result.audio_mask.mean() == 0.5 and result.visual_mask.mean() == 0.75
        audio_removed = patch_mask(result.audio_mask, 8)
        visual_removed = patch_mask(result.visual_mask, 8)
        np.testing.assert_allclose(
            result.reconstructed_spectrogram[~audio_removed], result.spectrogram[~audio_removed], atol=1e-5
        )
        np.testing.assert_allclose(
            result.reconstructed_image[~visual_removed], result.image[~visual_removed], atol=1e-6
        )
        assert np.isnan(result.masked_spectrogram[audio_removed]).all()
        assert not np.isnan(result.masked_spectrogram[~audio_removed]).any()
        assert (result.masked_image[visual_removed] == 0.5).all()
        assert not np.allclose(result.reconstructed_image[visual_removed], result.image[visual_removed])


def test_display_units_undo_the_feature_normalisation():
    model = pretraining_model(False)
    audio, frames = random_inputs(model.config, batch_size=1)
    result = reconstruct(model, audio, frames, seed=0)[0]
    np.testing.assert_allclose(result.spectrogram, (audio[0].T * AUDIO_STD + AUDIO_MEAN).numpy(), atol=1e-5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (frames[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(result.image, expected, atol=1e-6)
    assert result.image.min() >= 0.0 and result.reconstructed_image.max() <= 1.0


def test_perfect_normalised_predictions_rescale_to_the_targets():
    images = torch.randn(2, 3, 32, 32) * 3 + 1
    target = patchify(images, 8)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(rescale_normalised_patches(normalised, images, 8), target, atol=1e-4, rtol=1e-5)


def test_norm_pix_loss_warns_and_says_so_in_the_title(tmp_path):
    model = pretraining_model(True)
    audio, frames = random_inputs(model.config, batch_size=1)
    with CaptureLogger(reconstruction_module.logger) as captured:
        result = reconstruct(model, audio, frames)[0]
    assert "norm_pix_loss=True" in captured.out and result.norm_pix_loss
    assert "norm_pix_loss=True" in reconstruction_module.figure_title(result)
    with CaptureLogger(reconstruction_module.logger) as captured:
        plain = reconstruct(pretraining_model(False), audio, frames)[0]
    assert captured.out == "" and "WARNING" not in reconstruction_module.figure_title(plain)


def test_masks_follow_the_seed_and_the_config_is_restored():
    model = pretraining_model(False)
    audio, frames = random_inputs(model.config, batch_size=1)
    first = reconstruct(model, audio, frames, seed=5, audio_mask_ratio=0.25, audio_mask_mode="time")[0]
    again = reconstruct(model, audio, frames, seed=5, audio_mask_ratio=0.25, audio_mask_mode="time")[0]
    other = reconstruct(model, audio, frames, seed=6)[0]
    np.testing.assert_array_equal(first.audio_mask, again.audio_mask)
    assert (first.audio_mask.min(axis=0) == first.audio_mask.max(axis=0)).all()  # whole time columns
    assert not np.array_equal(first.visual_mask, other.visual_mask)
    assert (model.config.audio_mask_ratio, model.config.audio_mask_mode) == (0.75, "unstructured")
    assert model.config.contrastive_loss_weight == 0.01


def test_masked_patch_errors_of_the_model_and_of_a_baseline_use_the_same_masks():
    model = pretraining_model(False)
    audio, frames = random_inputs(model.config, batch_size=3)
    errors = masked_patch_errors(model, audio, frames, audio[0], frames[0], seed=4, batch_size=2)
    # the first clip's own input as its baseline: no error on it, so the baseline error is that of the other two
    first = masked_patch_errors(model, audio[:1], frames[:1], audio[0], frames[0], seed=4)
    assert first["audio_baseline_mse"] == 0 and first["visual_baseline_mse"] == 0
    # the model's error is its own masked loss, with the masks drawn from the seed (per batch of `batch_size`)
    audio_noise, visual_noise = masking_noise(model.config, 2, seed=4)
    with torch.no_grad():
        output = model(audio[:2], frames[:2], audio_noise=audio_noise, visual_noise=visual_noise)
    rest = masked_patch_errors(model, audio[2:], frames[2:], audio[0], frames[0], seed=5)
    expected_audio = (2 * float(output.audio_mae_loss) + rest["audio_mse"]) / 3
    assert errors["audio_mse"] == pytest.approx(expected_audio, rel=1e-5)
    assert errors["visual_baseline_mse"] > 0 and errors["visual_mse"] > 0
    assert masked_patch_errors(model, audio, frames, audio[0], frames[0], seed=4) != masked_patch_errors(
        model, audio, frames, audio[0], frames[0], seed=9
    )


def test_masked_patch_errors_need_unnormalised_predictions():
    model = pretraining_model(True)
    audio, frames = random_inputs(model.config, batch_size=1)
    with pytest.raises(CavMaeInputError, match="norm_pix_loss=False"):
        masked_patch_errors(model, audio, frames, audio[0], frames[0])


def test_needs_a_pretraining_model():
    classifier = CavMaeForAudioVisualClassification(CavMaeConfig(**tiny_config_kwargs(num_labels=3)))
    with pytest.raises(CavMaeInputError, match="decoder"):
        reconstruct(classifier, *random_inputs(classifier.config))


@pytest.mark.parametrize("figsize,dpi", [((15.0, 7.5), 100), ((8.0, 5.0), 50)])
def test_png_has_the_expected_size(tmp_path, figsize, dpi):
    model = pretraining_model(True)
    result = reconstruct(model, *random_inputs(model.config, batch_size=1))[0]
    path = render_reconstruction(result, tmp_path / "nested" / "figure.png", figsize=figsize, dpi=dpi)
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(figsize[0] * dpi), int(figsize[1] * dpi))


def test_reconstruct_a_video_file(tmp_path):
    model = pretraining_model(False)
    video = write_clip(tmp_path / "clip.mp4", seed=1)
    extractor = tiny_feature_extractor(model.config)
    result = reconstruct_clip(model, video, feature_extractor=extractor, seed=0)
    assert result.spectrogram.shape == (32, 64) and result.image.shape == (32, 32, 3)
    assert result.source == str(video)
    # the middle frame of the 10 sampled is shown
    from cavmae_hf.media import load_video

    frames = load_video(video, num_frames=10).frames
    pixels = extractor(images=[frames[5]], return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    np.testing.assert_allclose(result.image, (pixels * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), atol=1e-6)
    assert render_reconstruction(result, tmp_path / "clip.png").is_file()

    silent = write_clip(tmp_path / "silent.mp4", seed=2, with_audio=False)
    with pytest.raises(CavMaeInputError, match="needs audio and frames"):
        reconstruct_clip(model, silent, feature_extractor=extractor)
    with pytest.raises(CavMaeInputError, match="out of range"):
        reconstruct_clip(model, video, feature_extractor=extractor, frame_index=10)


def test_example_inpainting_script_reports_losses_per_ratio_and_draws_the_first_clips(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    from inference_helpers import save_tiny_pretraining

    model_dir = save_tiny_pretraining(tmp_path / "model")
    videos = tmp_path / "videos"
    videos.mkdir()
    for seed in range(3):
        write_clip(videos / f"clip{seed}.mp4", seed=seed)
    path = Path(__file__).resolve().parents[1] / "examples" / "inpainting.py"
    spec = importlib.util.spec_from_file_location("example_inpainting", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = tmp_path / "out"
    example.main(
        ["--model_name_or_path", str(model_dir), "--data", str(videos), "--output_dir", str(output),
         "--mask_ratios", "0.25", "0.75", "--num_figures", "2", "--batch_size", "2"]
    )  # fmt: skip
    rows = json.loads((output / "results.json").read_text())
    assert [row["mask_ratio"] for row in rows] == [0.25, 0.75]
    assert all(row["audio_mse"] > 0 and row["visual_mse"] > 0 for row in rows)
    assert sorted(p.name for p in output.glob("*.png")) == [
        "clip0_0.25.png", "clip0_0.75.png", "clip1_0.25.png", "clip1_0.75.png"
    ]  # fmt: skip

