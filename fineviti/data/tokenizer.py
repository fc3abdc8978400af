"""Caption tokenizer: a Hugging Face `tokenizers` JSON file, trained on a data set's own captions when it has none.

The trained tokenizer is a byte-level BPE (any text encodes, no unknown token) with four special tokens at fixed ids:
<pad> = 0, <bos> = 1, <eos> = 2, <image> = 3 (a placeholder for image tokens in stage-2 prompts). Encoding adds
<bos> ... <eos>; text that spells a special token is encoded as text. Truncation to `max_length` keeps <bos>, the
first tokens and a final <eos>, and returns how many tokens it cut, which the loader reports as
PackedBatch.truncated_tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = range(4)


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike, vocab_size: int = 2000) -> Path:
    """Trains a byte-level BPE on `texts` and saves it to `path` (a tokenizer.json); deterministic for the same
    texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise RuntimeError(f"train_tokenizer: special token {token} got id {tokenizer.token_to_id(token)}, "
                               f"expected {i}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def tokenizer_config_path(path: str | os.PathLike) -> Path:
    """The tokenizer_config.json that goes with the tokenizer file at `path`: for a copy named <name>.tokenizer.json
    (an export's), <name>.tokenizer_config.json where there is one; else the tokenizer_config.json beside it."""
    path = Path(path)
    own = _own_config_path(path)
    return own if own.is_file() else path.with_name("tokenizer_config.json")


def _own_config_path(path: Path) -> Path:
    if path.name.endswith(".tokenizer.json"):
        return path.with_name(path.name[:-len("tokenizer.json")] + "tokenizer_config.json")
    return path.with_name("tokenizer_config.json")


def tokenizer_files(source: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer file `source`, read now, with a tokenizer_config.json: its own where it has one, else one that
    names the special tokens it is read with here, so that a copy reads them alike wherever it lies (write_tokenizer).
    Read once when a run starts, the copies a run writes stay the tokenizer its captions were encoded with, even if
    the file is later moved, removed or rewritten."""
    config = tokenizer_config_path(source)
    if config.is_file():
        settings = config.read_bytes()
    else:
        names = special_token_names(source)
        settings = json.dumps({f"{k}_token": v or None for k, v in names.items()}, indent=2).encode()
    return {"tokenizer": Path(source).read_bytes(), "config": settings}


def write_tokenizer(files: dict[str, bytes], target: str | os.PathLike) -> None:
    """Writes tokenizer_files' result as the tokenizer file `target` and its tokenizer_config.json (beside it, or
    <name>.tokenizer_config.json for a target named <name>.tokenizer.json)."""
    target = Path(target)
    target.write_bytes(files["tokenizer"])
    _own_config_path(target).write_bytes(files["config"])


def remove_tokenizer(target: str | os.PathLike) -> None:
    """Removes the tokenizer file `target` and the config write_tokenizer writes beside it, where they exist."""
    target = Path(target)
    target.unlink(missing_ok=True)
    _own_config_path(target).unlink(missing_ok=True)


def special_token_names(path: str | os.PathLike) -> dict[str, str]:
    """The names of the <bos>, <eos> and <pad> tokens of the tokenizer.json at `path`: fineviti's, or a Hugging Face
    model's from the tokenizer_config.json that goes with it (`tokenizer_config_path`: bos_token, eos_token,
    pad_token: a string or {"content": ...}; e.g. Qwen2's eos "<|endoftext|>" and no bos). A name the file leaves
    out keeps fineviti's."""
    names = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
    config = tokenizer_config_path(path)
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{config}: not a readable tokenizer_config.json ({err})") from err
        for key in names:
            value = data.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
            elif f"{key}_token" in data and value is None:  # set to null: the model has none
                names[key] = ""
    return names


class CaptionTokenizer:
    """Loads a tokenizer.json; encodes captions with <bos>/<eos> (as its template adds them) and truncation that
    counts what it cut. Its special ids: fineviti's names, or those a Hugging Face tokenizer_config.json beside the
    file gives (`special_token_names`); None where the tokenizer has no such token (pad then falls back to eos)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CaptionTokenizer: no tokenizer file at {self.path}")
        self.tokenizer = Tokenizer.from_file(str(self.path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # a caption's text that spells a special token ("<eos>", "<image>") is text, not that token (HF tokenizers
        # match added tokens inside the text by default: a caption could end itself early or fake a placeholder)
        if hasattr(self.tokenizer, "encode_special_tokens"):  # (tokenizers >= 0.15)
            self.tokenizer.encode_special_tokens = True
        names = special_token_names(self.path)
        self.bos_id = self.tokenizer.token_to_id(names["bos"]) if names["bos"] else None
        self.eos_id = self.tokenizer.token_to_id(names["eos"]) if names["eos"] else None
        self.pad_id = self.tokenizer.token_to_id(names["pad"]) if names["pad"] else None
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.image_id = self.tokenizer.token_to_id("<image>")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode_batch(self, texts: list[str], max_length: int | None = 256) -> tuple[list[list[int]], int]:
        """Token ids of each text (with <bos>/<eos> when the tokenizer adds them) cut to `max_length`, and the
        number of tokens cut in total."""
        if max_length is not None and max_length < 2:
            raise ValueError(f"encode_batch: max_length must be >= 2 (room for <bos> and <eos>), got {max_length}")
        encodings = self.tokenizer.encode_batch(list(texts))
        out, cut = [], 0
        for enc in encodings:
            ids = enc.ids
            if max_length is not None and len(ids) > max_length:
                cut += len(ids) - max_length
                ends_with_eos = self.eos_id is not None and ids[-1] == self.eos_id
                ids = ids[: max_length - 1] + [ids[-1]] if ends_with_eos else ids[:max_length]
            out.append(list(ids))
        return out, cut

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        # the byte-level pre-tokenizer adds a space before the first word; a trained tokenizer's decode keeps it
        return text[1:] if text.startswith(" ") else text

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])
