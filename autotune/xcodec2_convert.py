"""XCodec2 checkpoints on disk: finding them, and converting the original format once.

`locate` turns a codec id into a local folder and a cache key: a folder as
given, or a hub id's snapshot in the local hub cache. Only when the snapshot
is not cached, `HF_HUB_OFFLINE` is unset and the hub answers one request
within `HUB_PROBE_TIMEOUT_S` is it downloaded; otherwise one error says at
once what to do (an offline machine used to wait out half a minute of the hub
client's retries first).

`HKUSTAudio/xcodec2`, the codec named in Llasa's model card and official
scripts, ships X-Codec-2.0's own weight names (`CodecEnc.*`, `generator.*`,
`semantic_model.*`, weight-normalised convolutions, a fused attention
projection) and a small config (`codec_decoder_hidden_size`, ...).
transformers' `Xcodec2Model` loads `HKUSTAudio/xcodec2-hf` instead. This
module recognises the original format and rewrites it into a folder that
`Xcodec2Model.from_pretrained` loads strictly: `config.json`,
`model.safetensors` and `preprocessor_config.json`.

The rename rules are a port of transformers' own converter,
`src/transformers/models/xcodec2/convert_xcodec2_checkpoint.py` (earlier named
`convert_xcodec2_checkpoint_to_pytorch.py`) in huggingface/transformers, to the
module names of the installed transformers 5 modeling (`acoustic_decoder`,
`prior_net.N`, `quantizer.quantizer`, `acoustic_decoder.norm`: the names the same
mapping uses in the sibling `models/neucodec/convert_neucodec_checkpoint.py`,
which states that it mirrors the XCodec2 one). What the port does:

* first reads the other spellings community checkpoints use for the same
  weights (see `_SPELLINGS`): `parametrizations.weight.original0/1` (torch's
  newer `parametrizations.weight_norm`) for `weight_g`/`weight_v`, and
  `act.bias` for the SnakeBeta activations' `act.beta`. NandemoGHS/Anime-XCodec2
  ships both; llasa-trainer has its users rename them by hand
  (`script/convert_weight_norm_key.py`) before transformers' converter runs;
* renames (see `_RULES`), with the encoder's `conv_blocks.0` becoming
  `conv1` and `conv_blocks.N` becoming `block.N-1`;
* folds weight norm (`weight_g`/`weight_v`) into a plain `weight`
  (transformers' script applies and then removes weight norm on the model,
  which computes the same `g * v / |v|`), in float32;
* splits the fused `att.c_attn` into `q_proj`, `k_proj`, `v_proj` and permutes
  the query and key rows from interleaved to half-split rotary order;
* drops buffers transformers recomputes (anti-aliasing filters, the ISTFT
  window, FSQ levels/basis/codebook), the semantic model's layers past the
  ones XCodec2 reads (it uses w2v-BERT 2.0's hidden state after layer 16), and
  training-only heads (`fc_post_s`, `SemanticDecoder_module`, discriminators).

Every weight is written in float32, the dtype the codec runs in
(`autotune.codec.CODEC_DTYPE_NAME`): a checkpoint saved in float16 or bfloat16
converts as its float32 upcast would, its weight norm folded from the float32
values, as X-Codec-2.0's float32 modules compute it when they load such a file.

Anything left over, missing or of the wrong shape is an `AutotuneError`: a
checkpoint converts completely or not at all.

Where the converted folder goes: `$HF_HOME/llasa-autotune/xcodec2-converted/<name>-<hash>/`
(`HF_HOME` defaults to `~/.cache/huggingface`). It sits beside the hub cache
it is derived from, so it follows a relocated `HF_HOME` to the big disk, and
the codes cache (small JSON files next to the runs) stays small. The hash is of
the source's identity (`repo@commit` for a hub snapshot; path, file names,
sizes and dates for a local folder) and of `CONVERTER_VERSION`, so a changed
source or a fixed converter converts again. The folder is written under a
temporary name and renamed into place, so an interrupted or failed conversion
leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import AutotuneError
from autotune.llasa import DEFAULT_CODEC, TINY
from autotune.loading import hub_unreachable

if TYPE_CHECKING:
    import torch
    from transformers import Xcodec2Config

__all__ = [
    "CONVERTER_VERSION",
    "convert_checkpoint",
    "converted_folder",
    "converted_root",
    "locate",
    "original_spelling",
    "original_to_transformers",
    "original_weights_file",
    "rename",
    "target_config",
]

#: Part of the converted folder's key: raise it when the conversion's output changes.
#: 2: float32 output whatever the source's dtype; Anime-XCodec2's spellings.
CONVERTER_VERSION = 2


# --------------------------------------------------------------------------- finding a checkpoint

#: What `--codec` may name, for messages.
FOLDER_HINT = (
    "an XCodec2 checkpoint: transformers' format (config.json and model.safetensors, e.g. a download of "
    f"`{DEFAULT_CODEC}`) or the original one (`HKUSTAudio/xcodec2`), or use `--codec {TINY}` for an "
    "offline test"
)



#: Files a codec needs from a hub repository (both formats); nothing else is downloaded.
_HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-*.safetensors"]


def locate(codec_id: str, *, weights: bool) -> tuple[Path, str]:
    """The local folder holding `codec_id`'s checkpoint, and the cache key of its weights.

    Hub checkpoints are keyed by their commit (the snapshot folder of the hub
    cache; transformers 5 configs no longer carry it); local folders by the
    name, size and modification time of their files, which is cheap where
    hashing gigabytes of weights on every run is not. With `weights=False` only
    the config of a hub checkpoint is fetched, enough for the key.
    """
    local = Path(codec_id).expanduser()
    looks_local = codec_id.startswith(("/", "./", "../", "~", ".\\", "..\\")) or local.exists()
    if looks_local:
        if not local.is_dir():
            raise AutotuneError(f"could not load the codec `{codec_id}`: no such folder; pass a folder holding "
                                f"{FOLDER_HINT}")
        digest = hashlib.sha256()
        files = [p for p in local.iterdir() if p.is_file()] + sorted((local / "ckpt").glob("*.ckpt"))
        for entry in sorted(files):
            stat = entry.stat()
            digest.update(f"{entry.relative_to(local).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return local, f"{local.resolve()}#{digest.hexdigest()[:16]}"
    folder = _hub_snapshot(codec_id, weights=weights)
    commit = folder.name if folder.parent.name == "snapshots" else None
    return folder, f"{codec_id}@{commit}" if commit else codec_id


def _hub_snapshot(repo_id: str, *, weights: bool) -> Path:
    """The hub-cache snapshot folder of `repo_id`: from the local cache, else downloaded.

    The network is only tried when `HF_HUB_OFFLINE` is unset and the endpoint
    answers a single request within `HUB_PROBE_TIMEOUT_S`, so an offline machine
    gets its one-line answer at once instead of after the hub client's retries.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: the download below names the problem
        cached = None
    if isinstance(cached, str):
        folder = Path(cached).parent
        if not weights or any((folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json")):
            return folder

    def not_on_disk(why: str) -> AutotuneError:
        return AutotuneError(f"could not load the codec `{repo_id}` (not in the local hub cache, and {why}): "
                             f"download it once (`hf download {repo_id}`) and run again, or pass its folder "
                             f"with `--codec PATH`; `--codec {TINY}` runs an offline test")

    if constants.HF_HUB_OFFLINE:
        raise not_on_disk("HF_HUB_OFFLINE is set")
    unreachable = hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise not_on_disk(f"the hub at {constants.ENDPOINT} cannot be reached: {unreachable}")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if weights:
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
        return Path(hf_hub_download(repo_id, "config.json")).parent
    except Exception as exc:  # noqa: BLE001 - unknown id, gated repo, network failure...: the user's to fix
        raise AutotuneError(f"could not load the codec `{repo_id}` ({_first_line(exc)}): check the id, or download "
                            f"it once and pass a local folder with `--codec PATH`; `--codec {TINY}` runs "
                            "an offline test") from exc


# --------------------------------------------------------------------------- recognising the format

#: First name components that only X-Codec-2.0's original layout uses.
_ORIGINAL_ROOTS = ("CodecEnc.", "generator.", "SemanticEncoder_module.", "fc_prior.", "fc_post_a.")


def original_weights_file(folder: str | os.PathLike[str]) -> Path | None:
    """The weights file when `folder` holds an original-format XCodec2 checkpoint, else None.

    `model.safetensors` counts when its weight names are the original ones; a
    Lightning training checkpoint `ckpt/*.ckpt` counts when there is no
    safetensors file. Only the safetensors header is read.
    """
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                names = list(handle.keys())
        except Exception:  # noqa: BLE001 - a damaged file is from_pretrained's to report
            return None
        return weights if any(n.startswith(_ORIGINAL_ROOTS) for n in names) else None
    if (folder / "model.safetensors.index.json").is_file():
        return None
    checkpoints = sorted((folder / "ckpt").glob("*.ckpt"))
    return checkpoints[-1] if checkpoints else None


# --------------------------------------------------------------------------- the rename rules

#: Training-only parts of original checkpoints with no place in the inference model:
#: the semantic reconstruction head (listed as ignored keys by transformers' NeuCodec
#: converter, the same family) and GAN discriminators of training checkpoints.
_TRAINING_ONLY = re.compile(r"^(fc_post_s|SemanticDecoder_module)\.|^[^.]*discriminator")

#: Buffers transformers computes at build time (non-persistent there), saved by the original code.
_DERIVED_BUFFER = re.compile(r"\.(upsample\.filter|downsample\.(lowpass\.)?filter|window|levels|basis|codebook)$")

# ResidualUnit's nn.Sequential in X-Codec-2.0: activation, conv (k=7), activation, conv (k=1).
_RESIDUAL_PARTS = ("snake1", "conv1", "snake2", "conv2")


def _rule(pattern: str, build: Callable[[re.Match[str]], str]) -> tuple[re.Pattern[str], Callable[[re.Match[str]], str]]:
    return re.compile(pattern), build


# Full-name rules, first match wins. The encoder's `conv_blocks` index shifts down
# by one because its first entry became `conv1`; EncoderBlock's Sequential holds
# three ResidualUnits, an activation and the strided conv.
_RULES = [
    _rule(r"semantic_model\.(.+)", lambda m: f"semantic_encoder.{m[1]}"),
    _rule(r"SemanticEncoder_module\.initial_conv\.(.+)", lambda m: f"semantic_adapter.conv1.{m[1]}"),
    _rule(r"SemanticEncoder_module\.residual_blocks\.1\.(.+)", lambda m: f"semantic_adapter.conv2.{m[1]}"),
    _rule(r"SemanticEncoder_module\.residual_blocks\.3\.(.+)", lambda m: f"semantic_adapter.conv3.{m[1]}"),
    _rule(r"SemanticEncoder_module\.final_conv\.(.+)", lambda m: f"semantic_adapter.conv4.{m[1]}"),
    _rule(r"CodecEnc\.conv_blocks\.0\.(.+)", lambda m: f"acoustic_encoder.conv1.{m[1]}"),
    _rule(r"CodecEnc\.conv_blocks\.(\d+)\.block\.([012])\.block\.([0-3])\.(.+)",
          lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.res_unit{int(m[2]) + 1}.{_RESIDUAL_PARTS[int(m[3])]}.{m[4]}"),
    _rule(r"CodecEnc\.conv_blocks\.(\d+)\.block\.3\.(.+)", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.snake1.{m[2]}"),
    _rule(r"CodecEnc\.conv_blocks\.(\d+)\.block\.4\.(.+)", lambda m: f"acoustic_encoder.block.{int(m[1]) - 1}.conv1.{m[2]}"),
    _rule(r"CodecEnc\.conv_final_block\.0\.(.+)", lambda m: f"acoustic_encoder.snake1.{m[1]}"),
    _rule(r"CodecEnc\.conv_final_block\.1\.(.+)", lambda m: f"acoustic_encoder.conv2.{m[1]}"),
    _rule(r"fc_prior\.(.+)", lambda m: f"fc_encoder.{m[1]}"),
    _rule(r"fc_post_a\.(.+)", lambda m: f"acoustic_decoder.fc.{m[1]}"),
    # The single FSQ of the original ResidualFSQ; the projections sit on the residual wrapper.
    _rule(r"generator\.quantizer\.layers\.0\.(.+)", lambda m: f"quantizer.quantizer.{m[1]}"),
    _rule(r"generator\.quantizer\.(.+)", lambda m: f"quantizer.{m[1]}"),
    _rule(r"generator\.backbone\.transformers\.(\d+)\.att\.c_proj\.(.+)",
          lambda m: f"acoustic_decoder.layers.{m[1]}.self_attn.o_proj.{m[2]}"),
    _rule(r"generator\.backbone\.transformers\.(\d+)\.att_norm\.(.+)",
          lambda m: f"acoustic_decoder.layers.{m[1]}.input_layernorm.{m[2]}"),
    _rule(r"generator\.backbone\.transformers\.(\d+)\.ffn_norm\.(.+)",
          lambda m: f"acoustic_decoder.layers.{m[1]}.post_attention_layernorm.{m[2]}"),
    _rule(r"generator\.backbone\.transformers\.(\d+)\.(.+)", lambda m: f"acoustic_decoder.layers.{m[1]}.{m[2]}"),
    _rule(r"generator\.backbone\.final_layer_norm\.(.+)", lambda m: f"acoustic_decoder.norm.{m[1]}"),
    _rule(r"generator\.backbone\.(.+)", lambda m: f"acoustic_decoder.{m[1]}"),
    _rule(r"generator\.head\.out\.(.+)", lambda m: f"acoustic_decoder.head.linear.{m[1]}"),
    _rule(r"generator\.(.+)", lambda m: f"acoustic_decoder.{m[1]}"),
]
_FUSED_QKV = re.compile(r"generator\.backbone\.transformers\.(\d+)\.att\.c_attn\.(.+)")


def rename(name: str) -> str | None:
    """transformers' name for an original weight name, or None when no rule covers it."""
    for pattern, build in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return build(match)
    return None


# --------------------------------------------------------------------------- conversion


def target_config(original: dict[str, Any]) -> Xcodec2Config:
    """transformers' config for an original checkpoint's `config.json`.

    The original config only names sizes (`codec_decoder_hidden_size`, ...); the
    rest of the architecture is hard-coded in X-Codec-2.0 and equals
    `Xcodec2Config()`'s defaults (the released model, semantic model
    w2v-BERT 2.0 cut to 16 layers). A `config.json` may also carry any of
    `Xcodec2Config`'s own fields, which then win: that is how an original-format
    checkpoint of another size (such as the tests' tiny one) states its shape.
    """
    from transformers import Xcodec2Config

    fields = {k: v for k, v in original.items() if k in Xcodec2Config.__annotations__}
    if "hidden_size" not in fields and "codec_decoder_hidden_size" in original:
        fields["hidden_size"] = original["codec_decoder_hidden_size"]
    try:
        config = Xcodec2Config(**fields)
        if "quantization_dim" not in fields:
            # fc_prior's width: the acoustic and the semantic features side by side.
            fields["quantization_dim"] = config.hidden_size + config.semantic_model_config.hidden_size
            config = Xcodec2Config(**fields)
    except Exception as exc:  # noqa: BLE001 - strict dataclass validation of the user's file
        raise AutotuneError(f"the XCodec2 config.json is not usable ({_first_line(exc)}): download the "
                            "checkpoint again, or use the transformers-format `HKUSTAudio/xcodec2-hf`") from None
    config.architectures = ["Xcodec2Model"]
    return config


#: Other spellings of X-Codec-2.0's own weight names, each renamed to the original one before
#: any rule runs. torch's `nn.utils.parametrizations.weight_norm` stores g and v as
#: `parametrizations.weight.original0`/`original1` where the older `weight_norm` saved
#: `weight_g`/`weight_v`; NandemoGHS/Anime-XCodec2's SnakeBeta names its `beta` `bias`.
#: A renamed weight still has to fit the model exactly, so a wrong guess cannot pass.
_SPELLINGS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.parametrizations\.weight\.original0$"), ".weight_g"),
    (re.compile(r"\.parametrizations\.weight\.original1$"), ".weight_v"),
    (re.compile(r"(^|\.)act\.bias$"), r"\1act.beta"),
)


def original_spelling(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """`state` with every other spelling (`_SPELLINGS`) renamed to X-Codec-2.0's own, and how
    many names each spelling rule renamed.

    A name whose original spelling is also in the checkpoint keeps its own name: two values
    for one weight is no checkpoint to guess about, and the conversion reports it as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, int] = {}
    for name, tensor in state.items():
        for pattern, original in _SPELLINGS:
            new = pattern.sub(original, name)
            if new != name and new not in state:
                renamed[pattern.pattern] = renamed.get(pattern.pattern, 0) + 1
                name = new
                break
        out[name] = tensor
    return out, renamed


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight-normalised pair (g, v) by its weight `g * v / |v|` (norm over all but dim 0).

    Computed in float32: a float16 `|v|` loses digits, and its sum of squares overflows past 65,504."""
    import torch

    out = dict(state)
    for name in list(state):
        if not name.endswith(".weight_g"):
            continue
        base = name[: -len(".weight_g")]
        if base + ".weight_v" not in state:
            continue
        g, v = state[name].to(torch.float32), state[base + ".weight_v"].to(torch.float32)
        norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
        out[base + ".weight"] = v * (g / norm)  # replaces a stale cached `.weight` if one was saved
        del out[name], out[base + ".weight_v"]
    return out


def _rope_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder a query/key projection's rows per head from interleaved pairs to two halves.

    The original attention rotates (x0, x1), (x2, x3), ...; transformers rotates
    the first half of each head against the second (`rotate_half`).
    """
    rows = tensor.shape[0]
    head_dim = rows // num_heads
    return tensor.reshape(num_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(tensor.shape)


def original_to_transformers(state: dict[str, torch.Tensor], config: Xcodec2Config
                             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original weights renamed and reshaped for `Xcodec2Model(config)`, in float32.

    Returns the converted weights and the original names no rule covers.
    Other spellings of the original names are read first (`original_spelling`);
    derived buffers and unused semantic layers are dropped here; whether the
    result matches the model is for the caller to check.
    """
    import torch

    kept_semantic_layers = int(config.semantic_model_config.num_hidden_layers)
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    state = original_spelling({k: v for k, v in state.items() if not _TRAINING_ONLY.search(k)})[0]
    # The codec runs in float32 (autotune.codec.CODEC_DTYPE_NAME): a half-precision file is upcast here,
    # once, and never meets float32 activations at encoding time.
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    for name, tensor in _fold_weight_norm(state).items():
        fused = _FUSED_QKV.fullmatch(name)
        if fused:
            query, key, value = torch.chunk(tensor, 3, dim=0)
            heads = int(config.num_attention_heads)
            prefix = f"acoustic_decoder.layers.{fused[1]}.self_attn"
            converted[f"{prefix}.q_proj.{fused[2]}"] = _rope_rows(query, heads).contiguous()
            converted[f"{prefix}.k_proj.{fused[2]}"] = _rope_rows(key, heads).contiguous()
            converted[f"{prefix}.v_proj.{fused[2]}"] = value.contiguous()
            continue
        new = rename(name)
        if new is None:
            unknown.append(name)
            continue
        if _DERIVED_BUFFER.search(new):
            continue
        layer = re.match(r"semantic_encoder\.encoder\.layers\.(\d+)\.", new)
        if layer and int(layer[1]) >= kept_semantic_layers:
            continue
        converted[new] = tensor
    return converted, unknown


def _read_original(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(weights))
    import torch

    try:
        # weights_only: a checkpoint is data, never code to run.
        payload = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001
        raise AutotuneError(f"cannot read the training checkpoint `{weights}` safely ({_first_line(exc)}): "
                            "put the release's `model.safetensors` beside it, or use the transformers-format "
                            "`HKUSTAudio/xcodec2-hf`") from None
    for key in ("state_dict", "best_state"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    return {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}


def convert_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str], *, label: str | None = None) -> None:
    """Write transformers' format of the original checkpoint in `source` into the folder `target`.

    Raises:
        AutotuneError: `source` holds no original-format checkpoint, or its
            weights do not convert exactly onto `Xcodec2Model` (missing,
            unexpected or wrongly shaped weights are listed).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    from autotune.loading import describe_weight_problems

    source, target = Path(source), Path(target)
    label = label or str(source)
    weights = original_weights_file(source)
    if weights is None:
        raise AutotuneError(f"`{label}` holds no original-format XCodec2 checkpoint (model.safetensors with "
                            "`CodecEnc.*` weights, or ckpt/*.ckpt)")
    try:
        original_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        original_config = {}  # the release's sizes are Xcodec2Config's defaults
    config = target_config(original_config if isinstance(original_config, dict) else {})

    state = _read_original(weights)
    converted, unknown = original_to_transformers(state, config)
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        expected = {k: tuple(v.shape) for k, v in Xcodec2Model(config).state_dict().items()}
    missing = set(expected) - set(converted)
    extra = set(unknown) | (set(converted) - set(expected))
    wrong = [(k, tuple(v.shape), expected[k]) for k, v in converted.items() if k in expected and tuple(v.shape) != expected[k]]
    problems = describe_weight_problems(missing, extra, wrong)
    if problems:
        raise AutotuneError(f"the original-format XCodec2 checkpoint `{label}` does not convert to transformers' "
                            f"Xcodec2Model ({problems}): download it again, or use the transformers-format "
                            "`HKUSTAudio/xcodec2-hf` (`hf download HKUSTAudio/xcodec2-hf`)")

    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(target)
    Xcodec2FeatureExtractor(sampling_rate=config.sampling_rate, hop_length=config.hop_length).save_pretrained(target)
    (target / "converted_from.json").write_text(
        json.dumps({"source": label, "weights": str(weights), "converter_version": CONVERTER_VERSION,
                    "source_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}),
                    "other_spellings_read": original_spelling(state)[1]}) + "\n",
        encoding="utf-8")


def converted_root() -> Path:
    """Where converted checkpoints live: `$HF_HOME/llasa-autotune/xcodec2-converted`."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "llasa-autotune" / "xcodec2-converted"


def converted_folder(source: str | os.PathLike[str], source_key: str, *, label: str | None = None) -> Path:
    """The transformers-format folder for the original checkpoint in `source`, converting it the first time.

    `source_key` identifies the source's content (see the module docstring); the
    same key finds the earlier conversion.

    Raises:
        AutotuneError: the conversion fails (nothing is left behind), or the
            converted folder cannot be written.
    """
    digest = hashlib.sha256(f"{source_key}\0{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source_key.split("#")[0].split("@")[0]).strip("_")[-40:] or "xcodec2"
    root = converted_root()
    final = root / f"{slug}-{digest}"
    if (final / "model.safetensors").is_file() and (final / "config.json").is_file():
        return final
    label = label or str(source)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{slug}-{digest}."))
    except OSError as exc:
        raise AutotuneError(f"cannot write the converted XCodec2 checkpoint under `{root}` ({exc.strerror or exc}): "
                            "make it writable or point `HF_HOME` at a writable folder") from None
    sys.stderr.write(f"converting the original-format XCodec2 checkpoint `{label}` to transformers' format "
                     f"(once) into `{final}`\n")
    try:
        convert_checkpoint(source, staging, label=label)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not another process's finished copy
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise AutotuneError(f"cannot write the converted XCodec2 checkpoint to `{final}` ({exc.strerror or exc}): "
                            "free some disk space or point `HF_HOME` at a folder with room") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
