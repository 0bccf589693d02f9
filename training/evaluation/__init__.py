"""One evaluation library for training-time evaluation, the ensemble and ``python -m pipeline eval``.

* ``tasks``: evaluation task folders (webdataset shards incl. clip_benchmark's ``wds_*`` layout,
  image folders, CSV) and their sample readers;
* ``clip``: a loaded open_clip model (:class:`~training.evaluation.clip.ClipBundle`) and batched
  encoding;
* ``zeroshot``: zero-shot classification (``acc1``, ``acc5``, ``mean_per_class_recall``) and the
  training-time :class:`~training.evaluation.zeroshot.ZeroShotEvaluator`;
* ``retrieval``: image↔text recall@k;
* ``linear_probe``: linear classifiers on frozen features (SSL linear eval, the experts' probe);
* ``command``: ``python -m pipeline eval`` (clip_benchmark-style JSON).

The ensemble adds routing on top (``ensemble/evaluators/``); nothing here imports ``ensemble``.
"""
