"""Contrastive losses for CLIP training: OpenCLIP InfoNCE and the global contrastive (GCL) family.

The ``loss`` config section (:class:`LossConfig`) is defined in the leaf module ``pipeline.sections``.

``build_loss(cfg, rank=, world_size=, device=)`` returns a :class:`ContrastiveLoss`:

* ``name="clip"``: OpenCLIP ``ClipLoss`` (local_loss / gather_with_grad semantics).
* ``name="gcl"`` / ``"fastclip"``: SogCLR / FastCLIP with per-sample moving averages u, FastCLIP's
  communication (features gathered without autograd; u, ids and other per-sample state gathered),
  global temperature (v0 learnable through the surrogate, v1 constant, v3 RGCL-g with
  ``multiply_tau``) or individual temperatures (v2), optional GloFND false-negative removal, and
  optional feature distillation from a teacher.

Per-sample table memory (float32, per pair id, replicated on every rank):

======================= ===========================================================
variant                 bytes / sample
======================= ===========================================================
v0, v1, v3 (u per side) 8
v2                      40 (u, tau, bound, Adam m, v per side)
+ GloFND                +24 (lambda, Adam m, v per side)
======================= ===========================================================

Gradient scale (no GloFND; n = global batch = dataset, gamma = 1 so u = g): the surrogate's gradient
w.r.t. the features is ``grad F / (2 tau)`` for v0/v1 and ``grad F / 2`` for v3, with
``F = (tau/n) sum_i [log(eps + g1_i) + log(eps + g2_i)]``. After DDP averages over K ranks the
gradient equals the single-process one on the global batch.

Where fast_clip's code and the stated objectives differ (``grad_convention``; default ``upstream``
reproduces the code, ``paper`` follows the objectives):

1. Learnable global tau (v0, v3): the logit scale gets gradient from both the local-anchor and the
   remote-anchor pass, so ``dL/ds_ls`` is twice what the feature gradient's scale implies. For v3 the
   tau-derivative is ``mean(log u)/2 + rho + tau * mean(dg/dtau / u)`` instead of RGCL-g's
   ``mean(log u)/2 + rho + tau * mean(dg/dtau / u) / 2``. ``paper`` stops the gradient of the logit
   scale in the remote pass, making (features, tau) jointly half the RGCL-g gradient.
2. v2 remote anchors are scored with the tau updated in the same step while the local pass used the
   previous one. ``paper`` uses the previous tau in both passes. (gcl.md states the opposite of the
   code here; the code returns the updated tau under the name ``old_tau``.)
3. v2 surrogate: fast_clip weights every anchor by 1 (``grad g_i / u_i``); the RGCL gradient weights
   it by tau_i. ``paper`` multiplies each anchor's ratio by its tau_i.

Separately, ``tau_adam_sqrt`` (default True, as the task asks) divides v2's per-sample Adam step by
sqrt(v_hat); fast_clip's code divides by v_hat.
"""

from pipeline.sections import LossConfig
from training.losses.base import ContrastiveLoss
from training.losses.distill import init_student_from_teacher
from training.losses.factory import build_loss
from training.losses.schedules import gamma_at_epoch, tau_lr_multiplier

__all__ = ["ContrastiveLoss", "LossConfig", "build_loss", "gamma_at_epoch", "init_student_from_teacher", "tau_lr_multiplier"]
