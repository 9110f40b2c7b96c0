"""Model registry, pipelines and sampling: the only package that imports torch and diffusers.

Importing this package, or `genserve.engine.registry` and `genserve.engine.errors`, stays torch-free
so the API server can use them; the ML stack loads with `genserve.engine.engine`, `loading`,
`samplers` and `fixtures`.
"""
