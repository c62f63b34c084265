"""The pure core: plans, styles and their resolution to specs and hooks.

Nothing here mutates a model, places an array or runs at call time, and
nothing here imports `nnx_parallel.runtime`. `resolve` runs on abstract
models (`nnx.eval_shape`), so every layout can be computed, printed and
tested before any device is touched.
"""
