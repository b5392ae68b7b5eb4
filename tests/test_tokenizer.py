"""TextTokenizer loading and encoding, and the tiny Qwen2-style tokenizer writer."""

import json
import shutil

import pytest
from tokenizers import Tokenizer

from model.config import NextStepConfig
from model.tokenizer import TextTokenizer, TokenizerError, write_tiny_tokenizer

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 512,
    "boi": 507,
    "eoi": 508,
    "image_placeholder_id": 509,
    "pad_token_id_added": 505,
}
PUBLISHED_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)


def tiny_config(**overrides) -> NextStepConfig:
    return NextStepConfig.from_dict({**TINY_CONFIG, **overrides})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), tiny_config())


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return TextTokenizer.from_dir(tiny_dir)


def copy_with_json_edit(source, destination, file_name, edit):
    """Copy a tokenizer directory, rewriting one JSON file through `edit(data)`."""
    shutil.copytree(source, destination)
    path = destination / file_name
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return destination


def test_tiny_tokenizer_writes_the_published_file_layout(tiny_dir):
    assert sorted(p.name for p in tiny_dir.iterdir()) == sorted(PUBLISHED_FILES)


def test_tiny_tokenizer_puts_special_tokens_at_the_top_ids(tokenizer):
    expected = {
        "<|endoftext|>": 504,
        "[PAD]": 505,
        "<|image_area|>": 506,
        "<|begin_of_image|>": 507,
        "<|end_of_image|>": 508,
        "<|image_placeholder|>": 509,
        "<|begin_of_prompt_refinement|>": 510,
        "<|end_of_prompt_refinement|>": 511,
    }
    assert {token: tokenizer.token_id(token) for token in expected} == expected


def test_tiny_tokenizer_special_ids_follow_the_config(tmp_path):
    config = tiny_config(vocab_size=600, pad_token_id_added=593, boi=595, eoi=596, image_placeholder_id=597)
    loaded = TextTokenizer.from_dir(write_tiny_tokenizer(tmp_path, config))
    assert loaded.token_id("<|endoftext|>") == 592
    assert loaded.token_id("<|image_area|>") == 594
    assert loaded.token_id("<|end_of_prompt_refinement|>") == 599
    loaded.check_special_ids(config)


def test_tiny_tokenizer_rejects_config_ids_outside_its_layout(tmp_path):
    with pytest.raises(TokenizerError, match="config.boi is 300"):
        write_tiny_tokenizer(tmp_path, tiny_config(boi=300))


def test_tiny_tokenizer_rejects_a_vocab_too_small_for_bytes_and_specials(tmp_path):
    config = tiny_config(vocab_size=260, pad_token_id_added=253, boi=255, eoi=256, image_placeholder_id=257)
    with pytest.raises(TokenizerError, match="needs 256 byte tokens"):
        write_tiny_tokenizer(tmp_path, config)


def test_tiny_tokenizer_reaches_the_published_special_ids(tmp_path):
    config = tiny_config(
        vocab_size=152064, pad_token_id_added=151665, boi=151667, eoi=151668, image_placeholder_id=151669
    )
    loaded = TextTokenizer.from_dir(write_tiny_tokenizer(tmp_path, config))
    loaded.check_special_ids(config)
    assert loaded.encode("a<|begin_of_image|>") == [ord("a"), 151667]


