"""The compile wing: everything that runs while Inductor compiles a graph.

* ``pre_grad``: ``GluPass``, which rewrites the pattern families into our ops;
* ``post_grad``: the two post-grad passes, in the order they run;
* ``passes``: chaining our passes with a user's in one Inductor hook;
* ``cache_key``: the one recipe every pass uses for its Inductor cache key;
* ``backend``: ``backend()`` and ``install``/``uninstall`` of the passes;
* ``autoload``: what ``GLU_FUSION=1`` does at ``import torch`` (called by the ``torch.backends``
  entry point in ``glu_fusion_entry_points``, outside this package);
* ``report``: what the pass rewrote;
* ``cache_watch``: what a compile served from Inductor's cache calls, for the report.

This package imports nothing on purpose: with ``GLU_FUSION=1`` it is imported at ``import torch``.
"""
