"""The tiny checkpoint: offline, reproducible, in the real diffusers layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worker.tiny import build_tiny_checkpoint, ensure_tiny_checkpoint


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_two_builds_are_byte_identical(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again")
    assert digests(again) == digests(tiny_model_dir)
    assert len(digests(again)) >= 8


def test_layout_is_kolors_diffusers(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "KolorsPipeline"
    assert index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"][1] == "ChatGLMModel"
    assert (tiny_model_dir / "tokenizer" / "tokenizer.model").is_file()
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in tiny_model_dir.rglob("*.safetensors"))


def test_ensure_reuses_an_existing_build(tmp_path: Path) -> None:
    target = ensure_tiny_checkpoint(tmp_path / "tiny")
    stamp = (target / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path / "tiny") == target
    assert (target / "model_index.json").stat().st_mtime_ns == stamp
