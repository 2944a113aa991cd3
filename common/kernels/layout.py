"""Block layouts of the quantized formats, as ggml (llama.cpp) and llama2.c store them.

GGUF blocks hold QK = 32 consecutive values of one row, little-endian:
  q8_0: fp16 d, 32 x int8 q                    (34 bytes)  w = q * d
  q4_0: fp16 d, 16 bytes of nibbles            (18 bytes)  w = (q - 8) * d
  q4_1: fp16 d, fp16 m, 16 bytes of nibbles    (20 bytes)  w = q * d + m
In the nibble formats byte k holds value k in its low four bits and value k + 16 in its
high four. llama2.c v2 keeps int8 values (rows, cols) and one float32 scale per
group_size consecutive values, in a separate array."""

QK = 32
BLOCK_BYTES = {"q8_0": 2 + QK, "q4_0": 2 + QK // 2, "q4_1": 4 + QK // 2}
FORMAT_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "llama2c_q8": 3}  # csrc/dot.h's FMT_*


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes of one row of `cols` values in GGUF format `fmt`."""
    return cols // QK * BLOCK_BYTES[fmt]
