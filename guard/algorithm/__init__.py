"""The ReX algorithm in pure numpy: box trees, responsibility landscapes, MPS extraction.

Nothing here touches a model: callers evaluate the mutants these modules propose and feed the
verdicts back, which is what lets many runs (and many images) share one batched model call.
"""
