"""What every layer of grok1 may lean on and that knows nothing of the model: compiling with
grok1's XLA options, the compilation cache, forced CPU devices, host buffers that XLA:CPU adopts,
and the loading progress bar. Nothing here imports another grok1 module."""
