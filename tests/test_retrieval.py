"""Retrieval: the index (cosine search, persistence, missing modalities) and end-to-end search with a tiny model."""

import pytest
import torch
from inference_helpers import save_tiny_encoder, write_clip, write_png, write_wav
from safetensors.torch import save_file

from cavmae_hf.retrieval import (
    VIDEO_OPTION_DEFAULTS,
    RetrievalError,
    RetrievalIndex,
    build_index,
    default_modalities,
    feature_extraction_pipeline,
    index_metadata,
    search,
)


def random_index(num_clips=50, dim=16, seed=0) -> RetrievalIndex:
    generator = torch.Generator().manual_seed(seed)
    return RetrievalIndex(
        [f"clip_{i}" for i in range(num_clips)],
        {
            "audio": torch.randn(num_clips, dim, generator=generator),
            "visual": torch.randn(num_clips, dim, generator=generator),
        },
        metadata={"model": "random"},
    )


# ----------------------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------------------
def test_planted_nearest_neighbour_is_found():
    index = random_index()
    planted = index.embeddings["visual"][17] * 3.0 + 0.01 * torch.randn(16)  # scale must not matter: cosine
    hits = index.search(planted, "visual", top_k=3)[0]
    assert hits[0].key == "clip_17" and hits[0].rank == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[0].score > hits[1].score >= hits[2].score


def test_batched_search_equals_brute_force():
    index = random_index(num_clips=40)
    queries = torch.randn(7, 16)
    normalised = torch.nn.functional.normalize(queries, dim=-1)
    gallery = torch.nn.functional.normalize(index.embeddings["audio"], dim=-1)
    expected_scores, expected_ids = (normalised @ gallery.T).topk(5, dim=-1)
    for chunk_size in (1, 3, 1024):
        results = index.search(queries, "audio", top_k=5, chunk_size=chunk_size)
        assert [[hit.key for hit in hits] for hits in results] == [
            [f"clip_{i}" for i in row] for row in expected_ids.tolist()
        ]
        got = torch.tensor([[hit.score for hit in hits] for hits in results])
        torch.testing.assert_close(got, expected_scores, atol=1e-6, rtol=0)


def test_top_k_is_capped_by_the_gallery():
    assert len(random_index(num_clips=3).search(torch.randn(16), "visual", top_k=10)[0]) == 3


def test_clips_without_a_modality_never_match():
    embeddings = {"audio": torch.randn(4, 8), "visual": torch.randn(4, 8)}
    present = {"audio": torch.tensor([True, False, True, False])}
    index = RetrievalIndex(["a", "b", "c", "d"], embeddings, present)
    hits = index.search(embeddings["audio"][1], "audio", top_k=10)[0]
    assert {hit.key for hit in hits} == {"a", "c"}


def test_from_clip_embeddings_with_missing_modalities():
    clips = [
        {"audio_embeds": torch.ones(4), "visual_embeds": torch.ones(4)},
        {"visual_embeds": -torch.ones(4)},
        {"audio_embeds": -torch.ones(4)},
    ]
    index = RetrievalIndex.from_clip_embeddings(["x", "y", "z"], clips)
    assert index.present["audio"].tolist() == [True, False, True]
    assert index.present["visual"].tolist() == [True, True, False]
    assert [hit.key for hit in index.search(-torch.ones(4), "visual", top_k=5)[0]] == ["y", "x"]


def test_save_and_load_round_trip(tmp_path):
    index = random_index(num_clips=5)
    index.present["audio"][2] = False
    index = RetrievalIndex(index.keys, index.embeddings, index.present, index.metadata)
    loaded = RetrievalIndex.load(index.save(tmp_path / "index.safetensors"))
    assert loaded.keys == index.keys and loaded.metadata == {"model": "random"}
    for modality in ("audio", "visual"):
        torch.testing.assert_close(loaded.embeddings[modality], index.embeddings[modality], atol=0, rtol=0)
        assert loaded.present[modality].tolist() == index.present[modality].tolist()


