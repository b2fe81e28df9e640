"""The speech server on the tiny model, over real HTTP on the loopback: the official `openai`
client, raw requests for every kind of bad input, batching that keeps each request's own
sampling, a bounded queue, and (slow) 32 concurrent clients."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.speech_runs import make_run, write_tone

pytestmark = pytest.mark.filterwarnings("ignore")
KEY = "test-key-123"


class Running:
    """`serve.py` in a thread of this process, on a free loopback port."""

    def __init__(self, argv: list[str]):
        import uvicorn

        from autotune.commands.serve import prepare

        self.app, sock, settings = prepare(argv + ["--port", "0"])
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="error", limit_concurrency=settings.max_queue + 24,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "runs"
    make_run(root / "solo", checkpoints=(2,))
    make_run(root / "duo", speakers={"alice": 30.0, "bob": 40.0}, seed=5)
    return root


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    write_tone(folder / "narrator.wav", seconds=1.0)
    (folder / "narrator.txt").write_text("a calm voice", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def server(runs, voices):
    running = Running(["--runs", str(runs), "--voices", str(voices), "--api-key", KEY, "--max-wait-ms", "50"])
    yield running
    running.stop()


def post(server, body: dict | str, key: str | None = KEY, **kwargs) -> httpx.Response:
    """A speech request; a str body is sent as it is (JSON that Python's encoder would not write)."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if isinstance(body, str):
        return httpx.post(f"{server.url}/v1/audio/speech", content=body.encode(), timeout=120,
                          headers={**headers, "Content-Type": "application/json"}, **kwargs)
    return httpx.post(f"{server.url}/v1/audio/speech", json=body, headers=headers, timeout=120, **kwargs)


def test_the_openai_client_gets_a_wav_soundfile_reads(server):
    from openai import OpenAI

    client = OpenAI(api_key=KEY, base_url=f"{server.url}/v1")
    models = [m.id for m in client.models.list().data]
    assert {"solo", "solo/checkpoint-2", "duo"} <= set(models)
    response = client.audio.speech.create(model="solo", voice="alloy", input="こんにちは", response_format="wav",
                                          extra_body={"max_new_tokens": 20, "seed": 1})
    path = Path(server.thread.name + ".wav")
    data = response.read()
    wave, rate = sf.read(__import__("io").BytesIO(data))
    assert rate == 16000 and wave.ndim == 1
    assert 0 < wave.size <= 20 * 320 and wave.size % 320 == 0
    assert not path.exists()


def test_flac_pcm_mp3_and_opus_come_as_their_formats(server):
    import io

    wav = post(server, {"model": "solo", "input": "hello", "voice": "default", "response_format": "wav",
                        "max_new_tokens": 10, "seed": 3})
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    frames = sf.info(io.BytesIO(wav.content)).frames
    flac = post(server, {"model": "solo", "input": "hello", "voice": "default", "response_format": "flac",
                         "max_new_tokens": 10, "seed": 3})
    assert flac.headers["content-type"] == "audio/flac"
    same, rate = sf.read(io.BytesIO(flac.content), dtype="int16")
    assert rate == 16000 and np.array_equal(same, sf.read(io.BytesIO(wav.content), dtype="int16")[0])
    pcm = post(server, {"model": "solo", "input": "hello", "voice": "default", "response_format": "pcm",
                        "max_new_tokens": 10, "seed": 3})
    assert pcm.headers["content-type"] == "audio/pcm"
    assert len(pcm.content) == 2 * round(frames * 24000 / 16000), "OpenAI's pcm: 16-bit mono at 24 kHz"
    for name, kind in (("mp3", "audio/mpeg"), ("opus", "audio/ogg")):
        answer = post(server, {"model": "solo", "input": "hello", "voice": "default", "response_format": name,
                               "max_new_tokens": 10, "seed": 3})
        assert answer.status_code == 200 and answer.headers["content-type"] == kind
        assert sf.info(io.BytesIO(answer.content)).samplerate > 0


def test_speakers_and_voice_prompts(server):
    ok = post(server, {"model": "duo", "input": "hi", "voice": "bob", "response_format": "wav", "max_new_tokens": 8})
    assert ok.status_code == 200
    cloned = post(server, {"model": "solo", "input": "hi", "voice": "narrator", "response_format": "wav",
                           "max_new_tokens": 8})
    assert cloned.status_code == 200
    stock = post(server, {"model": "duo", "input": "hi", "voice": "alloy"})
    assert stock.status_code == 400 and "alice, bob" in stock.json()["error"]["message"]


BAD = {
    "unknown model": ({"model": "nope", "input": "hi", "voice": "alloy"}, 404, "does not exist"),
    "a path as model": ({"model": "../solo", "input": "hi", "voice": "alloy"}, 404, "does not exist"),
    "an absolute path as model": ({"model": "/etc", "input": "hi", "voice": "alloy"}, 404, "does not exist"),
    "unknown voice": ({"model": "solo", "input": "hi", "voice": "zed"}, 400, "not known"),
    "unknown speaker": ({"model": "duo", "input": "hi", "voice": "carol"}, 400, "not a speaker"),
    "empty input": ({"model": "solo", "input": "  ", "voice": "alloy"}, 400, "empty"),
    "over-long input": ({"model": "solo", "input": "a" * 2100, "voice": "alloy"}, 400, "2,100 characters"),
    "input past 2048 positions": ({"model": "solo", "input": "b" * 1990, "voice": "alloy"}, 400, "only the first"),
    "over OpenAI's 4096": ({"model": "solo", "input": "c" * 5000, "voice": "alloy"}, 400, "input"),
    "unsupported format": ({"model": "solo", "input": "hi", "voice": "alloy", "response_format": "aac"}, 400,
                           "not supported"),
    "unknown format": ({"model": "solo", "input": "hi", "voice": "alloy", "response_format": "ogg"}, 400,
                       "response_format"),
    "speed": ({"model": "solo", "input": "hi", "voice": "alloy", "speed": 2.0}, 400, "speed"),
    "unknown field": ({"model": "solo", "input": "hi", "voice": "alloy", "volume": 3}, 400, "volume"),
    "missing voice": ({"model": "solo", "input": "hi"}, 400, "voice"),
    "temperature inf": ('{"model": "solo", "input": "hi", "voice": "alloy", "temperature": 1e400}', 400, "temperature"),
    "temperature NaN": ('{"model": "solo", "input": "hi", "voice": "alloy", "temperature": NaN}', 400, "temperature"),
    "seed too big": ({"model": "solo", "input": "hi", "voice": "alloy", "seed": 2 ** 64}, 400, "seed"),
    "undecodable text": ('{"model": "solo", "input": "caf\\ud800", "voice": "alloy"}', 400, "input"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_4xx_in_openais_error_shape(server, case):
    body, status, needle = BAD[case]
    answer = post(server, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"] or needle == error["param"], error
    assert "Traceback" not in answer.text


def test_keys_bodies_and_framing(server):
    for key, needle in ((None, "no API key"), ("wrong", "wrong")):
        answer = post(server, {"model": "solo", "input": "hi", "voice": "alloy"}, key=key)
        assert answer.status_code == 401 and needle in answer.json()["error"]["message"]
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
    big = json.dumps({"model": "solo", "input": "x" * 100_000, "voice": "alloy"})
    answer = httpx.post(f"{server.url}/v1/audio/speech", content=big, timeout=30,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert answer.status_code == 413
    chunked = httpx.post(f"{server.url}/v1/audio/speech", content=iter([big.encode()[:100]]), timeout=30,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert chunked.status_code == 411
    garbage = httpx.post(f"{server.url}/v1/audio/speech", content=b"\xff{not json", timeout=30,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert garbage.status_code == 400 and "JSON" in garbage.json()["error"]["message"]


def test_batched_requests_each_get_their_own_sampling(server):
    """The same request alone and inside a batch of others gives the same audio."""
    body = {"model": "solo", "input": "おはよう", "voice": "alloy", "response_format": "wav", "max_new_tokens": 24,
            "seed": 11}
    alone = post(server, body).content
    before = httpx.get(f"{server.url}/health", timeout=10).json()["batches"]
    others = [{**body, "input": f"text {i}", "seed": i} for i in range(5)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(server, b), [body, *others]))
    after = httpx.get(f"{server.url}/health", timeout=10).json()["batches"]
    assert all(a.status_code == 200 for a in answers)
    assert answers[0].content == alone, "a row's sampling does not depend on the rows beside it"
    assert len({a.content for a in answers}) == 6, "each request is its own speech"
    assert after["requests"] - before["requests"] == 6
    assert after["count"] - before["count"] < 6 and after["largest"] > 1, "they were batched"


def test_a_full_queue_answers_429_at_once_and_loses_nothing(runs):
    running = Running(["--runs", str(runs), "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0"])
    try:
        body = {"model": "solo", "input": "hi", "voice": "alloy", "response_format": "wav", "max_new_tokens": 60}
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            timed = list(pool.map(lambda _: (post(running, body, key=None), time.monotonic() - started), range(8)))
        codes = sorted(a.status_code for a, _ in timed)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        fastest_ok = min(t for a, t in timed if a.status_code == 200)
        for answer, seconds in timed:
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "queue_full"
                assert seconds < fastest_ok + 1.0, "refused at once, not after waiting"
        assert len(timed) == 8
    finally:
        running.stop()


@pytest.mark.slow
def test_32_concurrent_clients_all_answered_none_lost_memory_bounded(server):
    import psutil

    process = psutil.Process()
    body = {"model": "solo", "input": "load test", "voice": "alloy", "response_format": "wav", "max_new_tokens": 12}
    post(server, body)
    rss_before = process.memory_info().rss
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: post(server, {**body, "seed": i}), range(64)))
    rss_after = process.memory_info().rss
    assert len(answers) == 64 and all(a.status_code == 200 for a in answers), [a.status_code for a in answers]
    assert all(len(a.content) > 44 for a in answers)
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["queue"]["waiting"] == 0 and health["batches"]["largest"] > 1
    assert rss_after - rss_before < 400 * 2 ** 20, f"memory grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
