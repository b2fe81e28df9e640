"""An OpenAI-compatible speech server on one `Voice`: `POST /v1/audio/speech`, `GET /v1/models`,
`GET /health` (FastAPI).

- `model` is a name the server was started with: an `--adapter` folder's name, or a run under
  `--runs` (`my-voice`, `my-voice/checkpoint-300`, `my-voice/kept-checkpoint-300`). Names are
  looked up in what the server found when it scanned those folders; a request never names a
  path, and nothing outside the folders is served (links that lead out are left out).
- `voice` is a speaker of a multi-speaker run, a voice prompt from `--voices DIR` (`NAME.wav` with
  its transcript in `NAME.txt`), or, for a run with one voice, `default` or any of OpenAI's
  stock names (`alloy`, ...), which all mean the run's own voice.
- `response_format`: wav, flac, pcm (OpenAI's: raw 16-bit little-endian mono at 24 kHz), mp3
  and opus (Ogg); aac is refused. Extensions beside OpenAI's fields: temperature, top_p,
  repetition_penalty, seed, max_new_tokens.
- Errors are OpenAI's JSON shape (`{"error": {"message", "type", "param", "code"}}`), 4xx for what
  a client did, never a traceback. Bodies are capped (`MAX_BODY_BYTES`), inputs at 2,000
  characters and at what fits 2,048 positions. A full queue answers 429 at once.
- Requests for the same model arriving within `max_wait_s` of each other are spoken in one
  `generate` call (`batching.Batcher`), each with its own sampling.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from autotune.batching import Batcher, QueueFull
from autotune.errors import AutotuneError
from autotune.files import is_within, read_user_text
from autotune.generation import SpeechItem
from autotune.runs import checkpoints, list_runs
from autotune.voice import FORMATS, Voice, encode_audio, read_clip

MAX_BODY_BYTES = 64 * 1024
MAX_INPUT_CHARS = 4096            # OpenAI's own limit; texts over 2,000 characters are refused as too long to say
STOCK_VOICES = ("default", "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx",
                "sage", "shimmer", "verse")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
RESCAN_EVERY_S = 5.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------ what can be served ---


class Models:
    """Model names -> adapter folders: `--adapter` folders as given, runs under `--runs` as found
    (rescanned at most every few seconds when a name is not known, so new runs appear)."""

    def __init__(self, adapters: dict[str, Path], runs: list[Path]):
        self.fixed = dict(adapters)
        self.roots = [Path(r).expanduser() for r in runs]
        self._found: dict[str, Path] = {}
        self._scanned = 0.0
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for root in self.roots:
            for entry in list_runs(root):
                for checkpoint in checkpoints(entry.path):
                    if not is_within(checkpoint.path, root):
                        continue       # a link out of the folder the server was given
                    name = entry.name if checkpoint.name == "adapter" else f"{entry.name}/{checkpoint.name}"
                    found.setdefault(name, checkpoint.path)
        with self._lock:
            self._found, self._scanned = found, time.monotonic()
        return found

    def all(self) -> dict[str, Path]:
        with self._lock:
            return {**self._found, **self.fixed}

    def find(self, name: str) -> Path | None:
        known = self.all().get(name)
        if known is None and self.roots and time.monotonic() - self._scanned > RESCAN_EVERY_S:
            known = {**self.scan(), **self.fixed}.get(name)
        return known


@dataclass
class VoicePrompt:
    name: str
    clip: Path
    transcript: str
    codes: tuple[int, ...] | None = None


def read_voice_prompts(folder: Path | None) -> dict[str, VoicePrompt]:
    """`NAME.wav` (or .flac/.ogg/.mp3) with its transcript `NAME.txt`, each checked now."""
    if folder is None:
        return {}
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AutotuneError(f"`--voices {folder}` is not a folder: give a folder of NAME.wav clips, each with its "
                            "transcript in NAME.txt")
    prompts: dict[str, VoicePrompt] = {}
    for clip in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        transcript_file = clip.with_suffix(".txt")
        if not transcript_file.is_file():
            raise AutotuneError(f"`--voices`: `{clip.name}` has no transcript: write what it says into "
                                f"`{transcript_file.name}`")
        transcript = read_user_text(transcript_file, what="voice transcript", limit_bytes=64_000).strip()
        if not transcript:
            raise AutotuneError(f"`--voices`: `{transcript_file.name}` is empty: write what `{clip.name}` says")
        read_clip(clip, f"`--voices` clip `{clip.name}`")
        if clip.stem in STOCK_VOICES:
            raise AutotuneError(f"`--voices`: `{clip.name}` is named like OpenAI's stock voice `{clip.stem}`, which "
                                "means the run's own voice here: rename the clip")
        prompts[clip.stem] = VoicePrompt(clip.stem, clip, transcript)
    if not prompts:
        raise AutotuneError(f"`--voices {folder}` holds no clips (.wav, .flac, .ogg, .mp3)")
    return prompts


# ------------------------------------------------------------ the application ---


class SpeechRequest(BaseModel):
    """OpenAI's speech request, and the sampling settings `synthesize.py` takes (extensions)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=300)
    input: str = Field(max_length=MAX_INPUT_CHARS)
    voice: str = Field(max_length=200)
    response_format: Literal["wav", "flac", "pcm", "mp3", "opus", "aac"] | None = None
    speed: float = 1.0
    instructions: str | None = Field(None, max_length=MAX_INPUT_CHARS)
    stream_format: Literal["audio", "sse"] | None = None
    temperature: float = Field(0.8, ge=0.01, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    max_new_tokens: int | None = Field(None, ge=1, le=2048)


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_batch: int = 16
    max_wait_s: float = 0.03
    max_queue: int = 64


def create_app(voice: Voice, models: Models, prompts: dict[str, VoicePrompt], settings: ServerSettings):
    """The FastAPI application (the caller runs it with uvicorn)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.concurrency import run_in_threadpool

    default_format = "mp3" if _writes("mp3") else "wav"    # OpenAI's default, where libsndfile writes it

    def speak_batch(key: Any, items: list[tuple[Any, SpeechItem]]):
        adapter = items[0][0]
        return voice.speak(adapter, [item for _, item in items])

    batcher = Batcher(speak_batch, max_batch=settings.max_batch, max_wait_s=settings.max_wait_s,
                      max_queue=settings.max_queue, name="speech-batcher")
    app = FastAPI(title="llasa-autotune speech", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = " ".join(str(first.get("msg", "invalid request")).split())
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {where}"
        elif first.get("type") == "missing":
            message = f"you must provide `{where}`"
        elif first.get("type") in ("json_invalid", "model_attributes_type"):
            message, where = "the body must be a JSON object (Content-Type: application/json)", None
        elif where:
            message = f"`{where}`: {message}"
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the body must be a JSON object (Content-Type: application/json)"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Never a traceback to the client: a one-line reason, the server's log has the rest.
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        return JSONResponse(ApiError(500, f"the server failed: {reason}", type_="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if expected is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                what = "no API key was given" if not given else "the API key is wrong"
                return JSONResponse(ApiError(401, f"{what}: send `Authorization: Bearer KEY` (the openai client's "
                                                  "`api_key`)", code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base_model": voice.model_name, "codec": voice.codec_id, "device": voice.device,
                "models": len(models.all()), "queue": {"waiting": batcher.waiting, "limit": settings.max_queue,
                                                       "busy": batcher.busy},
                "batches": {"count": batcher.stats.batches, "requests": batcher.stats.requests,
                            "largest": batcher.stats.largest, "rejected": batcher.stats.rejected}}

    @app.get("/v1/models")
    async def list_models():
        names = await run_in_threadpool(models.scan) if models.roots else {}
        data = [{"id": name, "object": "model", "created": _created(path), "owned_by": "llasa-autotune"}
                for name, path in sorted({**names, **models.fixed}.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest):
        body.response_format = body.response_format or default_format
        if body.response_format == "aac" or not _writes(body.response_format):
            raise ApiError(400, f"response_format `{body.response_format}` is not supported here: use one of "
                                f"{', '.join(f for f in FORMATS if _writes(f))}", param="response_format")
        if body.speed != 1.0:
            raise ApiError(400, "`speed` other than 1.0 is not supported: Llasa speaks at its own pace",
                           param="speed")
        if body.instructions:
            raise ApiError(400, "`instructions` are not supported: the voice is the run's (or a voice prompt's)",
                           param="instructions")
        if body.stream_format == "sse":
            raise ApiError(400, "`stream_format: sse` is not supported: the audio comes whole", param="stream_format")
        folder = models.find(body.model)
        if folder is None:
            known = ", ".join(sorted(models.all())[:10]) or "none"
            raise ApiError(404, f"the model `{body.model}` does not exist here: GET /v1/models lists what is served "
                                f"({known})", param="model", code="model_not_found")
        adapter, item = await run_in_threadpool(_prepare, voice, folder, prompts, body)
        try:
            future = batcher.submit(adapter.folder, (adapter, item))
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc}): retry in a few seconds", type_="rate_limit_error",
                           code="queue_full") from None
        try:
            speech_out = await asyncio.wrap_future(future)
        except AutotuneError as exc:
            raise ApiError(400, exc.one_line(), param="input") from None
        data = await run_in_threadpool(encode_audio, speech_out.wave, body.response_format)
        headers = {"X-Audio-Seconds": f"{speech_out.audio_seconds:.3f}",
                   "X-Generated-Tokens": str(speech_out.spoken.generated),
                   "X-Speech-Ended": "true" if speech_out.spoken.ended else "false"}
        return Response(data, media_type=FORMATS[body.response_format], headers=headers)

    app.router.on_shutdown.append(batcher.close)
    return BodyLimit(app, MAX_BODY_BYTES)


def _prepare(voice: Voice, folder: Path, prompts: dict[str, VoicePrompt], body: Any):
    """Load the adapter (strictly, once) and turn the request into a checked SpeechItem."""
    try:
        adapter = voice.adapter(folder)
    except AutotuneError as exc:
        # The folder was served at start-up and broke since (or the base model differs): the server's side.
        raise ApiError(503, exc.one_line(), type_="server_error", param="model", code="model_unavailable") from None
    try:
        speaker, reference = _voice_of(voice, adapter, prompts, body.voice)
    except AutotuneError as exc:
        raise ApiError(400, exc.one_line(), param="voice") from None
    item = SpeechItem(body.input, reference_text=reference.transcript if reference else None,
                      reference_codes=reference.codes if reference else None, speaker=speaker,
                      temperature=body.temperature, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                      max_new_tokens=body.max_new_tokens or voice.default_max_new_tokens(), seed=body.seed)
    try:
        voice.fits(adapter, item)
    except AutotuneError as exc:
        raise ApiError(400, exc.one_line(), param="input") from None
    return adapter, item


def _voice_of(voice: Voice, adapter: Any, prompts: dict[str, VoicePrompt], name: str):
    """(speaker, voice prompt) for a request's `voice`."""
    speakers = adapter.speakers or {}
    if name in speakers:
        return name, None
    if name in prompts:
        if speakers:
            raise AutotuneError(f"voice `{name}` is a voice prompt, but this model speaks several voices by name: "
                                f"use one of its speakers ({', '.join(list(speakers)[:10])})")
        prompt = prompts[name]
        if prompt.codes is None:
            prompt.codes = voice.reference_codes(read_clip(prompt.clip), f"voice `{name}`")
        return None, prompt
    if name.strip().lower() in STOCK_VOICES and not speakers:
        return None, None
    if speakers:
        raise AutotuneError(f"voice `{name}` is not a speaker of this model: use one of {', '.join(list(speakers)[:12])}")
    prompted = f", or a voice prompt: {', '.join(list(prompts)[:12])}" if prompts else ""
    raise AutotuneError(f"voice `{name}` is not known here: use `default` (or an OpenAI stock name such as `alloy`) "
                        f"for the run's own voice{prompted}")


def _created(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


_FORMAT_CHECKS: dict[str, bool] = {}


def _writes(response_format: str) -> bool:
    """Whether this libsndfile can write the format (mp3 and opus need libsndfile >= 1.1)."""
    if response_format not in _FORMAT_CHECKS:
        import numpy as np

        try:
            encode_audio(np.zeros(320, dtype=np.float32), response_format)
            _FORMAT_CHECKS[response_format] = True
        except Exception:  # noqa: BLE001 - any failure means: not available here
            _FORMAT_CHECKS[response_format] = False
    return _FORMAT_CHECKS[response_format]


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 by its Content-Length,
    before any of it is read; a body without a length (chunked) is refused with 411, so no body
    is ever read past the limit."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is None:
                return await _refuse(send, ApiError(411, "send the body with a Content-Length (not chunked)"))
            if not length.isdigit() or int(length) > self.limit:
                return await _refuse(send, ApiError(413, f"the request body is over {self.limit // 1024} KiB: a "
                                                         "speech request is a few lines of text"))
        return await self.app(scope, receive, send)


async def _refuse(send, error: ApiError) -> None:
    import json

    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def api_key_from(flag: str | None) -> str | None:
    """`--api-key`, else the `LLASA_API_KEY` environment variable; None: no key needed."""
    key = flag if flag is not None else os.environ.get("LLASA_API_KEY")
    if key is not None and not key.strip():
        raise AutotuneError("the API key is empty: give a key with `--api-key` or `LLASA_API_KEY`, or neither")
    return key
