"""The XCodec2 speech codec that Llasa speaks: audio <-> discrete codes.

Llasa does not see waveforms. Each 20 ms of 16 kHz mono audio is one code of
XCodec2's single 65,536-entry codebook, so a second of speech is 50 codes.
This module loads that codec (natively from `transformers`, never the PyPI
`xcodec2` package; strictly, and converting the original format on first use)
and runs it; `audio.py` reads the files and `codec_cache.py` keeps the codes.

Only numpy is imported at module level: torch and transformers are imported
inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune.audio import featurize, first_line
from autotune.errors import AutotuneError
from autotune.llasa import DEFAULT_CODEC, HOP_LENGTH, SAMPLING_RATE, TINY

if TYPE_CHECKING:
    import torch
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor


# --------------------------------------------------------------------------- the codec


#: The dtype XCodec2 runs in, on the CPU and on a GPU alike: float32, as X-Codec-2.0's and
#: Llasa's own inference code run it. Its codes come from rounding (FSQ) the output of a
#: w2v-BERT and a deep convolutional encoder, and half precision moves frames to other codes;
#: the codes cache is keyed by the weights, not the device, so a GPU and a CPU must agree.
CODEC_DTYPE_NAME = "float32"


class Codec:
    """An XCodec2 model and its feature extractor, on one device, in `CODEC_DTYPE_NAME`.

    `encode` and `decode` run under `torch.inference_mode()` and take and give
    numpy arrays, so callers never handle tensors. The model is cast to the
    codec's dtype here, whatever it was loaded or saved in: its inputs are made
    in that dtype, and a half-precision model would meet them as "mixed dtype".
    """

    def __init__(
        self,
        model: Xcodec2Model,
        feature_extractor: Xcodec2FeatureExtractor,
        codec_id: str,
        device: str | torch.device = "cpu",
        *,
        cpu_threads: int | None = None,
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = getattr(torch, CODEC_DTYPE_NAME)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.feature_extractor = feature_extractor
        #: Intra-op threads while this codec works on the CPU (None: torch's own setting).
        self.cpu_threads = cpu_threads
        #: Identifies the weights for cache keys: codes from different codecs never mix.
        self.codec_id = codec_id
        self.sampling_rate: int = int(model.config.sampling_rate)
        self.hop_length: int = int(model.config.hop_length)
        self.codes_per_second: int = self.sampling_rate // self.hop_length
        self.codebook_size: int = int(np.prod(model.config.quantization_levels))

    def __repr__(self) -> str:
        return f"Codec({self.codec_id!r}, device={str(self.device)!r})"

    @contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's intra-op thread count set to `cpu_threads` for the duration, then put back."""
        import torch

        before = torch.get_num_threads()
        if self.cpu_threads is None or self.device.type != "cpu" or self.cpu_threads == before:
            yield
            return
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def num_codes(self, num_samples: int) -> int:
        """How many codes `encode` returns for `num_samples` samples: `(num_samples + 1) // 320`.

        The model appends one zero sample, pads up to whole 320-sample frames
        and flags a last, partly padded frame as invalid in its
        `audio_codes_mask`; `encode` keeps only the valid frames. So whole
        seconds give exactly 50 codes per second and a decoded clip is never
        longer than its source. (The original, non-transformers XCodec2 code
        kept one more, trailing code: `num_samples // 320 + 1`.)
        """
        return (int(num_samples) + 1) // self.hop_length

    def encode(self, wave: np.ndarray) -> list[int]:
        """Codes (each in 0..65535) of a float32 mono 16 kHz waveform; see `num_codes` for the count.

        Raises:
            AutotuneError: the clip is shorter than one code (20 ms).
        """
        import torch

        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform of shape (samples,), got shape {wave.shape}")
        count = self.num_codes(wave.size)
        if count == 0:
            raise AutotuneError(
                f"audio is too short to encode ({wave.size} samples; at least {self.hop_length - 1} "
                f"samples, {1000 // self.codes_per_second} ms at {self.sampling_rate} Hz, are needed)"
            )
        with torch.inference_mode(), self._threads():
            inputs = featurize(wave, self.feature_extractor, self.device)
            inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            output = self.model.encode(**inputs, return_dict=True)
        codes = output.audio_codes[0, 0]
        if output.audio_codes_mask is not None:
            codes = codes[output.audio_codes_mask[0].bool()]
        # The model's mask and our count are the same rule; trust the model if they ever differ.
        return [int(c) for c in codes.cpu().tolist()]

    def decode(self, codes: Sequence[int] | np.ndarray) -> np.ndarray:
        """A float32 mono waveform at 16 kHz, exactly `len(codes) * 320` samples long."""
        import torch

        array = np.asarray(codes)
        if array.ndim != 1:
            raise ValueError(f"expected a flat sequence of codes, got shape {array.shape}")
        if array.size == 0:
            return np.zeros(0, dtype=np.float32)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}, got {array.min()}..{array.max()}")
        with torch.inference_mode(), self._threads():
            tensor = torch.as_tensor(array, dtype=torch.long, device=self.device).view(1, 1, -1)
            audio = self.model.decode(audio_codes=tensor, return_dict=True).audio_values
        return audio[0, 0].float().cpu().numpy().astype(np.float32, copy=False)


