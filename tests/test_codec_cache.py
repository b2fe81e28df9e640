"""The codes cache of `encode_files` is never a reason to fail: bad entries are
encoded again and an unwritable cache is bypassed, each with one warning line,
and nothing half-written is left behind. Real tiny codec, real files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from autotune.audio import write_wav
from autotune.codec import Codec, build_tiny_codec
from autotune.codec_cache import encode_files

SR = 16_000


@pytest.fixture(scope="module")
def codec() -> Codec:
    return build_tiny_codec()


def clips(folder: Path, count: int = 1) -> list[Path]:
    paths = []
    for i in range(count):
        t = np.arange(int(0.5 * SR)) / SR
        path = folder / f"clip{i}.wav"
        write_wav(path, 0.3 * np.sin(2 * np.pi * (180 + 90 * i) * t))
        paths.append(path)
    return paths


def leftovers(cache: Path) -> list[Path]:
    """Anything in the cache that is not a finished entry (temporary files above all)."""
    return [p for p in cache.rglob("*") if not (p.suffix == ".json" and p.is_file() and p.stat().st_size > 0)]


@pytest.fixture
def primed(codec: Codec, tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """One clip, its cache entry, and its true codes."""
    (path,) = clips(tmp_path / "audio")
    cache = tmp_path / "cache"
    codes = encode_files([path], codec, cache, progress=False)[path]
    return path, cache, codes


def corrupt(entry: Path, change) -> None:
    payload = json.loads(entry.read_text())
    change(payload)
    entry.write_text(json.dumps(payload))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["codes"].__setitem__(3, 65_536), "code 65536 outside 0..65535"),
        (lambda p: p["codes"].__setitem__(0, 2**40), f"code {2**40} outside 0..65535"),
        (lambda p: p["codes"].__setitem__(5, -1), "code -1 outside 0..65535"),
        (lambda p: p.__setitem__("codes", []), "no list of codes"),
        (lambda p: p.__setitem__("codes", {"0": 1}), "no list of codes"),
        (lambda p: p.__setitem__("codes", "1 2 3"), "no list of codes"),
        (lambda p: p["codes"].__setitem__(1, 2.5), "codes that are not integers"),
        (lambda p: p["codes"].__setitem__(1, True), "codes that are not integers"),
        (lambda p: p["codes"].pop(), "codes for 8000 samples, not 25"),
        (lambda p: p.__setitem__("num_samples", 16_000), "25 codes for 16000 samples, not 50"),
        (lambda p: p.pop("num_samples"), "no valid `num_samples`"),
        (lambda p: p.__setitem__("codec_id", "another-codec"), "written for another codec or audio"),
    ],
    ids=["65536", "2**40", "-1", "empty", "dict", "string", "float", "bool", "short", "num_samples",
         "no-num_samples", "other-codec"],
)
def test_an_invalid_entry_is_encoded_again_with_one_warning(codec: Codec, primed, change, reason: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, cache, codes = primed
    (entry,) = cache.glob("*.json")
    corrupt(entry, change)
    again = encode_files([path], codec, cache, progress=False)
    assert (again.encoded, again.from_cache) == (1, 0)
    assert again[path] == codes
    (warning,) = again.warnings
    assert warning.startswith(f"1 codec cache entry in `{cache}` was invalid and encoded again (`{entry.name}` "
                              f"for {path}: ")
    assert reason in warning
    assert capsys.readouterr().err == f"warning: {warning}\n"
    # The entry was repaired: the next run reads it without a word.
    third = encode_files([path], codec, cache, progress=False)
    assert (third.from_cache, third.warnings) == (1, [])


def test_entries_that_are_not_json_objects_are_encoded_again(codec: Codec, primed) -> None:
    path, cache, codes = primed
    (entry,) = cache.glob("*.json")
    for text, reason in (("{not json", "not valid JSON"), ("[1, 2, 3]", "not a JSON object"), ("", "not valid JSON")):
        entry.write_text(text)
        again = encode_files([path], codec, cache, progress=False)
        assert again[path] == codes and again.encoded == 1
        assert reason in again.warnings[0]


def test_many_bad_entries_make_one_warning_with_a_count(codec: Codec, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    paths = clips(tmp_path / "audio", 3)
    cache = tmp_path / "cache"
    first = encode_files(paths, codec, cache, progress=False)
    for entry in cache.glob("*.json"):
        corrupt(entry, lambda p: p["codes"].__setitem__(0, -1))
    again = encode_files(paths, codec, cache, progress=False)
    assert dict(again) == dict(first) and again.encoded == 3
    assert len(again.warnings) == 1
    assert again.warnings[0].startswith(f"3 codec cache entries in `{cache}` were invalid and encoded again (e.g. `")
    assert capsys.readouterr().err.count("warning:") == 1


def test_an_entry_path_taken_by_a_folder_is_bypassed(codec: Codec, primed) -> None:
    path, cache, codes = primed
    (entry,) = cache.glob("*.json")
    entry.unlink()
    entry.mkdir()
    again = encode_files([path], codec, cache, progress=False)
    assert again[path] == codes and again.encoded == 1
    assert len(again.warnings) == 2
    assert "a folder, not a file" in again.warnings[0]
    assert again.warnings[1].startswith(f"could not write to the codec cache `{cache}` (")
    assert "1 file encoded but not cached" in again.warnings[1]
    assert entry.is_dir() and leftovers(cache) == [entry]


def test_a_full_disk_is_bypassed_after_one_try_and_leaves_no_temporary_file(codec: Codec, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's own ENOSPC: each temporary file is real, but its descriptor writes to /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    paths = clips(tmp_path / "audio", 3)
    cache = tmp_path / "cache"
    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp_on_a_full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        made.append(name)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_a_full_disk)
    result = encode_files(paths, codec, cache, progress=False)
    assert result.encoded == 3 and all(len(result[p]) == 25 for p in paths)
    assert len(made) == 1  # bypassed after the first failure
    (warning,) = result.warnings
    assert "No space left on device" in warning and "3 files encoded but not cached" in warning
    assert list(cache.iterdir()) == []


def _can_create_in(folder: Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def test_a_read_only_cache_is_bypassed_and_still_read(codec: Codec, primed, tmp_path: Path) -> None:
    path, cache, codes = primed
    other = clips(tmp_path / "more", 1)[0]
    cache.chmod(0o555)
    try:
        if _can_create_in(cache):
            pytest.skip("this user may write to read-only folders (root)")
        result = encode_files([path, other], codec, cache, progress=False)
        assert (result.from_cache, result.encoded) == (1, 1) and result[path] == codes
        (warning,) = result.warnings
        assert warning.startswith(f"could not write to the codec cache `{cache}` (") and "Permission denied" in warning
        assert leftovers(cache) == []
    finally:
        cache.chmod(0o755)


@pytest.mark.parametrize("kind", ["below-a-file", "sysfs"])
def test_a_cache_folder_that_cannot_exist_or_take_files_is_bypassed(codec: Codec, tmp_path: Path, kind: str) -> None:
    """Unwritable for every user, root included: a path under a regular file, and sysfs."""
    if kind == "below-a-file":
        (tmp_path / "a-file").write_text("not a folder")
        cache = tmp_path / "a-file" / "cache"
    else:
        cache = Path("/sys/kernel")
        if not cache.is_dir() or _can_create_in(cache):
            pytest.skip("no sysfs here")
    (path,) = clips(tmp_path / "audio")
    result = encode_files([path], codec, cache, progress=False)
    assert result.encoded == 1 and len(result[path]) == 25
    (warning,) = result.warnings
    assert warning.startswith(f"could not write to the codec cache `{cache}` (")


def test_the_progress_shows_an_eta_after_the_first_encoded_file() -> None:
    from rich.progress import Progress

    from autotune.codec_cache import _progress_columns

    eta = _progress_columns()[-1]
    with Progress(*_progress_columns(), disable=True) as bar:
        task = bar.add_task("encoding audio", total=10, encoded=0, encode_seconds=0.0)
        bar.advance(task, 4)  # four cached files: no time spent encoding, no estimate yet
        assert eta.render(bar.tasks[task]).plain == ""
        bar.update(task, encoded=1, encode_seconds=2.0, advance=1)  # one file encoded in 2 s, 5 left
        assert eta.render(bar.tasks[task]).plain == "about 0:00:10 left, 0.5 files/s"
        bar.update(task, completed=10)
        assert eta.render(bar.tasks[task]).plain == ""
