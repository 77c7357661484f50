"""Packed-weight layout codes: the integer ``layout`` argument of the SwiGLU ops.

They say where the gate rows and the up rows sit in a packed ``[2N, K]`` weight.  The ops read
weights through them and the patterns write them into the graphs they rewrite, so both import
them from here (a leaf module: no imports).
"""

CONCAT_GATE_FIRST = 0      # [Wg; Wu]: out.chunk(2, -1) gives (gate, up)
CONCAT_UP_FIRST = 1        # [Wu; Wg]
INTERLEAVED_GATE_EVEN = 2  # gate rows at 0, 2, 4, ...: out[..., ::2] is the gate
INTERLEAVED_UP_EVEN = 3    # up rows at even indices

#: The names ``glu_fusion.swiglu_packed(layout=...)`` takes, with their codes.
LAYOUTS = {"concat": CONCAT_GATE_FIRST, "concat_up_first": CONCAT_UP_FIRST,
           "interleaved": INTERLEAVED_GATE_EVEN, "interleaved_up_first": INTERLEAVED_UP_EVEN}
