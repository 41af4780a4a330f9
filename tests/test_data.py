"""Dataset builders (folder, CSV, reference JSON), the on-the-fly transform, the collator and the augmentations."""

import csv
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from cavmae_hf import CavMaeFeatureExtractor, media
from cavmae_hf.data import (
    AudioVisualDataCollator,
    AudioVisualTransform,
    CavMaeDataError,
    LabelFileError,
    LabelSet,
    add_noise_and_roll,
    balanced_sample_weights,
    check_paths_within_root,
    dataset_from_csv,
    dataset_from_folder,
    dataset_from_reference_json,
    decode_clips,
    draw_mixup,
    finetuning_transforms,
    label_set_of,
    mix_waveforms,
    pretraining_transforms,
    read_label_csv,
    smoothed_targets,
    spec_augment,
    with_transform,
)
from cavmae_hf.synthetic import class_specs, generate_clips, write_synthetic_videos

SAMPLING_RATE = 16000
collate = AudioVisualDataCollator()
AUDIO_LENGTH, MEL_BINS, IMAGE_SIZE = 64, 32, 32


@pytest.fixture(scope="module")
def extractor():
    return CavMaeFeatureExtractor(max_length=AUDIO_LENGTH, num_mel_bins=MEL_BINS, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """3 classes x 2 clips of 1 s, 32 x 32 frames, as mp4 files in class folders."""
    root = tmp_path_factory.mktemp("videos")
    return write_synthetic_videos(root, num_classes=3, clips_per_class=2, duration=1.0, image_size=32, fps=10)


def frame_colour(index: int) -> tuple[int, int, int]:
    return (20 * index, 255 - 20 * index, 100)


@pytest.fixture(scope="module")
def reference_layout(tmp_path_factory):
    """The reference's layout: wav files, frames at frames/frame_{i}/{id}.jpg (a solid colour per frame index),
    a data JSON with relative paths and a label CSV of mids."""
    root = tmp_path_factory.mktemp("reference")
    (root / "audio").mkdir()
    entries = []
    for clip, labels in (("clipA", "/m/a"), ("clipB", "/m/b,/m/c"), ("clipC", "/m/c")):
        tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(SAMPLING_RATE) / SAMPLING_RATE)
        soundfile.write(root / "audio" / f"{clip}.wav", tone.astype(np.float32), SAMPLING_RATE)
        for index in range(10):
            folder = root / "frames" / f"frame_{index}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 32), frame_colour(index)).save(folder / f"{clip}.jpg", quality=100)
        entries.append({"video_id": clip, "wav": f"audio/{clip}.wav", "video_path": "frames", "labels": labels})
    (root / "frames" / "frame_7" / "clipA.jpg").unlink()  # a missing frame: the previous one stands in
    (root / "data.json").write_text(json.dumps({"data": entries}))
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows([[0, "/m/a", "Alpha"], [1, "/m/b", "Beta"], [2, "/m/c", "Gamma, with comma"]])
    return root


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------
def test_folder_layout_gives_labels_from_class_folders(video_folder):
    dataset = dataset_from_folder(video_folder)
    names = [spec.name for spec in class_specs(3)]
    assert len(dataset) == 6
    assert label_set_of(dataset).names == sorted(names)
    for row in dataset:
        assert row["video"].endswith(".mp4") and row["audio"] is None and row["frames"] == []
        assert label_set_of(dataset).names[row["labels"][0]] in row["video"]


def test_flat_folder_is_unlabelled(tmp_path, video_folder):
    for path in list(video_folder.glob("*/*.mp4"))[:2]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    dataset = dataset_from_folder(tmp_path)
    assert len(dataset) == 2 and all(row["labels"] == [] for row in dataset)
    assert label_set_of(dataset) is None


def test_csv_layout_with_relative_paths_and_several_labels(video_folder):
    videos = sorted(video_folder.glob("*/*.mp4"))
    csv_path = video_folder / "clips.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "labels"])
        writer.writerow([videos[0].relative_to(video_folder), "dog,music"])
        writer.writerow([videos[1], "music"])
    dataset = dataset_from_csv(csv_path)
    assert label_set_of(dataset).names == ["dog", "music"]
    assert dataset["labels"] == [[0, 1], [1]]
    assert dataset[0]["video"] == str(videos[0])


