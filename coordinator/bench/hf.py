"""`llmtp bench --compare-hf`: the same weights through transformers on the CPU (the
`oracle` extra), timed like llmtp's engines."""

import time

import numpy as np

from .results import EngineResult

HF_LABEL = "transformers (torch)"


class HFModel:
    """Built once; time() runs one round."""

    def __init__(self, checkpoint, cores: int):
        import torch

        from ..hf_bridge import build_hf_model
        self.torch, self.cores = torch, cores
        torch.set_num_threads(cores)
        self.vocab_size = checkpoint.config.vocab_size
        self.model = build_hf_model(checkpoint.config, checkpoint.weights, attention="sdpa")

    @classmethod
    def open(cls, checkpoint, cores: int) -> "HFModel | None":
        try:
            return cls(checkpoint, cores)
        except ImportError:
            return None

    def time(self, prompt_tokens: int, decode_tokens: int) -> EngineResult:
        torch, model = self.torch, self.model
        rng = np.random.default_rng(1)
        prompt = torch.tensor(rng.integers(3, self.vocab_size, (1, prompt_tokens)))
        with torch.inference_mode():
            model(input_ids=prompt[:, :8])
            prefill_seconds = float("inf")
            for _ in range(3):  # best of three, as for llmtp's engines
                started = time.perf_counter()
                output = model(input_ids=prompt, use_cache=True)
                prefill_seconds = min(prefill_seconds, time.perf_counter() - started)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
            walls = []
            for _ in range(decode_tokens):
                started = time.perf_counter()
                output = model(input_ids=token, past_key_values=cache, use_cache=True)
                walls.append(time.perf_counter() - started)
                cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        step = float(np.median(walls))
        return EngineResult(engine=HF_LABEL, n_workers=0, cores=self.cores,
                            prefill_tokens_per_s=prompt_tokens / prefill_seconds,
                            decode_tokens_per_s=1.0 / step, decode_step_ms=step * 1000, math_ms=step * 1000,
                            sync_wait_ms=0.0, coordinator_ms=0.0, sync_ms=None)
