"""CLIP training of the seed model and the data experts (the ``train`` stage).

``main`` (entry points), ``setup`` (build steps), ``loop`` (the step loop), ``data`` (expert
loader over the original tars), ``optim``, ``checkpoint``, ``metrics``, ``dist``,
``models`` (+ ``model_configs/``), ``synthetic`` (tiny runs for tests and benchmarks), the
``losses`` package and the ``evaluation`` package (eval tasks, zero-shot, retrieval, linear probe,
``python -m pipeline eval``). See docs/training.md.
"""
