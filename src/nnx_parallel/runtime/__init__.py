"""The runtime: the only code that mutates a model or runs at call time.

`apply` writes a `Resolution` into a model (one transaction), `install`
swaps classes to hooked subclasses, `dispatch` routes each hooked call,
`layout` and `fsdp` implement the routes, `sharded_init` creates models
directly in their shards.
"""
