"""Checkpoints load strictly, and original-format XCodec2 converts exactly.

Real transformers `from_pretrained` on folders written by real `save_pretrained`
(or, for the original format, by the inverse of the conversion, written here
by hand from X-Codec-2.0's module layout); the tiny model and codec stand in
for the real ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from autotune.audio import write_wav
from autotune.codec import Codec, DeferredCodec, build_tiny_codec, load_codec
from autotune.codec_cache import encode_files
from autotune.errors import AutotuneError
from autotune.loading import BENIGN_WEIGHT_KEYS
from autotune.model import load_base_model

SR = 16_000


@pytest.fixture(scope="module")
def codec() -> Codec:
    return build_tiny_codec()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline HF_HOME (the converted-codec folder lives under it)."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def wave(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * noise).astype(np.float32)


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --------------------------------------------------------------------------- base model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from autotune.llasa import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model().save_pretrained(folder)
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_an_intact_base_model_loads_with_its_weights(tiny_llama: Path) -> None:
    from autotune.llasa import build_tiny_model

    model = load_base_model(str(tiny_llama), precision="fp32")
    reference = build_tiny_model().state_dict()
    assert set(model.state_dict()) == set(reference)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         "1 weight missing (`model.layers.1.mlp.up_proj.weight`)"),
        (lambda t: t.update({"model.layers.1.mlp.upproj.weight": t.pop("model.layers.1.mlp.up_proj.weight")}),
         "1 weight missing (`model.layers.1.mlp.up_proj.weight`); 1 unexpected (`model.layers.1.mlp.upproj.weight`)"),
        (lambda t: t.update({"model.norm.weight": torch.ones(3)}),
         "1 with the wrong shape (`model.norm.weight` [3] in the checkpoint vs [64] in the model)"),
        (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.0.self_attn.")]],
         "4 weights missing (e.g. `model.layers.0.self_attn.k_proj.weight`, `model.layers.0.self_attn.o_proj.weight`)"),
    ],
    ids=["removed", "renamed", "wrong-shape", "many-removed"],
)
def test_a_base_model_whose_weights_do_not_match_is_one_error(tiny_llama: Path, tmp_path: Path, edit,
                                                              expected: str) -> None:
    folder = copy_folder(tiny_llama, tmp_path / "broken")
    rewrite_weights(folder, edit)
    with pytest.raises(AutotuneError) as info:
        load_base_model(str(folder), precision="fp32")
    message = info.value.one_line()
    assert message == str(info.value) and "\n" not in message
    assert message.startswith(f"the checkpoint `{folder}` does not fit LlamaForCausalLM ({expected})")
    assert "hf download HKUSTAudio/Llasa-1B" in message and "--model PATH" in message


def test_known_benign_differences_load_and_an_untied_head_may_not_be_missing(tiny_llama: Path, tmp_path: Path) -> None:
    assert {b.kind for b in BENIGN_WEIGHT_KEYS} == {"missing", "unexpected"}
    assert all(b.why for b in BENIGN_WEIGHT_KEYS)
    folder = copy_folder(tiny_llama, tmp_path / "benign")
    # An older transformers saved RoPE frequencies per layer; the tied head is stored once.
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
                                                 "model.rotary_emb.inv_freq": torch.ones(8)}))
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    load_base_model(str(folder), precision="fp32")

    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False  # now the missing head would be random
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AutotuneError, match=r"does not fit LlamaForCausalLM \(1 weight missing \(`lm_head.weight`\)\)"):
        load_base_model(str(folder), precision="fp32")


def test_tiny_names_still_build_the_tiny_model_and_codec(codec: Codec) -> None:
    assert load_base_model("tiny", precision="fp32").config.hidden_size == 64
    assert load_codec("tiny").codec_id == codec.codec_id


# --------------------------------------------------------------------------- codec, transformers format


def save_hf_codec(codec: Codec, folder: Path) -> Path:
    codec.model.save_pretrained(folder)
    codec.feature_extractor.save_pretrained(folder)
    return folder


def test_a_codec_with_a_missing_weight_is_one_error_and_caches_nothing(codec: Codec, tmp_path: Path, hub: Path) -> None:
    folder = save_hf_codec(codec, tmp_path / "xcodec2-hf")
    rewrite_weights(folder, lambda t: t.pop("quantizer.project_in.weight"))
    with pytest.raises(AutotuneError) as info:
        load_codec(str(folder))
    message = info.value.one_line()
    assert message.startswith(f"the checkpoint `{folder}` does not fit Xcodec2Model (1 weight missing "
                              "(`quantizer.project_in.weight`))")
    assert "hf download HKUSTAudio/xcodec2-hf" in message and "--codec tiny" in message

    audio = tmp_path / "audio" / "a.wav"
    write_wav(audio, wave())
    cache = tmp_path / "cache"
    with pytest.raises(AutotuneError, match="does not fit Xcodec2Model"):
        encode_files([audio], DeferredCodec(str(folder)), cache, progress=False)
    assert not list(cache.rglob("*"))


# --------------------------------------------------------------------------- codec, original format

# X-Codec-2.0's ResidualUnit and EncoderBlock are nn.Sequentials; these are their members' positions.
_RESIDUAL_INDEX = {"snake1": 0, "conv1": 1, "snake2": 2, "conv2": 3}
# Written from the original module layout (CodecEnc, generator.backbone, SemanticEncoder_module, ...),
# independently of autotune.xcodec2_convert's rules.
_TO_ORIGINAL = [
    (r"semantic_encoder\.(.+)", lambda m: f"semantic_model.{m[1]}"),
    (r"semantic_adapter\.conv1\.(.+)", lambda m: f"SemanticEncoder_module.initial_conv.{m[1]}"),
    (r"semantic_adapter\.conv2\.(.+)", lambda m: f"SemanticEncoder_module.residual_blocks.1.{m[1]}"),
    (r"semantic_adapter\.conv3\.(.+)", lambda m: f"SemanticEncoder_module.residual_blocks.3.{m[1]}"),
    (r"semantic_adapter\.conv4\.(.+)", lambda m: f"SemanticEncoder_module.final_conv.{m[1]}"),
    (r"acoustic_encoder\.conv1\.(.+)", lambda m: f"CodecEnc.conv_blocks.0.{m[1]}"),
    (r"acoustic_encoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.(.+)",
     lambda m: f"CodecEnc.conv_blocks.{int(m[1]) + 1}.block.{int(m[2]) - 1}.block.{_RESIDUAL_INDEX[m[3]]}.{m[4]}"),
    (r"acoustic_encoder\.block\.(\d+)\.snake1\.(.+)", lambda m: f"CodecEnc.conv_blocks.{int(m[1]) + 1}.block.3.{m[2]}"),
    (r"acoustic_encoder\.block\.(\d+)\.conv1\.(.+)", lambda m: f"CodecEnc.conv_blocks.{int(m[1]) + 1}.block.4.{m[2]}"),
    (r"acoustic_encoder\.snake1\.(.+)", lambda m: f"CodecEnc.conv_final_block.0.{m[1]}"),
    (r"acoustic_encoder\.conv2\.(.+)", lambda m: f"CodecEnc.conv_final_block.1.{m[1]}"),
    (r"fc_encoder\.(.+)", lambda m: f"fc_prior.{m[1]}"),
    (r"acoustic_decoder\.fc\.(.+)", lambda m: f"fc_post_a.{m[1]}"),
    (r"quantizer\.(.+)", lambda m: f"generator.quantizer.{m[1]}"),
    (r"acoustic_decoder\.layers\.(\d+)\.self_attn\.o_proj\.(.+)", lambda m: f"generator.backbone.transformers.{m[1]}.att.c_proj.{m[2]}"),
    (r"acoustic_decoder\.layers\.(\d+)\.input_layernorm\.(.+)", lambda m: f"generator.backbone.transformers.{m[1]}.att_norm.{m[2]}"),
    (r"acoustic_decoder\.layers\.(\d+)\.post_attention_layernorm\.(.+)", lambda m: f"generator.backbone.transformers.{m[1]}.ffn_norm.{m[2]}"),
    (r"acoustic_decoder\.layers\.(\d+)\.(mlp\..+)", lambda m: f"generator.backbone.transformers.{m[1]}.{m[2]}"),
    (r"acoustic_decoder\.norm\.(.+)", lambda m: f"generator.backbone.final_layer_norm.{m[1]}"),
    (r"acoustic_decoder\.head\.linear\.(.+)", lambda m: f"generator.head.out.{m[1]}"),
    (r"acoustic_decoder\.((embed|prior_net|post_net)\..+)", lambda m: f"generator.backbone.{m[1]}"),
]


def original_name(name: str) -> str:
    for pattern, build in _TO_ORIGINAL:
        match = re.fullmatch(pattern, name)
        if match:
            return build(match)
    raise AssertionError(f"no original name for {name}")


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split rotary rows back to the original interleaved pairs."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def to_original_state(state: dict[str, torch.Tensor], heads: int, semantic_layers: int) -> dict[str, torch.Tensor]:
    """The weights as X-Codec-2.0 saves them, with the extras a real file carries."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        attn = re.fullmatch(r"acoustic_decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", name)
        if attn:
            fused.setdefault(attn[1], {})[attn[2]] = tensor
            continue
        original = original_name(name)
        conv = re.fullmatch(r"(CodecEnc\..+)\.weight", original)
        if conv and tensor.dim() == 3:
            # Weight norm: v is the weight scaled by a power of two per output channel (so the
            # fold g * v / |v| is exact and must really normalise), g its norm.
            scale = 2.0 ** torch.tensor([(-1) ** i * (i % 3) for i in range(tensor.shape[0])], dtype=tensor.dtype)
            v = tensor * scale.to(tensor.device).view(-1, 1, 1)
            g = tensor.flatten(1).norm(dim=1).view(-1, 1, 1)
            if conv[1].startswith("CodecEnc.conv_final_block"):
                # torch's newer parametrisation names, as a re-saved checkpoint would have them
                out[f"{conv[1]}.parametrizations.weight.original0"] = g
                out[f"{conv[1]}.parametrizations.weight.original1"] = v
            else:
                out[f"{conv[1]}.weight_g"], out[f"{conv[1]}.weight_v"] = g, v
            continue
        out[original] = tensor
    for layer, parts in fused.items():
        out[f"generator.backbone.transformers.{layer}.att.c_attn.weight"] = torch.cat(
            [interleave_rope_rows(parts["q"], heads), interleave_rope_rows(parts["k"], heads), parts["v"]])
    # A stale cached `.weight` beside its weight-norm pair (transformers' converter drops it).
    out["CodecEnc.conv_blocks.0.weight"] = torch.full_like(state["acoustic_encoder.conv1.weight"], 7.0)
    # Buffers transformers recomputes.
    out["CodecEnc.conv_blocks.1.block.3.upsample.filter"] = torch.ones(1, 1, 12)
    out["CodecEnc.conv_blocks.1.block.3.downsample.lowpass.filter"] = torch.ones(1, 1, 12)
    out["generator.head.istft.window"] = torch.ones(1280)
    out["generator.quantizer.layers.0.levels"] = torch.tensor([4] * 8)
    # w2v-BERT's layers past the ones XCodec2 reads, and training-only heads.
    for name in [n for n in out if n.startswith("semantic_model.encoder.layers.0.")]:
        out[name.replace(".layers.0.", f".layers.{semantic_layers}.")] = out[name].clone()
    out["fc_post_s.weight"] = torch.ones(4, 4)
    out["SemanticDecoder_module.initial_conv.weight"] = torch.ones(4, 4, 3)
    return out


