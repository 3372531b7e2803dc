"""The `torch` backend: a measuring engine in PyTorch (random-weight decoders, paged KV cache, TP/PP).

Modules: `model` (decoder from a ModelArch), `attention` (paged and contiguous reference attention), `kvcache`
(block pools, allocator), `routing` (MoE expert popularity), `executor` (`TorchExecutor`, the serving core's
executor), `parallel` (TP/PP groups and collectives), `spawn` (local multi-rank runs).

Importing this package imports torch; the rest of infscale does not need it.
"""
