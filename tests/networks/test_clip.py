"""CLIP text encoders against transformers (same random weights, float32) and ComfyUI-style encoding.

Tolerance: absolute and relative 1e-5 in float32. Both implementations use the same attention kernel,
so differences come only from the fused q/k/v projection in the OpenCLIP layout (~1e-7 here).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from comfy_serverless.models.random_checkpoints import tiny_clip_config
from comfy_serverless.networks.clip import (
    SD1_CLIP_L_PREFIX,
    SD2_CLIP_H_PREFIX,
    SDXL_CLIP_G_PREFIX,
    SDXL_CLIP_L_PREFIX,
    CLIPTextConfig,
    CLIPTextModel,
    SD1TextEncoder,
    SD2TextEncoder,
    SDXLTextEncoder,
    from_openclip_key,
    load_text_model,
    to_openclip_key,
)
from comfy_serverless.networks.clip import to_openclip_layout as written_openclip_layout
from comfy_serverless.text.prompt_weights import EmbeddingVector, tokenize_weighted
from comfy_serverless.text.tokenizer import PAD_WITH_END, PAD_WITH_ZERO, CLIPTokenizer

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
START, END, CAT = 49406, 49407, 2368


def hf_config(config: CLIPTextConfig):
    return transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_width,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.context_length,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.width,
        bos_token_id=START,
        eos_token_id=END,
        pad_token_id=END,
    )


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from the default init, layer norms near identity, so every path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm = "norm" in name or ".ln_" in name or name.startswith("ln_")
            if is_norm and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return module.eval()


def sample_ids(pad: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    ids = torch.full((3, 77), pad, dtype=torch.long)
    for row, length in enumerate((5, 40, 75)):
        ids[row, 0] = START
        ids[row, 1 : 1 + length] = torch.randint(0, START, (length,), generator=generator)
        ids[row, 1 + length] = END
    return ids


def final_layer_norm(hf_model) -> torch.nn.LayerNorm:
    # transformers 5 flattened CLIPTextModel; the projection model still nests a text_model.
    return getattr(hf_model, "text_model", hf_model).final_layer_norm


def hf_weights(hf_model) -> dict[str, torch.Tensor]:
    return {key.removeprefix("text_model."): value for key, value in hf_model.state_dict().items()}


def to_openclip_layout(hf_model, layers: int) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection weights renamed (and q/k/v fused) the OpenCLIP way."""
    source = hf_weights(hf_model)
    weights = {
        "token_embedding.weight": source["embeddings.token_embedding.weight"],
        "positional_embedding": source["embeddings.position_embedding.weight"],
        "ln_final.weight": source["final_layer_norm.weight"],
        "ln_final.bias": source["final_layer_norm.bias"],
        "text_projection": source["text_projection.weight"].T.contiguous(),
    }
    renames = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for layer in range(layers):
        hf_prefix, oc_prefix = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            fused = [source[f"{hf_prefix}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            weights[f"{oc_prefix}attn.in_proj_{kind}"] = torch.cat(fused)
            for hf_name, oc_name in renames.items():
                weights[f"{oc_prefix}{oc_name}.{kind}"] = source[f"{hf_prefix}{hf_name}.{kind}"]
    return weights


@pytest.fixture(scope="module")
def clip_l_pair():
    config = tiny_clip_config("hf", heads=4)
    torch.manual_seed(0)
    reference = randomize(transformers.CLIPTextModel(hf_config(config)), seed=1)
    ours = CLIPTextModel(config)
    ours.load_state_dict(hf_weights(reference), strict=True)
    return ours.eval(), reference


@pytest.fixture(scope="module")
def open_clip_pair():
    config = tiny_clip_config("openclip", width=48, projection_dim=40, heads=4)
    torch.manual_seed(0)
    reference = randomize(transformers.CLIPTextModelWithProjection(hf_config(config)), seed=2)
    ours = CLIPTextModel(config)
    ours.load_state_dict(to_openclip_layout(reference, config.layers), strict=True)
    return ours.eval(), reference


@torch.no_grad()
def test_hf_layout_matches_transformers(clip_l_pair):
    ours, reference = clip_l_pair
    ids = sample_ids(PAD_WITH_END)
    expected = reference(ids, output_hidden_states=True)
    hidden, pooled = ours(ids, hidden_layer=-1, normalize_hidden=True)
    torch.testing.assert_close(hidden, expected.last_hidden_state, **TOLERANCE)
    torch.testing.assert_close(pooled, expected.pooler_output, **TOLERANCE)
    final_norm = final_layer_norm(reference)
    for layer in (-1, -2, -3, 0, 1):
        # hidden_states[0] is the embedding output, so block i is hidden_states[i + 1].
        block_output = expected.hidden_states[layer if layer < 0 else layer + 1]
        raw, _ = ours(ids, hidden_layer=layer)
        normed, _ = ours(ids, hidden_layer=layer, normalize_hidden=True)
        torch.testing.assert_close(raw, block_output, **TOLERANCE)
        torch.testing.assert_close(normed, final_norm(block_output), **TOLERANCE)


@torch.no_grad()
def test_openclip_layout_matches_transformers_with_projection(open_clip_pair):
    ours, reference = open_clip_pair
    ids = sample_ids(PAD_WITH_ZERO)
    expected = reference(ids, output_hidden_states=True)
    hidden, pooled = ours(ids, hidden_layer=-1, normalize_hidden=True)
    torch.testing.assert_close(hidden, expected.last_hidden_state, **TOLERANCE)
    torch.testing.assert_close(pooled, expected.text_embeds, **TOLERANCE)
    penultimate, _ = ours(ids, hidden_layer=-2)
    torch.testing.assert_close(penultimate, expected.hidden_states[-2], **TOLERANCE)


def test_hidden_layer_out_of_range(clip_l_pair):
    ours, _ = clip_l_pair
    with pytest.raises(ValueError):
        ours(sample_ids(PAD_WITH_END), hidden_layer=-4)
    with pytest.raises(ValueError):
        ours(sample_ids(PAD_WITH_END), hidden_layer=3)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_clip_l_keys_match_transformers():
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.clip_l())
        reference = transformers.CLIPTextModel(hf_config(CLIPTextConfig.clip_l()))
    expected = {key.removeprefix("text_model."): shape for key, shape in shapes(reference).items()}
    expected.pop("embeddings.position_ids", None)
    assert shapes(ours) == expected
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480  # OpenAI ViT-L/14 text tower


def openclip_expected_shapes(width: int, layers: int, mlp: int, projection: int) -> dict[str, tuple[int, ...]]:
    expected = {
        "token_embedding.weight": (49408, width),
        "positional_embedding": (77, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "text_projection": (width, projection),
    }
    for layer in range(layers):
        block = f"transformer.resblocks.{layer}."
        expected |= {
            block + "ln_1.weight": (width,),
            block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width),
            block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width),
            block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,),
            block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (mlp, width),
            block + "mlp.c_fc.bias": (mlp,),
            block + "mlp.c_proj.weight": (width, mlp),
            block + "mlp.c_proj.bias": (width,),
        }
    return expected


