"""CLIP training of the seed model and the data experts (the ``train`` stage).

``main`` (entry points), ``setup`` (build steps), ``loop`` (the step loop), ``data`` (expert
loader over the original tars), ``optim``, ``checkpoint``, ``zeroshot``, ``metrics``, ``dist``,
``models`` (+ ``model_configs/``), ``synthetic`` (tiny runs for tests and benchmarks) and the
``losses`` package. See docs/training.md.
"""
