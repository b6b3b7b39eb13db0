# SentencePiece tokenizer and the LLaMA-2 chat template (paper Appendix C), following Meta's llama/generation.py.
from pathlib import Path

from sentencepiece import SentencePieceProcessor

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Tokenizer:
    def __init__(self, model_file: str | Path):
        try:
            self.sp = SentencePieceProcessor(model_file=str(model_file))
        except RuntimeError as e:  # sentencepiece reports a bad file as a RuntimeError from C++
            raise ValueError(f"{model_file} is not a SentencePiece model: {e}") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA-2 has no pad piece (pad_id() is -1, which cannot index the embedding). Padding is always masked, so any
        # valid id works; we use <unk> (0) rather than eos, so `ids != pad_id` never hides a real eos from the loss,
        # and with byte fallback <unk> never occurs in encoded text.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # "<s>" in text stays text: SentencePiece never produces control ids from input.
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        special = (self.bos_id, self.eos_id, self.pad_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def encode_chat(
        self, query: str, response: str | None = None, system: str | None = None
    ) -> tuple[list[int], list[int]]:
        # With content = (B_SYS + system + E_SYS + query).strip(), Meta's chat_completion encodes an answered turn as
        #   [bos] + sp("[INST] {content} [/INST] {response} ") + [eos]
        # and an unanswered one as [bos] + sp("[INST] {content} [/INST]"). We cut the answered turn right after
        # "[/INST]": the prompt ids are exactly the unanswered turn (what generation is fed and what PARA pools),
        # the rest is the response the loss is taken on. The cut falls on a space, and SentencePiece never merges
        # across a space, so the two halves are also each segment encoded on its own; the response keeps Meta's
        # trailing " " (a final "▁" before eos), which the model learns to emit before it stops.
        content = B_SYS + system + E_SYS + query if system else query
        prompt = f"{B_INST} {content.strip()} {E_INST}"
        prompt_ids = [self.bos_id] + self.sp.encode(prompt)
        if response is None:
            return prompt_ids, []
        turn = [self.bos_id] + self.sp.encode(f"{prompt} {response.strip()} ")
        assert turn[: len(prompt_ids)] == prompt_ids, "prompt ids must be a prefix of the turn's ids"
        return prompt_ids, turn[len(prompt_ids) :] + [self.eos_id]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    model_file = path / "tokenizer.model" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{model_file} not found: expected a SentencePiece tokenizer.model file or a directory holding one"
        )
    return Tokenizer(model_file)


def find_tokenizer(weights: str | Path) -> Path:
    """The tokenizer that ships with a checkpoint: tokenizer.model inside or beside it (Hugging Face and Meta
    layouts), else a llama2.c tok*.model beside a .bin / .pt (tok512.model for stories260K)."""
    w = Path(weights)
    for c in (w / "tokenizer.model", w.parent / "tokenizer.model", *sorted(w.parent.glob("tok*.model"))):
        if c.is_file():
            return c
    raise FileNotFoundError(f"no tokenizer.model inside or beside {weights}: pass --tokenizer")
