"""`llmtp bench`: prefill and decode speed against worker count, beside the machine's
own limits measured in the same run (streaming bandwidth, a bare ZeroMQ round trip).

Speed is never asserted in tests; this command is where it is measured. Report ratios
from one run: the machine is shared and noisy.

presets: the random-weight shapes; limits: the machine's probes (bandwidth_probe and
echo_probe run as `python -m` processes); timing: one engine; run: a whole run;
results / report / plot: what it measured and how it is shown.
"""

from .presets import PRESETS, synthetic_checkpoint
from .report import format_report, load_report, save_report
from .results import BenchReport, EngineResult, MachineLimits, best_of
from .run import run_bench

__all__ = ["PRESETS", "synthetic_checkpoint", "format_report", "load_report", "save_report", "BenchReport",
           "EngineResult", "MachineLimits", "best_of", "run_bench"]