def test_writing_the_tiny_tokenizer_twice_gives_identical_bytes(tiny_dir, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again", tiny_config())
    for name in PUBLISHED_FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_tiny_tokenizer_json_has_the_qwen2_pipeline(tiny_dir):
    data = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert byte_level == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert data["decoder"]["type"] == "ByteLevel"
    assert all(token["special"] and not token["normalized"] for token in data["added_tokens"])
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert raw.get_vocab_size(with_added_tokens=True) == 512
    assert raw.get_vocab_size(with_added_tokens=False) == 504


def test_vocab_and_merges_files_match_the_tokenizer_json(tiny_dir):
    model = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (tiny_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == model["vocab"]
    assert sorted(vocab.values()) == list(range(504))
    assert merge_lines[0] == "#version: 0.2"
    assert merge_lines[1:] == model["merges"]
    for line in merge_lines[1:]:
        left, right = line.split(" ")
        assert left in vocab and right in vocab and left + right in vocab


def test_tokenizer_config_declares_no_bos_and_the_added_tokens(tiny_dir):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads((tiny_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert config["bos_token"] is None
    assert config["eos_token"] == "<|endoftext|>"
    assert {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()} == {
        i: token for token, i in added.items()
    }
    assert added["<|begin_of_image|>"] == 507


def test_tiny_tokenizer_has_no_bos(tokenizer):
    assert tokenizer.bos_id is None


def test_encode_adds_no_special_tokens(tokenizer):
    assert tokenizer.encode("") == []
    assert all(i < 504 for i in tokenizer.encode("A cat on a table."))


def test_encode_recognises_special_token_strings_as_single_ids(tokenizer):
    ids = tokenizer.encode("a dog<|begin_of_image|><|image_placeholder|>sky")
    assert ids == tokenizer.encode("a dog") + [507, 509] + tokenizer.encode("sky")


def test_encode_uses_learned_merges_for_common_caption_words(tokenizer):
    text = " the cat with a"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))


def test_encode_splits_numbers_into_single_digits(tokenizer):
    assert [tokenizer.decode([i]) for i in tokenizer.encode("<|image_area|>32*48")] == [
        "<|image_area|>",
        "3",
        "2",
        "*",
        "4",
        "8",
    ]


def test_byte_tokens_are_the_byte_values(tokenizer):
    # An unmerged byte is encoded as the id equal to its value.
    assert tokenizer.encode("Q") == [ord("Q")]
    assert tokenizer.encode("\n") == [10]
    assert tokenizer.encode("é") == list("é".encode("utf-8"))


ROUND_TRIP_TEXTS = [
    "A photo of a cat.",
    "  two  spaces\n\nnew lines\t",
    "unicode: é ß 猫 🐱",
    "it's <|end_of_image|> done",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_rejects_non_strings(tokenizer):
    with pytest.raises(TokenizerError, match="must be a string"):
        tokenizer.encode(None)


def test_token_id_of_an_unknown_token_is_an_error(tokenizer):
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        tokenizer.token_id("<|no_such_token|>")


@pytest.mark.parametrize("bos_token", ["<|endoftext|>", {"content": "<|endoftext|>", "special": True}])
def test_bos_token_is_read_from_tokenizer_config(tiny_dir, tmp_path, bos_token):
    directory = copy_with_json_edit(
        tiny_dir, tmp_path / "with_bos", "tokenizer_config.json", lambda data: data.update(bos_token=bos_token)
    )
    assert TextTokenizer.from_dir(directory).bos_id == 504


def test_unknown_bos_token_is_an_error(tiny_dir, tmp_path):
    directory = copy_with_json_edit(
        tiny_dir, tmp_path / "bad_bos", "tokenizer_config.json", lambda data: data.update(bos_token="<s>")
    )
    with pytest.raises(TokenizerError, match="'<s>'"):
        TextTokenizer.from_dir(directory)


def test_missing_tokenizer_config_means_no_bos(tiny_dir, tmp_path):
    directory = shutil.copytree(tiny_dir, tmp_path / "no_config")
    (directory / "tokenizer_config.json").unlink()
    assert TextTokenizer.from_dir(directory).bos_id is None


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        TextTokenizer.from_dir(tmp_path / "nowhere")


def test_missing_tokenizer_json_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)


def test_unparsable_tokenizer_json_is_an_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        TextTokenizer.from_dir(tmp_path)


def test_unparsable_tokenizer_config_is_an_error(tiny_dir, tmp_path):
    directory = shutil.copytree(tiny_dir, tmp_path / "bad_config")
    (directory / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        TextTokenizer.from_dir(directory)


def test_check_special_ids_accepts_the_matching_config(tokenizer):
    tokenizer.check_special_ids(tiny_config())


def test_check_special_ids_rejects_a_config_with_other_image_ids(tokenizer):
    config = tiny_config(boi=100, image_placeholder_id=101)
    with pytest.raises(TokenizerError) as caught:
        tokenizer.check_special_ids(config)
    assert "<|begin_of_image|> has id 507 but config.boi is 100" in str(caught.value)
    assert "<|image_placeholder|> has id 509 but config.image_placeholder_id is 101" in str(caught.value)


def test_check_special_ids_rejects_a_tokenizer_without_image_area(tiny_dir, tmp_path):
    def drop_image_area(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_area|>"]

    directory = copy_with_json_edit(tiny_dir, tmp_path / "no_area", "tokenizer.json", drop_image_area)
    with pytest.raises(TokenizerError, match="<\\|image_area\\|> is missing"):
        TextTokenizer.from_dir(directory).check_special_ids(tiny_config())


def test_check_special_ids_rejects_token_ids_beyond_the_embedding(tokenizer):
    config = tiny_config(vocab_size=510)
    with pytest.raises(TokenizerError, match="token id 511 has no embedding"):
        tokenizer.check_special_ids(config)
