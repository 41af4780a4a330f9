"""
The fast paths of the model compute what the plain paths compute: sdpa vs eager attention, the packed multi-stream
shared layers vs one stream at a time, the memory-saving recomputation in backward vs stored activations, gradient
checkpointing, torch.compile, and the mixed-precision / half-precision / fused-optimizer paths a GPU user takes
(proven here on CPU).
"""

import copy

import pytest
import torch
from conftest import tiny_config_kwargs

from cavmae_hf import CavMaeConfig, CavMaeForAudioVisualClassification, CavMaeForPreTraining, CavMaeModel
from cavmae_hf import kernels_cav_mae as kernels


def make_inputs(config, batch_size=3):
    audio = torch.randn(batch_size, config.audio_length, config.num_mel_bins)
    images = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
    noise = (torch.rand(batch_size, config.num_audio_patches), torch.rand(batch_size, config.num_visual_patches))
    return audio, images, noise


def pretraining_gradients(model, audio, images, noise, autocast_dtype=None, runner=None):
    """Output and parameter gradients of one pretraining forward/backward (`runner`: e.g. the compiled model)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        output = (model if runner is None else runner)(audio, images, *noise)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, gradients


def assert_same_gradients(expected, actual, atol):
    assert expected.keys() == actual.keys() and len(expected) > 20
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=atol, rtol=0), name


@pytest.fixture
def kernels_switch():
    """Restore the switch of the fast kernels (oneDNN products, recomputation in backward) after a test changes it."""
    saved = kernels.ENABLED
    yield
    kernels.ENABLED = saved


# sdpa vs eager -----------------------------------------------------------------------------------------------------
def test_sdpa_is_the_default_attention(tiny_config):
    assert CavMaeForPreTraining(tiny_config).config._attn_implementation == "sdpa"


def test_sdpa_and_eager_give_equal_outputs_and_gradients(tiny_config):
    audio, images, noise = make_inputs(tiny_config)
    eager = CavMaeForPreTraining._from_config(tiny_config, attn_implementation="eager").train()
    sdpa = CavMaeForPreTraining._from_config(copy.deepcopy(tiny_config), attn_implementation="sdpa").train()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    eager_out, eager_grads = pretraining_gradients(eager, audio, images, noise)
    sdpa_out, sdpa_grads = pretraining_gradients(sdpa, audio, images, noise)
    for field in ("loss", "audio_logits", "visual_logits", "last_hidden_state", "audio_embeds"):
        assert torch.allclose(getattr(eager_out, field), getattr(sdpa_out, field), atol=1e-5), field
    assert_same_gradients(eager_grads, sdpa_grads, atol=1e-5)
    with torch.no_grad():
        eager_encoder, sdpa_encoder = eager.cav_mae.eval()(audio, images), sdpa.cav_mae.eval()(audio, images)
    for field in ("last_hidden_state", "audio_last_hidden_state", "visual_last_hidden_state"):
        assert torch.allclose(getattr(eager_encoder, field), getattr(sdpa_encoder, field), atol=1e-5), field


# Packed shared-layer streams ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shared_layers", [1, 2])
def test_packed_streams_equal_one_stream_at_a_time(num_shared_layers):
    config = CavMaeConfig(**tiny_config_kwargs(num_shared_layers=num_shared_layers))
    model = CavMaeModel(config).train()
    audio, images, _ = make_inputs(config)
    fields = {"joint": "last_hidden_state", "audio": "audio_last_hidden_state", "visual": "visual_last_hidden_state"}
    packed_output = model(audio, images)  # the three streams packed into one pass through the shared layers
    packed = [getattr(packed_output, field) for field in fields.values()]
    separate = [getattr(model(audio, images, streams=(stream,)), field) for stream, field in fields.items()]
    for packed_stream, separate_stream in zip(packed, separate):
        assert packed_stream.shape == separate_stream.shape
        assert torch.allclose(packed_stream, separate_stream, atol=1e-6)
    shared = [p for p in model.shared_layers.parameters()]

    def shared_gradients(outputs):
        loss = sum((stream * torch.linspace(-1, 1, stream.shape[-1])).sum() for stream in outputs)
        return torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)

    for packed_grad, separate_grad in zip(shared_gradients(packed), shared_gradients(separate)):
        assert torch.allclose(packed_grad, separate_grad, atol=1e-5)


def test_packed_streams_keep_hidden_states_and_attentions_per_stream(tiny_config):
    model = CavMaeModel(tiny_config).eval()
    audio, images, _ = make_inputs(tiny_config, 2)
    with torch.no_grad():
        # the audio stream reported while packed with the other two equals the audio stream alone
        out = model(audio, images, streams=("audio", "joint", "visual"), output_hidden_states=True, output_attentions=True)
        audio_alone = model(input_features=audio, output_hidden_states=True, output_attentions=True)
        joint = model(audio, images, output_attentions=True)
    for packed, alone in zip(out.hidden_states, audio_alone.hidden_states, strict=True):
        assert torch.allclose(packed, alone, atol=1e-6)
    for packed, alone in zip(out.attentions, audio_alone.attentions, strict=True):
        assert torch.allclose(packed, alone, atol=1e-6)
    na, nv = tiny_config.num_audio_patches, tiny_config.num_visual_patches
    assert joint.attentions[-1].shape == (2, tiny_config.num_attention_heads, na + nv, na + nv)


# Recomputation in backward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_recomputation_in_backward_gives_the_stored_activations_gradients(tiny_config, kernels_switch, autocast_dtype):
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images, noise = make_inputs(tiny_config)
    kernels.ENABLED = False
    stored_out, stored = pretraining_gradients(model, audio, images, noise, autocast_dtype)
    kernels.ENABLED = True
    recomputed_out, recomputed = pretraining_gradients(model, audio, images, noise, autocast_dtype)
    assert torch.equal(stored_out.loss, recomputed_out.loss)
    assert_same_gradients(stored, recomputed, atol=1e-6 if autocast_dtype is None else 1e-3)
    assert all(g.dtype == torch.float32 for g in recomputed.values())


def test_recomputation_keeps_less_for_backward(kernels_switch):
    # MLPs four times as wide as the layers, as in the released models
    config = CavMaeConfig(**tiny_config_kwargs(intermediate_size=128, decoder_intermediate_size=64))
    model = CavMaeForPreTraining(config).train()
    audio, images, noise = make_inputs(config)

    def saved_bytes():
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(audio, images, *noise)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for pointer, size in storages.items() if pointer not in parameters)

    kernels.ENABLED = False
    stored = saved_bytes()
    kernels.ENABLED = True
    assert saved_bytes() < 0.8 * stored


def test_hooked_or_replaced_linears_take_the_plain_path(tiny_config):
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images, noise = make_inputs(tiny_config)
    calls = []
    layer = model.cav_mae.audio_layers[0]
    layer.mlp.fc2.register_forward_hook(lambda *args: calls.append("fc2"))
    layer.attention.qkv.register_forward_pre_hook(lambda *args: calls.append("qkv"))
    model(audio, images, *noise).loss.backward()
    assert calls == ["qkv", "fc2"]


# oneDNN products on CPU ------------------------------------------------------------------------------------------
@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="PyTorch built without oneDNN")
def test_onednn_linear_products_match_the_default_ones(tiny_config, kernels_switch, monkeypatch):
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images, noise = make_inputs(tiny_config)
    kernels.ENABLED = False
    default_out, default = pretraining_gradients(model, audio, images, noise)
    calls = []
    onednn = kernels._ONEDNN_LINEAR
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", lambda *args: calls.append(1) or onednn(*args))
    kernels.ENABLED = True
    onednn_out, through_onednn = pretraining_gradients(model, audio, images, noise)
    # every linear layer of the encoder and decoder, forward and both backward products
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(calls) >= 2 * linears
    assert torch.allclose(default_out.loss, onednn_out.loss, atol=1e-5)
    assert torch.allclose(default_out.visual_logits, onednn_out.visual_logits, atol=1e-5)
    assert_same_gradients(default, through_onednn, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        model.eval()(audio, images, *noise)
    assert calls  # inference takes the same products
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(audio, images, *noise)
    assert bool(calls) == (torch.bfloat16 in kernels._ONEDNN_DTYPES)  # oneDNN's bfloat16 products where the CPU has them


@pytest.mark.skipif(torch.bfloat16 not in kernels._ONEDNN_DTYPES, reason="no oneDNN bfloat16 products on this CPU")
@pytest.mark.parametrize("mode", ["bfloat16 weights", "bfloat16 autocast"])
def test_onednn_bfloat16_products_match_the_default_ones(tiny_config, kernels_switch, monkeypatch, mode):
    model = CavMaeForPreTraining(tiny_config).train()
    if mode == "bfloat16 weights":
        model = model.to(torch.bfloat16)
    autocast_dtype = torch.bfloat16 if mode == "bfloat16 autocast" else None
    audio, images, noise = make_inputs(tiny_config)
    kernels.ENABLED = False
    default_out, default = pretraining_gradients(model, audio, images, noise, autocast_dtype)
    calls = []
    onednn = kernels._ONEDNN_LINEAR
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", lambda *args: calls.append(args[0].dtype) or onednn(*args))
    kernels.ENABLED = True
    onednn_out, through_onednn = pretraining_gradients(model, audio, images, noise, autocast_dtype)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(calls) >= 2 * linears and set(calls) == {torch.bfloat16}
    assert onednn_out.visual_logits.dtype == torch.bfloat16
    assert torch.allclose(default_out.loss.float(), onednn_out.loss.float(), rtol=2e-2)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(default_out.visual_logits.float().flatten(), onednn_out.visual_logits.float().flatten(), dim=0) > 0.999
    assert default.keys() == through_onednn.keys() and len(default) > 20
    for name, gradient in default.items():
        assert through_onednn[name].dtype == next(model.parameters()).dtype, name
        assert cosine(gradient.float().flatten(), through_onednn[name].float().flatten(), dim=0) > 0.99, name


# Gradient checkpointing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gradient_checkpointing_gives_equal_gradients(tiny_config, attn_implementation):
    model = CavMaeForPreTraining._from_config(tiny_config, attn_implementation=attn_implementation).train()
    audio, images, noise = make_inputs(tiny_config)
    _, plain = pretraining_gradients(model, audio, images, noise)
    checkpointed_model = copy.deepcopy(model)
    checkpointed_model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in checkpointed_model.decoder.layers)
    _, checkpointed = pretraining_gradients(checkpointed_model, audio, images, noise)
    assert_same_gradients(plain, checkpointed, atol=1e-6)


# torch.compile ---------------------------------------------------------------------------------------------------
def test_encoder_compiles_without_graph_breaks_and_matches_eager(tiny_config):
    torch._dynamo.reset()
    model = CavMaeModel(tiny_config).eval()
    audio, images, _ = make_inputs(tiny_config, 2)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.no_grad():
        expected, actual = model(audio, images), compiled(audio, images)
    for field in ("last_hidden_state", "audio_last_hidden_state", "visual_last_hidden_state", "pooler_output"):
        assert torch.allclose(getattr(expected, field), getattr(actual, field), atol=1e-5), field


@pytest.mark.parametrize(
    "backend",
    [
        # dynamo + AOTAutograd (forward and backward graphs, the custom autograd functions included): seconds
        "aot_eager",
        # the full inductor code generation: about 1-2 minutes on 2 cores with a cold cache
        pytest.param("inductor", marks=pytest.mark.slow),
    ],
)
def test_pretraining_step_compiles_without_graph_breaks_and_matches_eager(tiny_config, backend):
    torch._dynamo.reset()
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images, noise = make_inputs(tiny_config, 2)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    expected_out, expected = pretraining_gradients(model, audio, images, noise)
    actual_out, actual = pretraining_gradients(model, audio, images, noise, runner=compiled)
    assert torch.allclose(expected_out.loss, actual_out.loss, atol=1e-5)
    assert_same_gradients(expected, actual, atol=1e-5)



@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", torch.tensor([1, 0])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_classification_loss_compiles_without_graph_breaks(problem_type, labels):
    # the label checks that read values (ranges, NaN) stand aside while dynamo traces; shapes are still checked
    torch._dynamo.reset()
    config = CavMaeConfig(**tiny_config_kwargs(num_labels=3, problem_type=problem_type))
    model = CavMaeForAudioVisualClassification(config).eval()
    audio, images, _ = make_inputs(config, 2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    expected = model(audio, images, labels=labels).loss
    assert torch.allclose(compiled(audio, images, labels=labels).loss, expected, atol=1e-5)

# Mixed and half precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_runs(tiny_config, dtype):
    model = CavMaeForPreTraining(tiny_config).train()
    audio, images, noise = make_inputs(tiny_config)
    with torch.no_grad():
        reference = model(audio, images, *noise).loss
    output, gradients = pretraining_gradients(model, audio, images, noise, autocast_dtype=dtype)
    assert output.audio_logits.dtype == dtype
    assert torch.isfinite(output.loss) and abs(output.loss.item() - reference.item()) < 0.05 * abs(reference.item())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients.values())


def test_autocast_classification_runs(tiny_config):
    tiny_config.num_labels = 5
    model = CavMaeForAudioVisualClassification(tiny_config).eval()
    audio, _, _ = make_inputs(tiny_config, 2)
    frames = torch.randn(2, 3, tiny_config.num_channels, tiny_config.image_size, tiny_config.image_size)
    with torch.no_grad():
        expected = model(audio, frames).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(audio, frames).logits
    assert logits.shape == (2, 5) and torch.allclose(logits.float(), expected, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_takes_float32_inputs(tiny_config, tmp_path, dtype):
    CavMaeForPreTraining(tiny_config).save_pretrained(tmp_path)
    model = CavMaeForPreTraining.from_pretrained(tmp_path, dtype=dtype)
    assert model.dtype == dtype and model.config._attn_implementation == "sdpa"
    audio, images, noise = make_inputs(tiny_config, 2)
    output = model.train()(audio, images, *noise)  # float32 inputs, as the feature extractor gives them
    output.loss.backward()
    assert output.audio_logits.dtype == dtype and torch.isfinite(output.loss)
    encoder = CavMaeModel.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():
        assert encoder(audio, images).last_hidden_state.dtype == dtype


# Fused optimizer through the Trainer ------------------------------------------------------------------------------
def test_fused_adamw_through_training_arguments(tiny_config, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = CavMaeForPreTraining(tiny_config)
    audio, images, _ = make_inputs(tiny_config, 4)
    dataset = [{"input_features": audio[i], "pixel_values": images[i]} for i in range(4)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        optim="adamw_torch_fused",
        per_device_train_batch_size=2,
        max_steps=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    before = model.decoder.mask_token.detach().clone()
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    result = trainer.train()
    assert trainer.optimizer.defaults.get("fused") is True
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.decoder.mask_token.detach())


# GPU-only paths (skipped on CPU machines) ---------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_training_step(tiny_config, dtype):
    model = CavMaeForPreTraining(tiny_config).cuda().train()
    audio, images, _ = make_inputs(tiny_config)
    audio, images = audio.cuda(), images.cuda()
    with torch.autocast("cuda", dtype=dtype):
        output = model(audio, images)
    output.loss.backward()
    assert torch.isfinite(output.loss)


@requires_cuda
def test_flash_attention_2_matches_sdpa(tiny_config):
    pytest.importorskip("flash_attn")
    audio, images, _ = make_inputs(tiny_config, 2)
    sdpa = CavMaeModel._from_config(tiny_config, attn_implementation="sdpa", dtype=torch.float16).cuda().eval()
    flash = CavMaeModel._from_config(
        copy.deepcopy(tiny_config), attn_implementation="flash_attention_2", dtype=torch.float16
    ).cuda().eval()
    flash.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        expected = sdpa(audio.cuda(), images.cuda()).last_hidden_state
        actual = flash(audio.cuda(), images.cuda()).last_hidden_state
    assert torch.allclose(expected.float(), actual.float(), atol=2e-2)