def test_reference_json_layout(reference_layout, extractor):
    dataset = dataset_from_reference_json(reference_layout / "data.json", reference_layout / "labels.csv")
    assert dataset["clip_id"] == ["clipA", "clipB", "clipC"]
    assert dataset["labels"] == [[0], [1, 2], [2]]
    assert label_set_of(dataset).names == ["Alpha", "Beta", "Gamma, with comma"]
    row = dataset[1]
    assert row["audio"]["path"] == str(reference_layout / "audio" / "clipB.wav")
    assert row["frames"][3]["path"] == str(reference_layout / "frames" / "frame_3" / "clipB.jpg")

    # the middle frame (5 of 10) at evaluation, as the reference
    def frame(clip, index):
        with Image.open(reference_layout / "frames" / f"frame_{index}" / f"{clip}.jpg") as image:
            return extractor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    batch = collate(dataset.with_transform(AudioVisualTransform(extractor, num_labels=3))[:3])
    torch.testing.assert_close(batch["pixel_values"][0], frame("clipA", 5))
    assert batch["labels"].tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]

    # a missing frame file falls back to the previous frame
    batch = collate(dataset.with_transform(AudioVisualTransform(extractor, frame_index=7))[:2])
    torch.testing.assert_close(batch["pixel_values"][0], frame("clipA", 6))
    torch.testing.assert_close(batch["pixel_values"][1], frame("clipB", 7))


def test_reference_json_without_label_csv_uses_sorted_mids(reference_layout):
    dataset = dataset_from_reference_json(reference_layout / "data.json")
    assert label_set_of(dataset).names == ["/m/a", "/m/b", "/m/c"]


def test_label_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n0,x\n")
    with pytest.raises(LabelFileError, match="index,mid,display_name"):
        read_label_csv(bad)
    with pytest.raises(LabelFileError, match="not found"):
        read_label_csv(tmp_path / "missing.csv")
    with pytest.raises(LabelFileError, match="Unknown label"):
        LabelSet(["a"]).index_of("zzz")


def test_balanced_sample_weights_are_the_reference_formula():
    import datasets

    dataset = datasets.Dataset.from_dict({"labels": [[0], [0], [0, 1], [2]]})
    weights = balanced_sample_weights(dataset)
    class_weight = 1000.0 / (np.array([3, 1, 1]) + 0.01)
    expected = [class_weight[0], class_weight[0], class_weight[0] + class_weight[1], class_weight[2]]
    np.testing.assert_allclose(weights, expected)


# ----------------------------------------------------------------------------------------------------------------
# Transform and collator
# ----------------------------------------------------------------------------------------------------------------
def test_transform_and_collator_shapes(video_folder, extractor):
    dataset = dataset_from_folder(video_folder)
    train, evaluation = finetuning_transforms(extractor, num_labels=3, timem=8, freqm=4)
    collator = AudioVisualDataCollator()
    train_examples = dataset.with_transform(train).__getitems__([0, 1, 2, 3])
    batch = collator(train_examples)
    assert batch["input_features"].shape == (4, AUDIO_LENGTH, MEL_BINS)
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].shape == (4, 3) and batch["labels"].dtype == torch.float32
    eval_batch = collator(dataset.with_transform(evaluation).__getitems__([0, 5]))
    assert eval_batch["pixel_values"].shape == (2, 10, 3, IMAGE_SIZE, IMAGE_SIZE)  # multi-frame evaluation
    assert set(eval_batch) == {"input_features", "pixel_values", "labels"}

    pretrain, _ = pretraining_transforms(extractor)
    assert set(collator(dataset.with_transform(pretrain).__getitems__([0, 1]))) == {"input_features", "pixel_values"}
    assert collator(dataset.with_transform(pretrain)[:2]).keys() == {"input_features", "pixel_values"}


def test_evaluation_is_deterministic_and_training_is_not(video_folder, extractor):
    dataset = dataset_from_folder(video_folder)
    train, evaluation = finetuning_transforms(extractor, num_labels=3, eval_frames="middle")
    first, second = collate(dataset.with_transform(evaluation)[:3]), collate(dataset.with_transform(evaluation)[:3])
    torch.testing.assert_close(first, second)
    assert not torch.equal(collate(dataset.with_transform(train)[:3])["input_features"], first["input_features"])


