"""The compile wing: everything that runs while Inductor compiles a graph.

* ``pre_grad``: ``GluPass``, which rewrites the pattern families into our ops;
* ``post_grad``: the two post-grad passes, in the order they run;
* ``passes``: chaining our passes with a user's in one Inductor hook;
* ``cache_key``: the one recipe every pass uses for its Inductor cache key;
* ``backend``: ``backend()`` and ``install``/``uninstall`` of the passes;
* ``autoload``: the ``torch.backends`` entry point behind ``GLU_FUSION=1``;
* ``report``: what the pass rewrote.

This package imports nothing on purpose: the entry point runs at every ``import torch``.
"""