def _tiny_config() -> Any:
    from transformers import Wav2Vec2BertConfig, Xcodec2Config

    semantic = Wav2Vec2BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        output_hidden_size=32,
        conv_depthwise_kernel_size=3,
    )
    return Xcodec2Config(
        hidden_size=32,  # GroupNorm in the decoder needs a multiple of 32
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        encoder_hidden_size=2,
        semantic_model_config=semantic,
        quantization_dim=32 + 32,  # fc_encoder's output: hidden_size + semantic hidden_size
        # Hop 320 (50 codes per second at 16 kHz) in three encoder blocks, not the real five
        # ([2, 2, 4, 4, 5]): every block runs seven anti-aliased activations (each a 2x
        # upsampling, a SnakeBeta and a downsampling) at its input's rate, so the blocks at 8
        # and 4 kHz cost as much as the one at 16 kHz; three blocks halve the encoding time.
        downsampling_ratios=[8, 8, 5],
        quantization_levels=[4] * 8,  # 4**8 = 65,536 codes, as in the real codec
        sampling_rate=SAMPLING_RATE,
    )


def build_tiny_codec(device: str | torch.device = "cpu") -> Codec:
    """A tiny XCodec2 with random weights, for tests and offline dry runs.

    It has the real codec's interface, rate and codebook (16 kHz, 320-sample
    hop so 50 codes per second, 65,536 codes) and runs the real `Xcodec2Model`
    code, with ~130k parameters and three acoustic encoder blocks instead of
    five, so it builds in well under a second and encodes a 4 s clip in about a
    tenth of a second on one CPU core (`bench/data.py --codec-clips`). Its codes
    mean nothing and its decoded audio is noise: use it to exercise the
    pipeline, never to judge quality.

    It works on one intra-op thread: its tensors (2 to 64 channels) are too
    small for torch to gain from splitting each of its ~700 operations across
    threads, and every split is a barrier where a thread descheduled on a busy
    machine keeps the others spinning (24 clips took minutes on a loaded
    two-core box, against seconds on one thread).

    The weights come from seed 0 inside `torch.random.fork_rng()`, so every
    build is identical and the caller's random state is untouched. Its
    `codec_id` carries a hash of the weights, so caches notice if another
    torch/transformers version initialises it differently.
    """
    import torch
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    config = _tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Xcodec2Model(config)
        _reinit_tiny_weights(model)
    feature_extractor = Xcodec2FeatureExtractor(sampling_rate=config.sampling_rate, hop_length=config.hop_length)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return Codec(model, feature_extractor, f"{TINY}-{digest.hexdigest()[:16]}", device, cpu_threads=1)


