"""A real byte-level BPE tokenizer, trained in-process on a small multilingual text (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Stop here, or keep going until the end.",
    "Sampling with temperature, top-p and top-k; the model writes one token at a time.\n\n",
    "Grüße aus München! Ça va très bien, merci. ¿Dónde está la biblioteca?",
    "日本語のテキストも少し入れます。東京は大きな都市です。",
    "中文文本：今天天气很好，我们去公园散步吧。",
    "Emoji too: 🙂🚀🎉 and math ∑∫√∞ ≠ ≤ ≥, arrows → ← ↑ ↓.",
    "Русский текст для проверки. Ελληνικά γράμματα. עברית. العربية.",
] * 4


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
    )
