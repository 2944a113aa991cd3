"""One request's generated text as it streams: tokens -> complete UTF-8 text, cut at the first
stop string. Text that might be the start of a stop string is held back until it is known not
to be, so a client never sees a stop string or part of one."""

from llmtp.common.formats.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], previous_id: int):
        """previous_id: the prompt's last token (after BOS, a first piece drops its leading space)."""
        self._decoder = tokenizer.stream_decoder(previous_id)
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text now safe to send; sets `stopped` when a stop string completed (not included)."""
        self._pending += self._decoder.push(token_id)
        return self._release()

    def finish(self) -> str:
        """What is left once generation ends for any other reason."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        found = [index for index in (self._pending.find(s) for s in self._stop) if index >= 0]
        if found:
            text, self._pending, self.stopped = self._pending[:min(found)], "", True
            return text
        hold = 0 if final else self._held_back()
        text, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return text

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