def _reinit_tiny_weights(model: Xcodec2Model) -> None:
    """Re-initialise the tiny model so that different audio gives different codes.

    transformers' 0.02-std initialisation shrinks the signal to ~1e-7 through
    the acoustic encoder's many layers, and every frame then lands on the same
    code, which would let tests pass without the audio reaching the codes at
    all. PyTorch's fan-in initialisation keeps activations near unit scale,
    and a fixed gain on the quantizer's input projection spreads the frames
    over the codebook (about 80 distinct codes in 100 frames of a chirp).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.reset_parameters()
        model.quantizer.project_in.weight.mul_(20.0)
        model.quantizer.project_in.bias.zero_()


def load_codec(codec_id: str, device: str = "cpu") -> Codec:
    """Load the codec named `codec_id` onto `device`.

    `codec_id` is `"tiny"` (see `build_tiny_codec`), a local folder, or a
    Hugging Face Hub id such as `DEFAULT_CODEC`. A hub id is taken from the
    local hub cache when it is there; otherwise it is downloaded, unless
    `HF_HUB_OFFLINE` is set or the hub does not answer within a few seconds
    (then one error says how to get it). The checkpoint may be in transformers'
    format (`HKUSTAudio/xcodec2-hf`) or X-Codec-2.0's original one
    (`HKUSTAudio/xcodec2`), which is converted once and cached (see
    `autotune.xcodec2_convert`). Either way the weights load strictly: a
    checkpoint whose weight names do not all match is an error, never a codec
    with random parts.

    Raises:
        AutotuneError: the checkpoint cannot be found or loaded, does not match
            `Xcodec2Model`, or is not a 16 kHz / 50 codes-per-second codec as
            Llasa needs.
    """
    if codec_id == TINY:
        return build_tiny_codec(device)

    from autotune.xcodec2_convert import FOLDER_HINT, converted_folder, locate, original_weights_file

    folder, key = locate(codec_id, weights=True)
    import torch
    from transformers import Xcodec2Model
    from transformers.models.xcodec2.feature_extraction_xcodec2 import Xcodec2FeatureExtractor

    from autotune.loading import strict_from_pretrained

    source = converted_folder(folder, key, label=codec_id) if original_weights_file(folder) else folder
    try:
        # In the dtype the codec runs in, whatever the file holds (a float16 checkpoint would
        # otherwise load as float16 and fail at the first clip with "mixed dtype").
        model = strict_from_pretrained(Xcodec2Model, str(source), label=codec_id, fix=_STRICT_FIX,
                                       dtype=getattr(torch, CODEC_DTYPE_NAME))
    except AutotuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is reported as the user's to fix
        raise AutotuneError(f"could not load the codec `{codec_id}` ({first_line(exc)}): check that the folder "
                            f"holds {FOLDER_HINT}") from exc
    try:
        feature_extractor = Xcodec2FeatureExtractor.from_pretrained(str(source))
    except Exception:  # noqa: BLE001
        # The extractor has no weights, only settings; the model's rate and hop are the ones that matter.
        feature_extractor = Xcodec2FeatureExtractor(
            sampling_rate=model.config.sampling_rate, hop_length=model.config.hop_length
        )
    config = model.config
    if config.sampling_rate != SAMPLING_RATE or config.hop_length != HOP_LENGTH:
        raise AutotuneError(
            f"the codec `{codec_id}` runs at {config.sampling_rate} Hz with a hop of {config.hop_length} samples; "
            f"Llasa needs XCodec2 at {SAMPLING_RATE} Hz with a hop of {HOP_LENGTH} (use `{DEFAULT_CODEC}`)"
        )
    if int(feature_extractor.hop_length) != config.hop_length:
        feature_extractor.hop_length = config.hop_length
    return Codec(model, feature_extractor, key, device)


_STRICT_FIX = (
    f"download it again (`hf download {DEFAULT_CODEC}`) and pass that, or the original `HKUSTAudio/xcodec2` "
    f"(converted automatically); `--codec {TINY}` runs an offline test"
)


class CodecLoadError(AutotuneError):
    """The codec itself could not be loaded (raised once, not once per audio file)."""


class DeferredCodec:
    """Stands in for `load_codec(codec_id)` until audio has to be encoded.

    The cache key (`codec_id`) comes from the checkpoint's files or hub commit
    alone, so when every file's codes are already cached the weights (about a
    gigabyte, and a download or GPU memory) are never loaded, and an
    original-format checkpoint is never converted.
    """

    def __init__(self, codec_id: str, device: str = "cpu") -> None:
        self._name, self._device = codec_id, device
        self._codec: Codec | None = None
        self.codec_id = _cache_id_without_weights(codec_id)

    @property
    def loaded(self) -> bool:
        return self._codec is not None

    def load(self) -> Codec:
        if self._codec is None:
            try:
                self._codec = load_codec(self._name, self._device)
            except AutotuneError as exc:
                # About the codec, not the file being encoded: `encode_files` stops at once,
                # before anything is written to the cache.
                raise CodecLoadError(str(exc), details=exc.details) from exc
            # The same rule as the key above; should a hub commit move in between,
            # encode under the key of the weights actually used.
            self.codec_id = self._codec.codec_id
        return self._codec

    def encode(self, wave: np.ndarray) -> list[int]:
        return self.load().encode(wave)


def _cache_id_without_weights(codec_id: str) -> str:
    """`load_codec(codec_id).codec_id`, reading only names, sizes, dates or the hub's
    config; the tiny codec is built (it is small). A missing folder or an unreachable
    hub id is the same one-line error `load_codec` gives."""
    if codec_id == TINY:
        return build_tiny_codec().codec_id
    from autotune.xcodec2_convert import locate

    return locate(codec_id, weights=False)[1]
