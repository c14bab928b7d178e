"""Training objectives: what the trainer minimises, one registered class per loss.

Contract (the trainer knows nothing else):

* **Outputs** — the model's outputs as a dict of named tensors: ``"embedding"`` (N, D) from every
  backbone; a backbone may return more (e.g. ``"position_map"``).
* **Targets** — the batch's named targets, a dict of tensors collated from each sample's dict
  (``"label"`` today; ``"age"``, ``"landmarks"``, ``"pose"``, ... as data sets provide them). A target
  that only some samples carry comes with ``targets["<name>_mask"]``, a bool (N,) tensor, True where
  the sample has it (its value elsewhere is a placeholder); no mask means every sample has it.
  Objectives must ignore masked-out samples (:func:`target_mask`).
* **Named terms** — ``Objective.forward(outputs, targets)`` returns ``{term name: scalar}``; names are
  the objective's ``key`` (its config ``label``, default its name) unless it returns several. The
  trainer minimises ``Σ weight · term`` over all objectives (``objectives[i].weight``) and logs every
  term, unweighted, as ``loss/<term>`` in metrics.csv, ``train/<term>`` in TensorBoard and in the
  progress bar; the ``loss`` column is the weighted total.
* **Card fields** — ``card_fields()`` names model-card fields the objective gives the trained backbone
  (``age_from_norm``: ``age_branch``); checkpoints carry them and export writes them to the card.
* **Stored models** — an objective that consults a stored model (a teacher, a DAE prior) loads it through
  ``ObjectiveContext.load_model`` (the trainer passes the models layer's loader) with :func:`load_frozen`, in
  its constructor: a wrong path stops the run at start-up; the model is frozen and outside the module tree
  (never in checkpoints) and follows the data's device.
* **Parameters and hook** — objectives are modules and may own parameters (class centres, read-out
  layers), optimised with the backbone; ``update(step)`` runs before every step (annealing schedules).
* **Sharded objectives** — ``sharded = True`` (Partial FC) means the parameters are split across
  ranks: the trainer keeps the objective outside DDP, gives it its own optimiser and schedule, saves
  ``shard_state()`` per rank in shard files and calls ``load_shards`` to re-cut them on resume.

Configs name objectives by registry name (``OBJECTIVES``) or import path (``"package.module:Class"``);
a constructor takes an :class:`ObjectiveContext` and the config's ``args``.
"""

from facesphere.objectives import age, recognition, rectify, regression  # noqa: F401  (registers the built-ins)
from facesphere.objectives.base import (
    MASK_SUFFIX,
    OBJECTIVES,
    FrozenModel,
    Objective,
    ObjectiveContext,
    ObjectiveLoadError,
    build_objective,
    load_frozen,
    resolve_objective,
    target_mask,
)
from facesphere.objectives.age import AgeFromNorm
from facesphere.objectives.recognition import Recognition
from facesphere.objectives.rectify import (AlignedEmbedding, AlignedImage, CanonicalPrior, Denoising, GridContinuity,
                                          RectifyGeometry)
from facesphere.objectives.regression import Regression

__all__ = ["AgeFromNorm", "AlignedEmbedding", "AlignedImage", "CanonicalPrior", "Denoising", "FrozenModel", "GridContinuity",
           "MASK_SUFFIX", "OBJECTIVES", "Objective", "ObjectiveContext", "ObjectiveLoadError", "Recognition",
           "RectifyGeometry", "Regression", "build_objective", "load_frozen", "resolve_objective", "target_mask"]
