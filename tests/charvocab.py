"""A character-level llama2.c tokenizer.bin with no <0xXX> pieces, and a random model for it:
the kind of small public model (e.g. Chinese poetry for microcontrollers) that run.c runs and
whose tokenizer has only <unk>, BOS, EOS and characters."""

import struct
from pathlib import Path

from model_factory import make_config, write_random_checkpoint

VOCAB_SIZE = 320
SEED = 2024


def char_pieces() -> list[tuple[str, float]]:
    """<unk>, BOS, EOS, a space, printable ASCII, CJK characters, then a few two-character merges."""
    pieces = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0), (" ", 0.0)]
    pieces += [(chr(code), 0.0) for code in range(0x21, 0x7F)]
    merges = [("春风", 5.0), ("明月", 4.0), ("山水", 3.0), (" 春", 2.0), ("花落", 1.0)]
    n_chars = VOCAB_SIZE - len(pieces) - len(merges)
    pieces += [(chr(0x4E00 + index), -float(index)) for index in range(n_chars - 8)]
    pieces += [(char, -1.0) for char in "春风明月山水花落"]
    pieces += merges
    assert len(pieces) == VOCAB_SIZE and len({piece for piece, _ in pieces}) == VOCAB_SIZE
    return pieces


def write_char_tokenizer(path: Path) -> Path:
    encoded = [(piece.encode("utf-8"), score) for piece, score in char_pieces()]
    with open(path, "wb") as file:
        file.write(struct.pack("<I", max(len(piece) for piece, _ in encoded)))
        for piece, score in encoded:
            file.write(struct.pack("<fi", score, len(piece)) + piece)
    return path


def write_char_model(folder: Path) -> tuple[Path, Path]:
    """(model.bin, tokenizer.bin) in `folder`: a 6-head GQA model over the character vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    config = make_config(dim=48, hidden_dim=96, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=VOCAB_SIZE,
                         seq_len=64, shared_classifier=True)
    model = write_random_checkpoint(folder / "model.bin", config, SEED, version=0)
    return model, write_char_tokenizer(folder / "tokenizer.bin")


# (prompt, temperature, seed): greedy and seeded, a prompt with characters outside the vocabulary
RUNS = [("春风明月", 0.0, 1), ("Hello 花落 é ü", 0.0, 1), ("山水", 1.0, 42), ("", 1.0, 7)]
STEPS = 40
# run.c's stdout for the shared stories260K model with tok512.bin (ASCII prompts: run.c drops the
# bytes of a multi-byte character, llmtp prints the character; README "Differences from run.c")
STORIES_RUNS = [("Once upon a time", 0.0, 1), ("", 1.0, 133742), ("Lily and Tom", 0.8, 5), ("The dog", 1.0, 99)]
