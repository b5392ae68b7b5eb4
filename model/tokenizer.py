"""The text tokenizer: a checkpoint's Qwen2 tokenizer files, loaded offline with `tokenizers`.

`TextTokenizer.from_dir` reads only `tokenizer.json` and `tokenizer_config.json` from the model
directory; nothing is fetched from a hub and no code shipped with the checkpoint is run.
`write_tiny_tokenizer` writes a small but real Qwen2-style tokenizer (byte-level BPE learned from a
built-in caption corpus, NextStep's special tokens at the config's ids) for tests and tiny models.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, pre_tokenizers

from .config import NextStepConfig

ENDOFTEXT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"
IMAGE_AREA_TOKEN = "<|image_area|>"
BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
IMAGE_PLACEHOLDER_TOKEN = "<|image_placeholder|>"
BEGIN_OF_PROMPT_REFINEMENT_TOKEN = "<|begin_of_prompt_refinement|>"
END_OF_PROMPT_REFINEMENT_TOKEN = "<|end_of_prompt_refinement|>"

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The tiny tokenizer's special tokens, in the published order (consecutive ids).
TINY_SPECIAL_TOKENS = (
    ENDOFTEXT_TOKEN,
    PAD_TOKEN,
    IMAGE_AREA_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_PLACEHOLDER_TOKEN,
    BEGIN_OF_PROMPT_REFINEMENT_TOKEN,
    END_OF_PROMPT_REFINEMENT_TOKEN,
)

# The built-in corpus supports about 900 BPE tokens; the tiny vocabulary keeps 504 of them.
MAX_TINY_BPE_TOKENS = 504

# Special token -> the config field that names its id.
IMAGE_TOKEN_ID_FIELDS = {BOI_TOKEN: "boi", EOI_TOKEN: "eoi", IMAGE_PLACEHOLDER_TOKEN: "image_placeholder_id"}
CONFIG_SPECIAL_IDS = {PAD_TOKEN: "pad_token_id_added", **IMAGE_TOKEN_ID_FIELDS}

TINY_CORPUS = (
    "A photo of a cat sitting on a wooden table next to a window.",
    "A small brown dog running across a green field in the morning.",
    "A bowl of fresh fruit with apples, oranges and bananas on a kitchen counter.",
    "An old red car parked on a quiet street at night, lit by a street lamp.",
    "A mountain lake reflecting snowy peaks under a clear blue sky.",
    "A woman wearing a yellow raincoat walking through the city in the rain.",
    "Two children playing with a kite on a sandy beach at sunset.",
    "A close-up photo of a red flower with drops of water on its petals.",
    "A cup of hot coffee and a book on a table in a cozy cafe.",
    "A white horse standing in a field of tall grass beside a wooden fence.",
    "A painting of a ship sailing on a stormy sea with dark clouds.",
    "A modern kitchen with white cabinets, a large window and plants.",
    "A group of people sitting around a campfire in the forest at night.",
    "A black and white photo of an old man reading a newspaper on a bench.",
    "A bird with bright blue feathers sitting on a branch of a tree.",
    "A city skyline at sunset with tall buildings and a bridge over the river.",
    "A plate of pasta with tomato sauce, fresh basil and cheese.",
    "A cartoon drawing of a happy robot waving its hand.",
    "A watercolor painting of a small village by the sea in the summer.",
    "A young girl holding a red balloon in a crowded street market.",
    "A train crossing a stone bridge over a deep green valley.",
    "A cat sleeping on a soft blanket next to a warm fireplace.",
    "A field of sunflowers under a bright sky with white clouds.",
    "A bicycle leaning against a brick wall covered with green ivy.",
    "A lighthouse standing on a rocky cliff above the ocean waves.",
    "A table with a birthday cake, candles and colorful presents.",
    "A dog wearing sunglasses sitting in the front seat of a car.",
    "A snowy forest path with tall pine trees in the early morning light.",
    "A man riding a horse across a desert with sand dunes in the distance.",
    "A vase of pink roses on a wooden shelf in a bright room.",
    "An astronaut floating in space with the earth in the background.",
    "A street at night with neon signs reflected in the wet road.",
    "A pair of running shoes on a track in a large stadium.",
    "A hot air balloon flying over green hills and a winding river.",
    "A portrait of a smiling woman with long dark hair, studio lighting.",
    "A fox standing in the snow looking at the camera.",
    "Make the sky darker and add stars above the mountains.",
    "Change the color of the car to blue and remove the people.",
    "Turn the photo into a painting in the style of an old master.",
    "Add a hat to the dog and make the background a sunny beach.",
    "masterpiece, film grained, best quality.",
    "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, blurry.",
)


class TokenizerError(ValueError):
    """Tokenizer files that cannot be loaded, or that disagree with the model config."""


class TextTokenizer:
    """A checkpoint's text tokenizer: text <-> ids, special-token strings recognised as single ids."""

    def __init__(self, tokenizer: Tokenizer, bos_id: int | None):
        self._tokenizer = tokenizer
        self.bos_id = bos_id

    @classmethod
    def from_dir(cls, directory: str | Path) -> TextTokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional: no BOS when absent)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {directory} does not exist")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # `tokenizers` raises a bare Exception for every parse failure
            raise TokenizerError(f"{tokenizer_file} is not a valid tokenizers file: {err}") from err
        loaded = cls(tokenizer, bos_id=None)
        bos_token = _read_bos_token(directory / "tokenizer_config.json")
        if bos_token is not None:
            loaded.bos_id = loaded.token_id(bos_token)
        return loaded

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing is added around it, special-token strings inside map to their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens included."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """The id of one token string (a special token or a vocabulary entry)."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def check_special_ids(self, config: NextStepConfig) -> None:
        """Raise unless the image special tokens have the config's ids and every id has an embedding."""
        problems = []
        for token, field_name in IMAGE_TOKEN_ID_FIELDS.items():
            expected = getattr(config, field_name)
            actual = self._tokenizer.token_to_id(token)
            if actual != expected:
                found = "is missing" if actual is None else f"has id {actual}"
                problems.append(f"{token} {found} but config.{field_name} is {expected}")
        if self._tokenizer.token_to_id(IMAGE_AREA_TOKEN) is None:
            problems.append(f"{IMAGE_AREA_TOKEN} is missing")
        largest_id = max(self._tokenizer.get_vocab(with_added_tokens=True).values())
        if largest_id >= config.vocab_size:
            problems.append(f"token id {largest_id} has no embedding (config.vocab_size is {config.vocab_size})")
        if problems:
            raise TokenizerError("tokenizer does not match the model config: " + "; ".join(problems))


