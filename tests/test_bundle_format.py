"""The bundle format's own checks: versions, manifests, size bounds, paths (no model needed)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from aftertune.store.consumer.format import (
    FORMAT_GENAI,
    FORMAT_LOGITS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SCHEMA,
    check_manifest,
    parse_version,
    read_manifest,
    resolve_inside,
    seal,
    verify_bundle,
    write_manifest,
)
from aftertune.store.errors import BundleError

SHA = "ab" * 32


def _manifest(**changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "version": 3,
        "format": FORMAT_LOGITS,
        "files": {
            "model.onnx": {"sha256": SHA, "bytes": 10},
            "tokenizer.json": {"sha256": SHA, "bytes": 0},
        },
    }
    manifest.update(changes)
    return manifest


@pytest.mark.parametrize(
    ("text", "number"),
    [("3", 3), ("v3", 3), (" v12 ", 12), ("007", 7), (4, 4), ("999999999", 999_999_999)],
)
def test_parse_version_takes_ascii_digits(text: str | int, number: int) -> None:
    assert parse_version(text) == number


@pytest.mark.parametrize(
    "bad",
    [
        "v\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to \d, not to us
        "\u0663",
        "\uff13",  # FULLWIDTH DIGIT THREE
        "9" * 3000,
        "1234567890",
        "0",
        "v0",
        0,
        -5,
        True,
        10**9,
    ],
)
def test_parse_version_refuses_other_digits_zero_and_huge_numbers(bad: str | int) -> None:
    t0 = time.monotonic()
    with pytest.raises(BundleError, match=r"not a version|out of range") as caught:
        parse_version(bad)
    assert time.monotonic() - t0 < 0.1
    assert len(str(caught.value)) < 200  # a 3000-digit input is not echoed whole


def test_a_well_formed_manifest_passes() -> None:
    check_manifest(seal(_manifest()), "m")
    check_manifest(_manifest(schema="aftertune.bundle/1"), "m")  # legacy: no checksum yet
    genai = _manifest(
        format=FORMAT_GENAI,
        files={
            "genai_config.json": {"sha256": SHA, "bytes": 2},
            "model.onnx": {"sha256": SHA, "bytes": 2},
        },
        eos_token_id=[1, 2],
        context_length=512,
        prompt={"with_input": "{instruction}\n{input}\n", "without_input": "{instruction}\n"},
    )
    check_manifest(seal(genai), "m")
    with pytest.raises(BundleError, match="manifest needs its contents_sha256"):
        check_manifest(genai, "m")


def test_a_flipped_byte_anywhere_in_a_written_manifest_is_caught(tmp_path: Path) -> None:
    # Before: a flip inside a value no other check reads (created_at, name, the prompt
    # template, lineage; 7 % of single-bit flips in a small manifest) passed as whole.
    (tmp_path / "model.onnx").write_bytes(b"m" * 10)
    (tmp_path / "tokenizer.json").write_text("{}")
    fields = {"name": "t", "version": 3, "format": FORMAT_LOGITS, "prompt": {"a": "{input}"}}
    write_manifest(tmp_path, fields)
    written = (tmp_path / MANIFEST).read_bytes()
    assert read_manifest(tmp_path) == json.loads(written)
    caught = 0
    for at in range(len(written)):
        for bit in range(8):
            flipped = bytearray(written)
            flipped[at] ^= 1 << bit
            (tmp_path / MANIFEST).write_bytes(bytes(flipped))
            try:
                read_manifest(tmp_path)
            except BundleError:
                caught += 1
                continue
            raise AssertionError(f"a flip of bit {bit} at byte {at} passed as whole")
    assert caught == 8 * len(written)


def test_a_sealed_manifest_changed_by_hand_is_refused_and_one_resealed_passes() -> None:
    sealed = seal(_manifest())
    check_manifest(copy.deepcopy(sealed), "m")
    with pytest.raises(BundleError, match="do not match its contents_sha256: the manifest is"):
        check_manifest({**sealed, "name": "other"}, "m")
    check_manifest(seal({**sealed, "name": "other"}), "m")


def _without(name: str) -> dict[str, Any]:
    manifest = _manifest()
    del manifest["files"][name]
    return manifest


def _entry(**entry: Any) -> dict[str, Any]:
    manifest = _manifest()
    manifest["files"]["model.onnx"] = entry
    return manifest


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (_manifest(version=True), "'version' must be an integer"),
        (_manifest(version=-5), "out of range"),
        (_manifest(version=0), "out of range"),
        (_manifest(version="3"), "'version' must be an integer"),
        (_manifest(version=3.0), "'version' must be an integer"),
        (_manifest(version=10**40), "out of range"),
        (_manifest(files={}), "needs model.onnx"),
        (_manifest(files=[]), "lacks a 'files' map"),
        (_without("tokenizer.json"), "format onnx-logits needs tokenizer.json"),
        (_manifest(format=FORMAT_GENAI), "needs genai_config.json"),
        (_manifest(format="pickle"), "'format' must be one of"),
        ({k: v for k, v in _manifest().items() if k != "format"}, "'format' must be one of"),
        (_manifest(schema="other/1"), "not an aftertune.bundle/2 manifest"),
        (_entry(sha256=SHA.upper(), bytes=1), "64 lowercase hex"),
        (_entry(sha256=SHA[:-1], bytes=1), "64 lowercase hex"),
        (_entry(sha256=SHA + "\n", bytes=1), "64 lowercase hex"),
        (_entry(sha256=SHA, bytes=True), "non-negative integer"),
        (_entry(sha256=SHA, bytes=-1), "non-negative integer"),
        (_entry(sha256=SHA, bytes=1.5), "non-negative integer"),
        (_entry(sha256=SHA), "non-negative integer"),
        (_manifest(prompt="{instruction}"), "'prompt' must map"),
        (_manifest(eos_token_id="2"), "'eos_token_id' must be"),
        (_manifest(context_length=-1), "'context_length' must be"),
        (_manifest(pad_token_id="zz"), "'pad_token_id' must be"),
        (_manifest(max_length=-1), "'max_length' must be"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_fault(
    manifest: dict[str, Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        check_manifest(copy.deepcopy(manifest), "the manifest")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "", MANIFEST, "a\\b"])
def test_manifest_paths_stay_inside_and_never_name_the_manifest(path: str) -> None:
    manifest = _manifest()
    manifest["files"][path] = {"sha256": SHA, "bytes": 1}
    with pytest.raises(BundleError, match=r"refused path|cannot list itself"):
        check_manifest(manifest, "m")


def test_a_manifest_past_the_limit_is_refused_unread(tmp_path: Path) -> None:
    # Sparse: 300 MB on paper, nothing on disk. Reading it whole took 968 MB of RSS.
    with open(tmp_path / MANIFEST, "wb") as fh:
        fh.truncate(300 << 20)
    t0 = time.monotonic()
    with pytest.raises(BundleError, match=f"{MAX_MANIFEST_BYTES}-byte limit"):
        read_manifest(tmp_path)
    assert time.monotonic() - t0 < 2


def test_a_file_linking_out_of_the_bundle_does_not_verify(tmp_path: Path) -> None:
    bundle = tmp_path / "v1"
    bundle.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (bundle / "model.onnx").write_bytes(b"model")
    (bundle / "tokenizer.json").symlink_to(secret)
    write_manifest(bundle, {"version": 1, "format": FORMAT_LOGITS})  # hashes the target
    assert json.loads((bundle / MANIFEST).read_bytes())["files"]["tokenizer.json"]["bytes"] == 10
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        resolve_inside(bundle, "tokenizer.json")
    assert resolve_inside(bundle, "model.onnx") == (bundle / "model.onnx").resolve()
