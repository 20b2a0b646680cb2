"""The PBS engine: a pipeline of pure stages on tensors (torch only; Triton kernels optional).

permute (``permute``) -> score (``score``) -> select (``select``) -> BlockMask (``mask``) ->
attend (``attend``), composed in ``pipeline``; block geometry comes from ``layout.BlockLayout``
and every knob from ``config.PBSConfig``; ``methods`` names the published baselines as
configurations of this one engine; ``kernels`` holds the fused CUDA versions of the planning
stages.
"""