def test_decoded_clips_give_the_same_inputs_as_the_videos(video_folder, extractor):
    dataset = dataset_from_folder(video_folder)
    decoded = decode_clips(dataset)
    assert decoded[0]["video"] is None and len(decoded[0]["frames"]) == 10 and decoded[0]["audio"]["bytes"]
    # what the reference's extraction scripts wrote: 224-pixel quality-75 JPEG frames and a 16 kHz 16-bit WAV
    reference = media.load_video(dataset[0]["video"])
    assert [frame["bytes"] for frame in decoded[0]["frames"]] == reference.frame_jpegs
    wav = soundfile.info(io.BytesIO(decoded[0]["audio"]["bytes"]))
    assert (wav.samplerate, wav.subtype, wav.channels) == (SAMPLING_RATE, "PCM_16", 1)
    np.testing.assert_array_equal(soundfile.read(io.BytesIO(decoded[0]["audio"]["bytes"]), dtype="float32")[0],
                                  reference.audio)  # fmt: skip
    transform = AudioVisualTransform(extractor, frame_index="all", num_labels=3)
    from_video, from_bytes = collate(dataset.with_transform(transform)[:6]), collate(decoded.with_transform(transform)[:6])
    torch.testing.assert_close(from_bytes["input_features"], from_video["input_features"])
    torch.testing.assert_close(from_bytes["pixel_values"], from_video["pixel_values"])
    torch.testing.assert_close(from_bytes["labels"], from_video["labels"])


def test_streaming_dataset(video_folder, extractor):
    iterable = decode_clips(dataset_from_folder(video_folder)).to_iterable_dataset()
    train, _ = finetuning_transforms(extractor, num_labels=3, timem=8, freqm=4)
    examples = list(with_transform(iterable, train, batch_size=4))
    assert len(examples) == 6
    batch = AudioVisualDataCollator()(examples[:4])
    assert batch["input_features"].shape == (4, AUDIO_LENGTH, MEL_BINS)


def test_unreadable_clip_stand_in_is_the_reference_behaviour_on_request(tmp_path, video_folder, extractor):
    import datasets

    dataset = dataset_from_folder(video_folder)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    rows = dataset.to_dict()
    rows["video"][0] = str(broken)
    dataset = datasets.Dataset.from_dict(rows, features=dataset.features)
    transform = AudioVisualTransform(extractor, on_error="stand_in")
    batch = collate(dataset.with_transform(transform)[:2])
    expected = (0.01 - extractor.audio_mean) / extractor.audio_std
    assert torch.allclose(batch["input_features"][0], torch.tensor(expected))
    assert torch.allclose(batch["pixel_values"][0], torch.tensor(0.01))
    assert batch["input_features"].shape[0] == 2 and transform.skipped_clips == transform.skip_counter.total == 1
    with pytest.warns(FutureWarning, match="stand_in"):
        assert AudioVisualTransform(extractor, on_error="warn").on_error == "stand_in"
    with pytest.raises(ValueError, match="not a readable media file"):
        collate(dataset.with_transform(AudioVisualTransform(extractor, on_error="raise"))[:1])


# ----------------------------------------------------------------------------------------------------------------
# Augmentation statistics
# ----------------------------------------------------------------------------------------------------------------
def test_spec_augment_masks_one_band_per_axis_of_the_reference_widths():
    torch.manual_seed(1)
    features = torch.randn(4000, 100, 40)
    masked = spec_augment(features, freqm=12, timem=30, fill_value=7.0)
    filled = masked == 7.0
    frequency_band = filled.all(dim=1)  # [B, F]: whole frequency rows masked
    time_band = filled.all(dim=2)  # [B, T]
    frequency_widths, time_widths = frequency_band.sum(1).float(), time_band.sum(1).float()
    assert frequency_widths.max() < 12 and time_widths.max() < 30
    # width = int(w) with w ~ U(0, max): its mean is (max - 1) / 2
    assert abs(frequency_widths.mean() - 5.5) < 0.25 and abs(time_widths.mean() - 14.5) < 0.6
    for band in (frequency_band[:200], time_band[:200]):  # each band is contiguous
        for row in band:
            where = row.nonzero().flatten()
            if len(where):
                assert where[-1] - where[0] + 1 == len(where)
    untouched = ~(frequency_band[:, None, :] | time_band[:, :, None])
    assert torch.equal(masked[untouched], features[untouched])
    assert torch.equal(spec_augment(features[:3]), features[:3])