def save_original_codec(codec: Codec, folder: Path, edit=None) -> Path:
    config = codec.model.config
    state = to_original_state(codec.model.state_dict(), config.num_attention_heads,
                              config.semantic_model_config.num_hidden_layers)
    if edit:
        edit(state)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    # The original config names sizes only; the tiny architecture adds transformers' own
    # fields (hidden_size and quantization_dim are left to the converter to derive).
    shape = {k: v for k, v in config.to_dict().items()
             if k in type(config).__annotations__ and k not in ("hidden_size", "quantization_dim")}
    original = {"model_type": "xcodec2", "architectures": ["XCodec2Model"], "use_vocos": True,
                "codec_decoder_hidden_size": config.hidden_size, "codec_encoder_hidden_size": config.hidden_size,
                "semantic_hidden_size": config.semantic_model_config.hidden_size, **shape}
    (folder / "config.json").write_text(json.dumps(original))
    return folder


def test_an_original_format_codec_converts_to_the_same_codec(codec: Codec, tmp_path: Path, hub: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from autotune.xcodec2_convert import converted_root, original_weights_file

    folder = save_original_codec(codec, tmp_path / "xcodec2")
    assert original_weights_file(folder) == folder / "model.safetensors"
    assert original_weights_file(save_hf_codec(codec, tmp_path / "hf")) is None

    converted = load_codec(str(folder))
    assert "converting the original-format XCodec2 checkpoint" in capsys.readouterr().err
    reference = codec.model.state_dict()
    assert set(converted.model.state_dict()) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(converted.model.state_dict()[name], tensor), name
    test_wave = wave(1.3, seed=5)
    codes = converted.encode(test_wave)
    assert codes == codec.encode(test_wave)
    assert np.array_equal(converted.decode(codes), codec.decode(codes))

    (done,) = converted_root().iterdir()  # one finished folder, no staging leftovers
    assert done.parent == hub / "llasa-autotune" / "xcodec2-converted"
    assert sorted(p.name for p in done.iterdir()) == ["config.json", "converted_from.json", "model.safetensors",
                                                      "preprocessor_config.json"]
    again = load_codec(str(folder))  # converted once: the second load reads the cached folder
    assert "converting" not in capsys.readouterr().err
    assert again.codec_id == converted.codec_id == DeferredCodec(str(folder)).codec_id
    assert again.encode(test_wave) == codes


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s.pop("generator.backbone.transformers.0.mlp.fc2.weight"),
         "1 weight missing (`acoustic_decoder.layers.0.mlp.fc2.weight`)"),
        (lambda s: s.update({"CodecEnc.conv_blocks.1.block.5.bias": s.pop("CodecEnc.conv_blocks.1.block.4.bias")}),
         "1 weight missing (`acoustic_encoder.block.0.conv1.bias`); 1 unexpected (`CodecEnc.conv_blocks.1.block.5.bias`)"),
    ],
    ids=["removed", "renamed"],
)
def test_an_original_codec_that_does_not_convert_is_one_error_and_leaves_nothing(
        codec: Codec, tmp_path: Path, hub: Path, edit, expected: str) -> None:
    from autotune.xcodec2_convert import converted_root

    folder = save_original_codec(codec, tmp_path / "xcodec2", edit)
    audio = tmp_path / "audio" / "a.wav"
    write_wav(audio, wave())
    cache = tmp_path / "cache"
    with pytest.raises(AutotuneError) as info:
        encode_files([audio], DeferredCodec(str(folder)), cache, progress=False)
    message = info.value.one_line()
    assert message.startswith(f"the original-format XCodec2 checkpoint `{folder}` does not convert to "
                              f"transformers' Xcodec2Model ({expected})")
    assert "HKUSTAudio/xcodec2-hf" in message
    assert not list(cache.rglob("*"))
    assert not list(converted_root().iterdir())


