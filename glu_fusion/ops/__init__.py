"""torch.library custom ops (namespace ``glu_fusion``): schema, fake impl, autograd, autocast.

Importing this package registers every op; it is idempotent and cheap.
"""
from . import swiglu  # noqa: F401  (registers glu_fusion::swiglu*)
from . import rms_norm_gated  # noqa: F401,E402  (registers glu_fusion::rms_norm_gated*)
from . import mlp_block  # noqa: F401,E402  (registers glu_fusion::mlp_block*, mlp_dgated*)
from . import grouped_swiglu  # noqa: F401,E402  (registers glu_fusion::grouped_swiglu*)
from . import grouped_combine  # noqa: F401,E402  (registers glu_fusion::grouped_down_combine)
from . import rms_norm  # noqa: F401,E402  (registers glu_fusion::rms_norm*)