def test_noise_and_roll_statistics():
    torch.manual_seed(2)
    ramp = torch.arange(50.0)[None, :, None].expand(3000, 50, 8)
    out = add_noise_and_roll(ramp)
    # the roll: each clip is the ramp shifted in time (noise < 0.1 keeps the integers recoverable)
    shifts = (out[:, 0, 0].floor().long() - 0) % 50
    expected = (torch.arange(50)[None, :] - (-shifts[:, None])) % 50
    assert torch.equal(out[:, :, 0].floor().long(), expected)
    noise = out - out.floor()
    assert noise.min() >= 0 and noise.max() < 0.1
    # uniform noise times a uniform scale / 10: mean 0.025
    assert abs(noise.mean() - 0.025) < 0.001
    assert len(set(shifts.tolist())) == 50  # shifts cover every offset


def test_mixup_draws_and_targets():
    torch.manual_seed(3)
    partners, lambdas = draw_mixup(20000, probability=0.5)
    mixed = lambdas < 1
    assert abs(mixed.float().mean() - 0.5) < 0.02
    beta_mean, beta_std = lambdas[mixed].mean(), lambdas[mixed].std()
    assert abs(beta_mean - 0.5) < 0.01 and abs(beta_std - math.sqrt(0.25 / 21)) < 0.005  # Beta(10, 10)
    assert torch.equal(partners[~mixed], torch.arange(20000)[~mixed])
    assert torch.equal(draw_mixup(5, 0.0)[1], torch.ones(5))

    # label smoothing and mixing, by hand: 4 classes, smoothing 0.1
    labels = [[0], [1, 3]]
    targets = smoothed_targets(labels, 4, 0.1, partners=torch.tensor([1, 1]), lambdas=torch.tensor([0.7, 1.0]))
    base = 0.1 / 4
    torch.testing.assert_close(targets[0], torch.tensor([base + 0.7 * 0.9, base + 0.3 * 0.9, base, base + 0.3 * 0.9]))
    torch.testing.assert_close(targets[1], torch.tensor([base, 0.9, base, 0.9]))
    torch.testing.assert_close(smoothed_targets([[2]], 3), torch.tensor([[0.0, 0.0, 1.0]]))


def test_mix_waveforms_removes_means_and_pads():
    first, second = np.ones(10) + np.arange(10), np.full(4, 5.0)
    mixed = mix_waveforms(first, second, 0.25)
    assert mixed.shape == (10,) and abs(mixed.mean()) < 1e-6
    centred = first - first.mean()
    np.testing.assert_allclose(mixed, 0.25 * centred - (0.25 * centred).mean(), atol=1e-6)  # the partner is all DC


def test_transform_mixup_mixes_frames_and_labels(video_folder, extractor):
    dataset = dataset_from_folder(video_folder)
    torch.manual_seed(4)
    transform = AudioVisualTransform(extractor, training=True, mixup=1.0, label_smoothing=0.1, num_labels=3)
    batch = collate(dataset.with_transform(transform)[:6])
    torch.testing.assert_close(batch["labels"].sum(dim=1), torch.ones(6))  # single-label clips: mass 1
    assert (batch["labels"] > 0.1 / 3 + 1e-6).sum(dim=1).max() == 2  # two classes share the mass when mixed


def test_synthetic_clips_are_reproducible_and_distinct():
    first = list(generate_clips(num_classes=4, clips_per_class=2, duration=0.5, image_size=32, seed=7))
    again = list(generate_clips(num_classes=4, clips_per_class=2, duration=0.5, image_size=32, seed=7))
    assert [clip.clip_id for clip in first] == [clip.clip_id for clip in again]
    np.testing.assert_array_equal(first[0].audio, again[0].audio)
    np.testing.assert_array_equal(first[0].frames, again[0].frames)
    assert first[0].audio.dtype == np.float32 and first[0].frames.shape == (5, 32, 32, 3)
    assert len({spec.name for spec in class_specs(12)}) == 12
    # the latent pitch moves the shape up: shapes of high-pitch clips sit higher in the frame
    clips = list(generate_clips(num_classes=1, clips_per_class=40, duration=0.2, image_size=64, seed=1))

    def shape_row(clip):
        frame = clip.frames[0].astype(float)
        saturation = frame.max(axis=2) - frame.min(axis=2)
        return np.nonzero(saturation > 100)[0].mean()

    pitches = np.array([clip.pitch for clip in clips])
    rows = np.array([shape_row(clip) for clip in clips])
    assert np.corrcoef(pitches, rows)[0, 1] < -0.9