def test_an_original_codec_in_the_hub_cache_loads_by_its_id(codec: Codec, tmp_path: Path, hub: Path) -> None:
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub / "hub" / "models--HKUSTAudio--xcodec2"
    save_original_codec(codec, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    deferred = DeferredCodec("HKUSTAudio/xcodec2")
    assert deferred.codec_id == f"HKUSTAudio/xcodec2@{commit}"
    loaded = deferred.load()
    assert loaded.codec_id == deferred.codec_id
    test_wave = wave(0.7, seed=6)
    assert loaded.encode(test_wave) == codec.encode(test_wave)


def test_the_conversion_covers_every_weight_of_the_released_architecture() -> None:
    """The real-size codec, on the meta device: every weight of `Xcodec2Model` comes out
    of the original layout with its shape, and w2v-BERT's layers 16-23 are dropped."""
    from transformers import Xcodec2Model

    from autotune.xcodec2_convert import original_to_transformers, target_config

    config = target_config({"model_type": "xcodec2", "codec_decoder_hidden_size": 1024,
                            "codec_encoder_hidden_size": 1024, "semantic_hidden_size": 1024, "use_vocos": True})
    assert (config.hidden_size, config.quantization_dim, config.semantic_model_config.num_hidden_layers) == (1024, 2048, 16)
    with torch.device("meta"):
        expected = Xcodec2Model(config).state_dict()
    original = to_original_state(expected, config.num_attention_heads, 16)
    for layer in range(17, 24):
        for name in [n for n in original if n.startswith("semantic_model.encoder.layers.0.")]:
            original[name.replace(".layers.0.", f".layers.{layer}.")] = original[name]
    converted, unknown = original_to_transformers(original, config)
    assert unknown == []
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


# --------------------------------------------------------------------------- Anime-XCodec2's spellings


def anime_spelling(state: dict[str, torch.Tensor]) -> None:
    """Rename a plain original checkpoint's weights as NandemoGHS/Anime-XCodec2 names them:
    torch's parametrised weight norm (`parametrizations.weight.original0/1`) and SnakeBeta's
    `act.bias` for `act.beta` (the names llasa-trainer's convert_weight_norm_key.py renames back)."""
    for name in list(state):
        for plain, theirs in ((".weight_g", ".parametrizations.weight.original0"),
                              (".weight_v", ".parametrizations.weight.original1"), (".act.beta", ".act.bias")):
            if name.endswith(plain):
                state[name[: -len(plain)] + theirs] = state.pop(name)


def test_anime_xcodec2_spellings_convert_to_the_same_codec(codec: Codec, tmp_path: Path, hub: Path) -> None:
    """Before, such a folder was refused ("36 weights missing ...; 36 unexpected ...")."""
    plain = save_original_codec(codec, tmp_path / "xcodec2")
    anime = save_original_codec(codec, tmp_path / "anime-xcodec2", anime_spelling)
    names = list(load_file(anime / "model.safetensors"))
    # Every activation of the acoustic encoder (36 in the released codec's five blocks, 22 in
    # the tiny one's three) and every weight-normalised convolution.
    plain_names = list(load_file(plain / "model.safetensors"))
    snakes = sum(type(m).__name__ == "Xcodec2SnakeBeta" for m in codec.model.modules())
    normed = sum(n.endswith((".weight_g", ".original0")) for n in plain_names)
    assert sum(n.endswith(".act.bias") for n in names) == sum(n.endswith(".act.beta") for n in plain_names) == snakes
    assert sum(n.endswith(".parametrizations.weight.original0") for n in names) == normed > snakes
    assert not [n for n in names if n.endswith((".act.beta", ".weight_g", ".weight_v"))]

    converted = load_codec(str(anime))
    reference = codec.model.state_dict()
    assert set(converted.model.state_dict()) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(converted.model.state_dict()[name], tensor), name
    # The plain original converts to these same weights (test_an_original_format_codec_converts_to_the_same_codec).
    test_wave = wave(1.3, seed=7)
    assert converted.encode(test_wave) == codec.encode(test_wave)

    (record,) = [json.loads((d / "converted_from.json").read_text()) for d in (hub / "llasa-autotune" /
                 "xcodec2-converted").iterdir() if str(anime) in (d / "converted_from.json").read_text()]
    assert sorted(record["other_spellings_read"].values()) == [snakes, normed, normed]


def test_two_spellings_of_one_weight_are_refused(codec: Codec, tmp_path: Path, hub: Path) -> None:
    beta = "CodecEnc.conv_blocks.1.block.3.act.beta"
    folder = save_original_codec(codec, tmp_path / "both",
                                 lambda s: s.update({beta.replace(".beta", ".bias"): s[beta] + 1.0}))
    with pytest.raises(AutotuneError) as info:
        load_codec(str(folder))
    assert "(1 unexpected (`acoustic_encoder.block.0.snake1.act.bias`))" in info.value.one_line()


# --------------------------------------------------------------------------- half-precision checkpoints


def cast_floats(dtype: torch.dtype):
    def edit(state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            if tensor.is_floating_point():
                state[name] = tensor.to(dtype)
    return edit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_original_checkpoint_runs_as_its_float32_upcast(codec: Codec, tmp_path: Path, hub: Path,
                                                                         dtype: torch.dtype) -> None:
    """Before, a float16 checkpoint converted, loaded as float16 and failed at the first clip
    with a traceback: "mixed dtype (CPU): expect parameter to have scalar type of Float"."""
    half = save_original_codec(codec, tmp_path / "half", cast_floats(dtype))
    assert {v.dtype for v in load_file(half / "model.safetensors").values() if v.is_floating_point()} == {dtype}
    upcast = save_original_codec(codec, tmp_path / "upcast", lambda s: (cast_floats(dtype)(s),
                                                                         cast_floats(torch.float32)(s)))

    loaded = load_codec(str(half))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    test_wave = wave(1.1, seed=8)
    codes = loaded.encode(test_wave)
    assert len(codes) == loaded.num_codes(test_wave.size)
    assert codes == load_codec(str(upcast)).encode(test_wave)
    assert loaded.decode(codes).dtype == np.float32
    for folder in (hub / "llasa-autotune" / "xcodec2-converted").iterdir():
        assert {v.dtype for v in load_file(folder / "model.safetensors").values()} == {torch.float32}


def test_a_float16_transformers_format_codec_runs_in_float32(codec: Codec, tmp_path: Path, hub: Path) -> None:
    import copy

    folder = tmp_path / "xcodec2-hf-fp16"
    copy.deepcopy(codec.model).to(torch.float16).save_pretrained(folder)
    codec.feature_extractor.save_pretrained(folder)
    assert {v.dtype for v in load_file(folder / "model.safetensors").values()} == {torch.float16}

    loaded = load_codec(str(folder))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    rounded = Codec(copy.deepcopy(codec.model).to(torch.float16), codec.feature_extractor, "rounded")
    test_wave = wave(0.9, seed=9)
    assert loaded.encode(test_wave) == rounded.encode(test_wave)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_float16_checkpoint_encodes_on_the_gpu_in_float32(codec: Codec, tmp_path: Path, hub: Path) -> None:
    folder = save_original_codec(codec, tmp_path / "half", cast_floats(torch.float16))
    loaded = load_codec(str(folder), device="cuda")
    assert {(p.device.type, p.dtype) for p in loaded.model.parameters()} == {("cuda", torch.float32)}
    test_wave = wave(1.0, seed=10)
    codes = loaded.encode(test_wave)
    assert len(codes) == 50 and all(0 <= c < 65_536 for c in codes)
    assert loaded.decode(codes).shape == (50 * 320,)