def _read_bos_token(config_file: Path) -> str | None:
    """The `bos_token` of tokenizer_config.json: a string, {"content": ...} or null."""
    if not config_file.is_file():
        return None
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise TokenizerError(f"{config_file} must contain a JSON object")
    bos = raw.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    if bos is not None and not isinstance(bos, str):
        raise TokenizerError(f"bos_token in {config_file} must be a string, an object with 'content', or null")
    return bos


def tiny_special_ids(config: NextStepConfig) -> dict[str, int]:
    """Special token -> id in the published order, as one run of ids ending the text vocabulary.

    The run starts just below config.pad_token_id_added (<|endoftext|>, [PAD], <|image_area|>, boi, ...),
    so the tiny preset puts them at the top of its 512 ids and the real shapes at 151664.. as Qwen2 does;
    ids between the learned BPE tokens and the run are reserved. Raise if the config's ids differ.
    """
    first_id = config.pad_token_id_added - TINY_SPECIAL_TOKENS.index(PAD_TOKEN)
    last_id = first_id + len(TINY_SPECIAL_TOKENS) - 1
    if first_id < 256 or last_id >= config.vocab_size:
        raise TokenizerError(
            f"the tiny tokenizer needs 256 byte tokens below its special tokens and ids {first_id}..{last_id} "
            f"inside vocab_size {config.vocab_size}"
        )
    ids = {token: first_id + offset for offset, token in enumerate(TINY_SPECIAL_TOKENS)}
    mismatches = [
        f"config.{field_name} is {getattr(config, field_name)}, expected {ids[token]} for {token}"
        for token, field_name in CONFIG_SPECIAL_IDS.items()
        if getattr(config, field_name) != ids[token]
    ]
    if mismatches:
        raise TokenizerError(
            f"the tiny tokenizer puts its special tokens at ids {first_id}..{last_id}: " + "; ".join(mismatches)
        )
    return ids


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255 (index = byte value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # Bytes without a printable look-alike get the code points from 256 on, in byte order.
    remapped = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(remapped)) for byte in range(256)]


def _qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def learn_bpe(corpus: tuple[str, ...], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab (256 bytes + merged tokens, `vocab_size` entries) and its ranked merges.

    Each step merges the most frequent adjacent pair; ties go to the smallest pair, so it is deterministic.
    """
    pre_tokenizer = _qwen2_pre_tokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        words.update(tuple(piece) for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    vocab = {symbol: byte for byte, symbol in enumerate(byte_level_alphabet())}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            raise TokenizerError(
                f"the built-in corpus supports at most {len(vocab)} BPE tokens, {vocab_size} were asked for"
            )
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return vocab, merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _added_token(token: str) -> dict[str, Any]:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _byte_level() -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def write_tiny_tokenizer(directory: str | Path, config: NextStepConfig) -> Path:
    """Write a Qwen2-layout tokenizer for `config` into `directory` (created if missing); same bytes every time."""
    directory = Path(directory)
    special_ids = tiny_special_ids(config)
    vocab, merges = learn_bpe(TINY_CORPUS, vocab_size=min(special_ids[ENDOFTEXT_TOKEN], MAX_TINY_BPE_TOKENS))
    # tokenizers numbers added tokens right after the model vocabulary, so unreachable
    # reserved entries fill any gap up to the configured special ids
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), special_ids[ENDOFTEXT_TOKEN])})
    additional = [token for token in TINY_SPECIAL_TOKENS if token not in (ENDOFTEXT_TOKEN, PAD_TOKEN)]

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, **_added_token(t), "special": True} for t, i in special_ids.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                _byte_level(),
            ],
        },
        "post_processor": _byte_level(),
        "decoder": _byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{left} {right}" for left, right in merges],
        },
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {**_added_token(t), "special": True} for t, i in special_ids.items()},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT_TOKEN,
        "errors": "replace",
        "model_max_length": config.max_position_embeddings,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_tokens_map = {
        "additional_special_tokens": additional,
        "eos_token": _added_token(ENDOFTEXT_TOKEN),
        "pad_token": _added_token(PAD_TOKEN),
    }

    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": _json_text(tokenizer_json),
        "vocab.json": _json_text(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "tokenizer_config.json": _json_text(tokenizer_config),
        "added_tokens.json": _json_text(special_ids, sort_keys=True),
        "special_tokens_map.json": _json_text(special_tokens_map),
    }
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def _json_text(value: Any, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"
