"""Self-supervised image training with SogCLR's global contrastive loss (or SimCLR), and linear
evaluation on frozen features. See docs/ssl.md.

Modules: ``config`` (sections ``ssl`` and ``linear_eval``), ``data`` (image folder / webdataset
images, two augmented views), ``model`` (backbone + projection head), ``loop`` (trainer), ``main``
(entry point, also under torchrun / srun), ``linear`` (cached features + linear classifier).
"""