# ----------------------------------------------------------------------------------------------------------------
# Restricting paths to a root
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def rooted(tmp_path):
    """`root/` with a video, a wav and frames, and `outside/` beside it with the same; `root/link.mp4` and
    `root/linked_frames` are symlinks to files outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root, outside):
        (folder / "frames" / "frame_0").mkdir(parents=True)
        (folder / "clip.mp4").write_bytes(b"video")
        (folder / "clip.wav").write_bytes(b"audio")
        (folder / "frames" / "frame_0" / "clip.jpg").write_bytes(b"jpeg")
    (root / "link.mp4").symlink_to(outside / "clip.mp4")
    (root / "linked_frames").symlink_to(outside / "frames", target_is_directory=True)
    return root, outside


def write_csv(path, videos):
    path.write_text("video\n" + "".join(f"{video}\n" for video in videos))
    return path


@pytest.mark.parametrize(
    "video",
    ["../outside/clip.mp4", "ABSOLUTE", "link.mp4", "linked_frames/../clip.mp4"],
    ids=["dot-dot", "absolute", "symlink", "through-a-symlinked-folder"],
)
def test_csv_paths_that_escape_the_allowed_root_are_refused(rooted, video):
    root, outside = rooted
    video = str(outside / "clip.mp4") if video == "ABSOLUTE" else video
    csv_path = write_csv(root / "data.csv", ["clip.mp4", video])
    with pytest.raises(CavMaeDataError, match="outside the allowed root") as caught:
        dataset_from_csv(csv_path, allowed_root=True)
    assert repr(str(root / video) if not video.startswith("/") else video) in str(caught.value)
    assert len(dataset_from_csv(csv_path)) == 2  # no restriction unless asked for


def test_paths_inside_the_root_pass_even_through_dot_dot_and_a_symlinked_root(rooted, tmp_path):
    root, _ = rooted
    (tmp_path / "root_link").symlink_to(root, target_is_directory=True)
    csv_path = write_csv(root / "data.csv", ["clip.mp4", "frames/../clip.mp4", str(root / "clip.mp4")])
    assert len(dataset_from_csv(csv_path, allowed_root=tmp_path / "root_link")) == 3
    with pytest.raises(CavMaeDataError, match="is not a folder"):
        dataset_from_csv(csv_path, allowed_root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "entry",
    [
        {"wav": "../outside/clip.wav"},
        {"wav": "ABSOLUTE"},
        {"video_id": "../../../outside/frames/frame_0/clip"},
        {"video_path": "linked_frames"},
    ],
    ids=["wav-dot-dot", "wav-absolute", "video-id-dot-dot", "symlinked-frame-folder"],
)
def test_reference_json_paths_that_escape_the_allowed_root_are_refused(rooted, entry):
    root, outside = rooted
    entry = {key: str(outside / "clip.wav") if value == "ABSOLUTE" else value for key, value in entry.items()}
    good = {"video_id": "clip", "wav": "clip.wav", "video_path": "frames", "labels": "/m/a"}
    (root / "data.json").write_text(json.dumps({"data": [good, {**good, **entry}]}))
    with pytest.raises(CavMaeDataError, match="outside the allowed root") as caught:
        dataset_from_reference_json(root / "data.json", num_frames=1, allowed_root=True)
    assert f"of clip {entry.get('video_id', 'clip')!r}" in str(caught.value)
    assert len(dataset_from_reference_json(root / "data.json", num_frames=1)) == 2  # no restriction unless asked
    (root / "ok.json").write_text(json.dumps([good]))
    assert len(dataset_from_reference_json(root / "ok.json", num_frames=1, allowed_root=root)) == 1


def test_folder_symlinks_and_foreign_datasets_are_checked(rooted, tmp_path):
    _, outside = rooted
    videos = tmp_path / "videos" / "class_a"
    videos.mkdir(parents=True)
    (videos / "clip.mp4").write_bytes(b"video")
    (videos / "link.mp4").symlink_to(outside / "clip.mp4")
    with pytest.raises(CavMaeDataError, match="link.mp4"):
        dataset_from_folder(videos.parent, allowed_root=True)
    (videos / "link.mp4").unlink()
    dataset = dataset_from_folder(videos.parent, allowed_root=True)
    assert dataset["video"] == [str(videos / "clip.mp4")]
    check_paths_within_root(dataset, videos.parent)
    foreign = dataset_from_csv(write_csv(tmp_path / "hub.csv", [str(outside / "clip.mp4")]))
    with pytest.raises(CavMaeDataError, match="outside the allowed root"):
        check_paths_within_root(foreign, videos.parent)
