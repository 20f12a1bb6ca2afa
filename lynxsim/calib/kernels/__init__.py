"""Real kernels of an MoE decoder layer, in torch and Triton (the ``gpu`` extra; only ``lynxsim.calib`` imports
torch). See each module: :mod:`.weights` (layer shapes and random weights), :mod:`.dense` (norms,
projections, router, SwiGLU, LM head), :mod:`.attention` (paged decode, chunked prefill), :mod:`.moe`
(fused Triton MoE, torch grouped GEMM, float32 reference)."""