def test_loading_something_else_fails_clearly(tmp_path):
    with pytest.raises(RetrievalError, match="not found"):
        RetrievalIndex.load(tmp_path / "missing.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(RetrievalError, match="not a CAV-MAE retrieval index"):
        RetrievalIndex.load(tmp_path / "weights.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(RetrievalError, match="not a safetensors file"):
        RetrievalIndex.load(tmp_path / "text.safetensors")


def test_bad_shapes_and_modalities():
    with pytest.raises(RetrievalError, match="one row per key"):
        RetrievalIndex(["a", "b"], {"audio": torch.randn(3, 4)})
    index = RetrievalIndex(["a"], {"audio": torch.randn(1, 4)})
    with pytest.raises(RetrievalError, match="no visual embeddings"):
        index.search(torch.randn(4), "visual")
    with pytest.raises(RetrievalError, match="dimension"):
        index.search(torch.randn(5), "audio")


def test_default_modalities_are_cross_modal():
    both = random_index(num_clips=2)
    audio_only = RetrievalIndex(["a"], {"audio": torch.randn(1, 4)})
    video_query = {"audio_embeds": 0, "visual_embeds": 0}
    assert default_modalities(video_query, both) == ("audio", "visual")
    assert default_modalities({"visual_embeds": 0}, both) == ("visual", "audio")
    assert default_modalities({"audio_embeds": 0}, audio_only) == ("audio", "audio")
    assert default_modalities(video_query, both, query_modality="visual", target_modality="visual") == (
        "visual",
        "visual",
    )
    with pytest.raises(RetrievalError, match="no audio"):
        default_modalities({"visual_embeds": 0}, both, query_modality="audio")


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    videos = [write_clip(folder / f"clip_{i}.mp4", seed=10 + i) for i in range(4)]
    extractor = feature_extraction_pipeline(save_tiny_encoder(folder / "model"))
    index = build_index(extractor, videos, num_frames=4, batch_size=2)
    return folder, videos, extractor, index


def test_build_index_from_videos(gallery):
    folder, videos, _, index = gallery
    assert len(index) == 4 and index.keys == [str(v) for v in videos]
    assert index.modalities == ("audio", "visual") and index.dim == 32
    assert index.metadata["num_frames"] == "4"
    norms = torch.linalg.vector_norm(index.embeddings["visual"], dim=-1)
    torch.testing.assert_close(norms, torch.ones(4), atol=1e-5, rtol=0)


def test_a_gallery_clip_finds_itself(gallery):
    _, videos, extractor, index = gallery
    for position in (0, 2):
        for modality in ("audio", "visual"):
            hits = search(
                index,
                extractor,
                str(videos[position]),
                top_k=2,
                query_modality=modality,
                target_modality=modality,
                num_frames=4,
            )
            assert hits[0].key == str(videos[position])
            assert hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_queries_of_every_kind(gallery):
    folder, videos, extractor, index = gallery
    sound = write_wav(folder / "query.wav", seed=20)
    image = write_png(folder / "query.png", seed=21)
    results = search(index, extractor, [str(sound), str(image), str(videos[1])], top_k=3, num_frames=4)
    assert [len(hits) for hits in results] == [3, 3, 3]
    for hits in results:
        assert all(-1.0 - 1e-5 <= hit.score <= 1.0 + 1e-5 for hit in hits)
        assert [hit.rank for hit in hits] == [1, 2, 3]
    # the audio file is matched against the visual embeddings (cross-modal), like the first step of the video query
    sound_scores = index.scores(extractor(str(sound), return_tensors=True)["audio_embeds"][None], "visual")[0]
    assert results[0][0].score == pytest.approx(sound_scores.max().item(), abs=1e-5)


def test_saved_index_gives_the_same_results(gallery, tmp_path):
    _, videos, extractor, index = gallery
    reloaded = RetrievalIndex.load(index.save(tmp_path / "gallery.safetensors"))
    query = str(videos[3])
    got, want = search(reloaded, extractor, query, num_frames=4), search(index, extractor, query, num_frames=4)
    assert [hit.key for hit in got] == [hit.key for hit in want]
    assert [hit.score for hit in got] == pytest.approx([hit.score for hit in want], abs=1e-6)


def test_an_index_records_its_decoding_options_and_video_queries_follow_them(gallery):
    _, videos, extractor, index = gallery
    assert {k: index.metadata[k] for k in VIDEO_OPTION_DEFAULTS} == VIDEO_OPTION_DEFAULTS
    untouched = build_index(extractor, videos[:2], num_frames=4, video_options={"frame_transform": "none"})
    assert untouched.metadata["frame_transform"] == "none"
    assert untouched.metadata["frame_selection"] == VIDEO_OPTION_DEFAULTS["frame_selection"]
    query = dict(query_modality="visual", target_modality="visual", num_frames=4, top_k=2)
    (same,) = [hit for hit in search(untouched, extractor, str(videos[0]), **query) if hit.key == str(videos[0])]
    assert same.score == pytest.approx(1.0, abs=1e-5)  # decoded as the gallery was, without being told
    jpeg = search(untouched, extractor, str(videos[0]), video_options={"frame_transform": "reference_jpeg"}, **query)
    (other,) = [hit for hit in jpeg if hit.key == str(videos[0])]
    assert other.score < same.score - 1e-5  # an explicit option wins over the recorded one
    with pytest.raises(RetrievalError, match="frame_rate"):
        index_metadata("model", 4, {"frame_rate": 5})
