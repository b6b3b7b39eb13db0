import shutil

import pytest
import sentencepiece as spm

from conftest import shared
from para_mini.tokenizer import load_tokenizer

SYSTEM = "You are a helpful, respectful and honest assistant."
CHATS = [  # (query, response, system); messy whitespace on purpose, Meta strips it
    ("What is 2+2?", None, None),
    ("What is 2+2?", "It is 4.", None),
    ("  What is 2+2?\n", " It is 4.\n\n", SYSTEM),
    ("Summarize:\n\nThe cat sat on the mat.", "A cat sat.", SYSTEM),
    ("Translate 'héllo 🙂' to Japanese.", "こんにちは 🙂", None),
]


@pytest.fixture(scope="module")
def llama_model_file():
    return shared("assets", "llama2-tokenizer", "tokenizer.model")


@pytest.fixture(scope="module")
def tok(llama_model_file):
    return load_tokenizer(llama_model_file)


@pytest.fixture(scope="module")
def sp(llama_model_file):
    return spm.SentencePieceProcessor(model_file=str(llama_model_file))


def meta_chat_ids(sp, query, response, system):
    # Meta's llama/generation.py chat_completion for one user turn, answered or not, written out independently.
    content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + query if system else query
    if response is None:
        return [1] + sp.encode(f"[INST] {content.strip()} [/INST]")
    return [1] + sp.encode(f"[INST] {content.strip()} [/INST] {response.strip()} ") + [2]


def hf_llama_tokenizer(model_file, tmp_path, **kwargs):
    # transformers 5 needs protobuf and a directory; LlamaTokenizer(vocab_file=...) silently encodes nothing.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    return transformers.LlamaTokenizer.from_pretrained(tmp_path, **kwargs)


def test_hello_world_is_15043_3186_with_bos_1_and_eos_2(tok):
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.pad_id == 0 and tok.pad_id not in (tok.bos_id, tok.eos_id)


@pytest.mark.parametrize("query,response,system", CHATS)
def test_chat_template_equals_metas_chat_completion(tok, sp, query, response, system):
    prompt_ids, response_ids = tok.encode_chat(query, response, system)
    assert prompt_ids + response_ids == meta_chat_ids(sp, query, response, system)
    # the prompt is exactly what Meta feeds generation for the unanswered turn
    assert prompt_ids == meta_chat_ids(sp, query, None, system)
    # ...and each half is its own segment encoded alone; the response keeps Meta's trailing " " before </s>
    content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + query if system else query
    assert prompt_ids == [1] + sp.encode(f"[INST] {content.strip()} [/INST]")
    if response is None:
        assert response_ids == []
    else:
        assert response_ids == sp.encode(response.strip() + " ") + [2]
        assert response_ids[-2:] == [29871, 2]  # "▁", </s>


def test_empty_system_prompt_means_no_sys_block(tok):
    assert tok.encode_chat("Hi", "Hello", system="") == tok.encode_chat("Hi", "Hello")
    assert tok.encode_chat("Hi", "Hello", system=SYSTEM) != tok.encode_chat("Hi", "Hello")


@pytest.mark.parametrize("query,response,system", [c for c in CHATS if c[0] == c[0].strip()])
def test_chat_template_equals_hugging_face_llama_tokenizer(tok, llama_model_file, tmp_path, query, response, system):
    # legacy=True makes HF give text after a special token the dummy-prefix "▁", as Meta's separate encode calls do,
    # so the whole template string, with "<s>"/"</s>" parsed by HF as special tokens, gives the same ids.
    hf = hf_llama_tokenizer(llama_model_file, tmp_path, legacy=True)
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    text = f"<s>[INST] {sys_block}{query} [/INST]"
    if response is not None:
        text += f" {response.strip()} </s>"
    prompt_ids, response_ids = tok.encode_chat(query, response, system)
    assert hf(text, add_special_tokens=False).input_ids == prompt_ids + response_ids


def test_hugging_face_default_drops_the_prefix_space_after_bos(tok, llama_model_file, tmp_path):
    # A documented edge, not a bug of ours: transformers 5 defaults to legacy=False (Metaspace prepend_scheme="first"),
    # so in "<s>[INST]" the "[" after <s> gets no "▁" (29961) where Meta encodes "▁[" (518). Encoding the segment
    # without the "<s>" text and adding the bos id agrees everywhere.
    hf = hf_llama_tokenizer(llama_model_file, tmp_path)
    prompt_ids, _ = tok.encode_chat("What is 2+2?")
    from_string = hf("<s>[INST] What is 2+2? [/INST]", add_special_tokens=False).input_ids
    assert prompt_ids[:2] == [1, 518] and from_string[:2] == [1, 29961]
    assert from_string[2:] == prompt_ids[2:]
    assert [hf.bos_token_id] + hf("[INST] What is 2+2? [/INST]", add_special_tokens=False).input_ids == prompt_ids


def test_literal_special_token_text_is_not_turned_into_bos_or_eos(tok, sp, llama_model_file, tmp_path):
    text = "a <s> b </s> c"
    assert tok.encode(text) == sp.encode(text)
    assert tok.bos_id not in tok.encode(text) and tok.eos_id not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    prompt_ids, response_ids = tok.encode_chat("say <s>", "ok </s> done")
    ids = prompt_ids + response_ids
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    # Hugging Face, unlike Meta's and our encode, does read "<s>" in plain text as the bos id.
    hf = hf_llama_tokenizer(llama_model_file, tmp_path)
    assert hf.bos_token_id in hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", ["Hello world", "  two  spaces\nand a newline ", "héllo 🙂 日本語", "x = [1, 2]; y = 3.14"])
def test_decode_inverts_encode_and_ignores_bos_eos_pad(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == text


def test_load_tokenizer_accepts_a_directory_or_the_file(llama_model_file, tmp_path):
    shutil.copy(llama_model_file, tmp_path / "tokenizer.model")
    from_dir, from_file = load_tokenizer(tmp_path), load_tokenizer(tmp_path / "tokenizer.model")
    assert from_dir.encode("Hello world") == from_file.encode("Hello world") == [15043, 3186]


def test_load_tokenizer_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model.*tokenizer.model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):  # a directory without the file
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 4])
def test_load_tokenizer_non_sentencepiece_file_raises_value_error(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_stories260k_512_piece_tokenizer_loads_and_round_trips():
    tok = load_tokenizer(shared("assets", "stories260K", "tok512.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    text = "Once upon a time, Lily saw a big dog. She was happy!"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and max(ids) < 512
    assert tok.decode(ids) == text
