"""SentencePiece tokenizer for captions: training, loading, fixed-length encoding.

Special ids are fixed by :func:`train_tokenizer`: pad 0, unk 1, bos 2, eos 3. Encodings append EOS and pad
with 0 (``OV3Config.pad_id``); the text encoder pools at the last non-pad token (the EOS).
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
from ..errors import MissingFile, UsageError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise MissingFile(
                f"tokenizer model {model_path!r} not found; train one with tools/train_tokenizer.py"
            )
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on garbage
            raise UsageError(f"{model_path!r} is not a sentencepiece model ({e})") from None
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOS_ID:
            raise UsageError(
                f"{model_path!r} has pad id {self.sp.pad_id()} / eos id {self.sp.eos_id()}; megatron_ov3 needs "
                f"pad {PAD_ID} / eos {EOS_ID}: train it with tools/train_tokenizer.py"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, length: int) -> np.ndarray:
        """Token ids of ``text`` + EOS, truncated/padded to ``length`` (int64)."""
        ids = self.sp.EncodeAsIds(text)[: length - 1] + [EOS_ID]
        out = np.full(length, PAD_ID, dtype=np.int64)
        out[: len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID, BOS_ID)]
        return self.sp.DecodeIds(ids)

    # pickled into DataLoader workers by path, not by object
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int = 32000,
                    model_type: str = "unigram", character_coverage: float = 0.9995) -> str:
    """Train a sentencepiece model from an iterable of texts; returns the ``.model`` path.

    ``hard_vocab_limit`` is off so that a small corpus gives a smaller vocabulary instead of an error; the
    resulting size is ``Tokenizer(path).vocab_size`` (the training flags read it from the model)."""
    import sentencepiece as spm

    if vocab_size < 8:
        raise UsageError(f"vocab size {vocab_size} is too small; use at least 8")
    sentences = [t.strip() for t in texts if t and t.strip()]
    if not sentences:
        raise UsageError("no non-empty text to train the tokenizer on")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, minloglevel=2, num_threads=2,
    )
    path = model_prefix + ".model"
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return path
