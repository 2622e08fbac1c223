"""Counts of a component's forward from its real module code: FLOPs and the peak of live activation
bytes, found by running the forward abstractly (meta tensors) at given input shapes, without
weights or a GPU. This sits at the executor's layer (it imports torch); the spec side reads what
``scripts/build_costs.py`` writes from it (``planner/data/costs.json``), never this package.
"""
