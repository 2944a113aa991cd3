"""An in-process transport: N SliceModels on N threads, reducing through a barrier.

Same `step` signature as LocalEngine and ClusterEngine, so a test can run one
generation through all three and compare."""

import threading

import numpy as np

from llmtp.common.model.slicing import slice_weights
from llmtp.common.model.split import plan_split
from llmtp.common.model.transformer import SliceModel


class ThreadedCluster:
    def __init__(self, config, weights, n_workers: int, group_size: int = 1, n_slots: int = 1):
        self.config = config
        self.weights = weights
        specs = plan_split(config, n_workers, group_size)
        self.models = [SliceModel(config, spec, slice_weights(weights, spec, config), n_slots) for spec in specs]
        self.barrier = threading.Barrier(n_workers)
        self.partials = [None] * n_workers

    def allreduce_for(self, index: int):
        def allreduce(partial: np.ndarray) -> np.ndarray:
            self.partials[index] = partial
            self.barrier.wait()
            total = self.partials[0].copy()
            for other in self.partials[1:]:
                total += other
            self.barrier.wait()  # nobody overwrites its partial before all have summed
            return total
        return allreduce

    def step(self, tokens, sequences, all_logits: bool = False) -> np.ndarray:
        x = self.weights.embed(np.asarray(tokens, dtype=np.int64))
        results, errors = [None] * len(self.models), []

        def run(index):
            try:
                results[index] = self.models[index].forward(x, sequences, self.allreduce_for(index), all_logits)
            except BaseException as error:  # surface worker errors in the test thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(self.models))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return np.concatenate(results, axis=1)

    def close(self) -> None:
        pass
