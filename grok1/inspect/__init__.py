"""Look inside Grok-1: what the parameters weigh (`describe`), what the layers do (`trace`), any
named activation read or replaced on the real forward pass (`run_with_cache`, `run_with_hooks`,
over grok1/hooks.py), and the analyses built on them: the logit lens, attention patterns per head
and routing statistics over a corpus, each with a plot (`python -m grok1.analyze --help`).

- describe.py     the parameter table, FLOPs and bytes per device (no weights needed)
- trace.py        per layer: chosen experts, attention logits before/after the cap, residual RMS
- activations.py  run_with_cache / run_with_hooks, jitted, on one device or a mesh
- lens.py         the logit lens; attention patterns per head
- routing.py      expert load, the tokens each expert prefers, co-activation, over a text
- plots.py        the figures (matplotlib, optional)

The command over them is grok1/analyze.py (`python -m grok1.analyze`), a tool above the library.
"""

from grok1.inspect.describe import describe, format_description
from grok1.inspect.plots import plot_format, plot_formats, plot_trace
from grok1.inspect.trace import CAP_CHANGE, LayerTrace, Trace, format_trace, trace

__all__ = ["CAP_CHANGE", "LayerTrace", "Trace", "describe", "format_description", "format_trace",
           "plot_format", "plot_formats", "plot_trace", "trace"]
