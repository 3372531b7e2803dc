"""The `trtllm` backend: TensorRT-LLM engines (TensorRT flow, ≤ 1.2.x) or its PyTorch backend, benchmarked with
`trtllm-bench`. Written against the documented interfaces (docs/trtllm.md); nothing here imports tensorrt_llm."""