@pytest.mark.parametrize(
    ("config", "width", "layers", "mlp"),
    [(CLIPTextConfig.open_clip_h(), 1024, 24, 4096), (CLIPTextConfig.open_clip_bigg(), 1280, 32, 5120)],
    ids=["vit-h", "bigG"],
)
def test_openclip_full_config_keys(config, width, layers, mlp):
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    written = {key: tuple(value.shape) for key, value in written_openclip_layout(ours.state_dict()).items()}
    assert written == openclip_expected_shapes(width, layers, mlp, width)
    for key in written:  # the two maps are inverses
        assert {to_openclip_key(name)[0] for name in from_openclip_key(key)} == {key}
    assert config.heads * 64 == width  # both use 64-wide heads


def tiny_checkpoint(model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    weights = model.state_dict()
    if model.config.layout == "openclip":
        weights = written_openclip_layout(weights)
    return {prefix + key: value.clone() for key, value in weights.items()}


def test_load_text_model_strict_with_checkpoint_extras(clip_l_pair, open_clip_pair):
    clip_l, _ = clip_l_pair
    checkpoint = tiny_checkpoint(clip_l, SD1_CLIP_L_PREFIX)
    checkpoint[SD1_CLIP_L_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None].float()  # often broken
    checkpoint["model.diffusion_model.out.0.weight"] = torch.ones(4)  # other models' keys are ignored
    loaded = load_text_model(checkpoint, clip_l.config, SD1_CLIP_L_PREFIX)
    weight = loaded.final_layer_norm.weight
    assert weight.data_ptr() == checkpoint[SD1_CLIP_L_PREFIX + "final_layer_norm.weight"].data_ptr()  # no copy
    assert not any(p.is_meta for p in loaded.parameters()) and not weight.requires_grad
    ids = sample_ids(PAD_WITH_END)
    torch.testing.assert_close(loaded(ids)[0], clip_l(ids)[0], atol=0, rtol=0)

    clip_g, _ = open_clip_pair
    checkpoint = tiny_checkpoint(clip_g, SDXL_CLIP_G_PREFIX)
    checkpoint[SDXL_CLIP_G_PREFIX + "logit_scale"] = torch.tensor(4.6)
    half = load_text_model(checkpoint, clip_g.config, SDXL_CLIP_G_PREFIX, dtype=torch.bfloat16)
    assert half.text_projection.dtype == torch.bfloat16

    full = load_text_model(checkpoint, clip_g.config, SDXL_CLIP_G_PREFIX)
    torch.testing.assert_close(full(ids)[1], clip_g(ids)[1], atol=0, rtol=0)
    fused = checkpoint[SDXL_CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    assert full.encoder.layers[0].self_attn.q_proj.weight.data_ptr() == fused.data_ptr()  # a view: no copy

    del checkpoint[SDXL_CLIP_G_PREFIX + "ln_final.bias"]
    with pytest.raises(RuntimeError, match="final_layer_norm.bias"):
        load_text_model(checkpoint, clip_g.config, SDXL_CLIP_G_PREFIX)
    checkpoint = tiny_checkpoint(clip_g, SDXL_CLIP_G_PREFIX)
    checkpoint[SDXL_CLIP_G_PREFIX + "transformer.resblocks.0.attn.bogus"] = torch.ones(1)
    with pytest.raises(RuntimeError, match="bogus"):
        load_text_model(checkpoint, clip_g.config, SDXL_CLIP_G_PREFIX)


# ---- ComfyUI-style encoding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_end():
    return CLIPTokenizer(pad_token_id=PAD_WITH_END)


@pytest.fixture(scope="module")
def tokenizer_zero():
    return CLIPTokenizer(pad_token_id=PAD_WITH_ZERO)


def window_ids(windows) -> torch.Tensor:
    return torch.tensor([[token for token, _ in window] for window in windows])


@torch.no_grad()
def test_sd1_unweighted_prompt_is_the_plain_encoding(clip_l_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    windows = tokenize_weighted("a photo of a cat", tokenizer_end)
    cond, pooled = SD1TextEncoder(clip_l).encode(windows)
    hidden, expected_pooled = clip_l(window_ids(windows), hidden_layer=-1, normalize_hidden=True)
    assert cond.shape == (1, 77, 32) and pooled.shape == (1, 32) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, hidden, **TOLERANCE)
    torch.testing.assert_close(pooled, expected_pooled, **TOLERANCE)

    skipped, _ = SD1TextEncoder(clip_l).encode(windows, hidden_layer=-2)  # CLIPSetLastLayer -2
    penultimate, _ = clip_l(window_ids(windows), hidden_layer=-2, normalize_hidden=True)
    torch.testing.assert_close(skipped, penultimate, **TOLERANCE)


@torch.no_grad()
def test_weights_push_away_from_the_empty_prompt(clip_l_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    windows = tokenize_weighted("a (cat:1.5) and a ((dog))", tokenizer_end)
    cond, _ = SD1TextEncoder(clip_l).encode(windows)

    z, _ = clip_l(window_ids(windows), hidden_layer=-1, normalize_hidden=True)
    empty_ids = torch.tensor([[START, END] + [END] * 75])
    z_empty, _ = clip_l(empty_ids, hidden_layer=-1, normalize_hidden=True)
    weights = torch.tensor([[weight for _, weight in windows[0]]]).unsqueeze(-1)
    expected = z_empty + (z - z_empty) * weights
    torch.testing.assert_close(cond, expected, **TOLERANCE)
    assert sorted({round(w, 4) for _, w in windows[0]}) == [1.0, 1.21, 1.5]


@torch.no_grad()
def test_embedding_vectors_replace_token_embeddings(clip_l_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    encoder = SD1TextEncoder(clip_l)
    cat_vector = clip_l.embed_tokens(torch.tensor([CAT]))[0]
    lookup = {"catvec": cat_vector[None], "wrong": torch.ones(7)}.get
    with_embedding = encoder.encode(tokenize_weighted("a embedding:catvec", tokenizer_end, lookup))
    with_word = encoder.encode(tokenize_weighted("a cat", tokenizer_end))
    for got, expected in zip(with_embedding, with_word):
        torch.testing.assert_close(got, expected, **TOLERANCE)

    # An embedding made for another width is dropped; the window is refilled with padding.
    windows = tokenize_weighted("a embedding:wrong", tokenizer_end, lookup)
    assert isinstance(windows[0][2][0], EmbeddingVector)
    dropped = encoder.encode(windows)
    plain = encoder.encode(tokenize_weighted("a", tokenizer_end))
    torch.testing.assert_close(dropped[0], plain[0], **TOLERANCE)


@torch.no_grad()
def test_long_prompt_windows_are_concatenated(clip_l_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    windows = tokenize_weighted(" ".join(["cat"] * 200), tokenizer_end)
    cond, pooled = SD1TextEncoder(clip_l).encode(windows)
    assert cond.shape == (1, 3 * 77, 32)
    each, each_pooled = clip_l(window_ids(windows), hidden_layer=-1, normalize_hidden=True)
    torch.testing.assert_close(cond, each.reshape(1, -1, 32), **TOLERANCE)
    torch.testing.assert_close(pooled, each_pooled[:1], **TOLERANCE)


@torch.no_grad()
def test_sd2_uses_normalized_penultimate_layer_and_projected_pool(open_clip_pair, tokenizer_zero):
    clip_h, reference = open_clip_pair
    windows = tokenize_weighted("a photo of a cat", tokenizer_zero)
    assert windows[0][-1][0] == 0
    cond, pooled = SD2TextEncoder(clip_h).encode(windows)
    expected = reference(window_ids(windows), output_hidden_states=True)
    penultimate = final_layer_norm(reference)(expected.hidden_states[-2])
    torch.testing.assert_close(cond, penultimate, **TOLERANCE)
    torch.testing.assert_close(pooled, expected.text_embeds, **TOLERANCE)
    assert pooled.shape == (1, 40)


@torch.no_grad()
def test_sdxl_concatenates_both_encoders(clip_l_pair, open_clip_pair, tokenizer_end, tokenizer_zero):
    (clip_l, reference_l), (clip_g, reference_g) = clip_l_pair, open_clip_pair
    checkpoint = tiny_checkpoint(clip_l, SDXL_CLIP_L_PREFIX) | tiny_checkpoint(clip_g, SDXL_CLIP_G_PREFIX)
    encoder = SDXLTextEncoder.from_checkpoint(checkpoint, config_l=clip_l.config, config_g=clip_g.config)

    prompt = "a photo of a cat"
    windows_l, windows_g = tokenize_weighted(prompt, tokenizer_end), tokenize_weighted(prompt, tokenizer_zero)
    cond, pooled = encoder.encode(windows_l, windows_g)
    assert cond.shape == (1, 77, 32 + 48) and pooled.shape == (1, 40)
    expected_l = reference_l(window_ids(windows_l), output_hidden_states=True)
    expected_g = reference_g(window_ids(windows_g), output_hidden_states=True)
    torch.testing.assert_close(cond[..., :32], expected_l.hidden_states[-2], **TOLERANCE)  # no final norm
    torch.testing.assert_close(cond[..., 32:], expected_g.hidden_states[-2], **TOLERANCE)
    torch.testing.assert_close(pooled, expected_g.text_embeds, **TOLERANCE)

    # Different window counts: the longer encoder's output is cut.
    long_windows_l = tokenize_weighted(" ".join(["cat"] * 100), tokenizer_end)
    cond, _ = encoder.encode(long_windows_l, windows_g)
    assert len(long_windows_l) == 2 and cond.shape == (1, 77, 80)


@torch.no_grad()
def test_sd1_and_sd2_from_checkpoint(clip_l_pair, open_clip_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    clip_h, _ = open_clip_pair
    sd1 = SD1TextEncoder.from_checkpoint(tiny_checkpoint(clip_l, SD1_CLIP_L_PREFIX), config=clip_l.config)
    sd2 = SD2TextEncoder.from_checkpoint(tiny_checkpoint(clip_h, SD2_CLIP_H_PREFIX), config=clip_h.config)
    windows = tokenize_weighted("a cat", tokenizer_end)
    torch.testing.assert_close(sd1.encode(windows)[0], SD1TextEncoder(clip_l).encode(windows)[0], atol=0, rtol=0)
    assert sd2.encode(windows)[0].shape == (1, 77, 48)


@torch.no_grad()
def test_bfloat16_model_returns_float32(clip_l_pair, tokenizer_end):
    clip_l, _ = clip_l_pair
    half = load_text_model(tiny_checkpoint(clip_l, ""), clip_l.config, dtype=torch.bfloat16)
    cond, pooled = SD1TextEncoder(half).encode(tokenize_weighted("a (cat:1.2)", tokenizer_end))
    assert cond.dtype == pooled.dtype == torch.float32
    reference, _ = SD1TextEncoder(clip_l).encode(tokenize_weighted("a (cat:1.2)", tokenizer_end))
    assert (cond - reference).abs().max() < 0.1 * reference.abs().max()
