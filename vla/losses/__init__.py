"""Every loss vla trains with, each with its formula in the docstring.

Conventions: embeddings that enter a loss are L2-normalised by the caller (docs/methods.md), ``B`` is
the local batch, and a loss that has several terms returns a dict with ``"loss"`` (what to
backpropagate) and each term by name (for logging). Targets that come from a frozen or
teacher model are detached here, so a caller can never train through a target by accident.

- Contrastive (ProCLIP stage 2, LLM2CLIP, MM-GEM), `contrastive.py`: `ClipLoss`, `LogitScale`,
  `gather_features`, `gather_rows`.
- ProCLIP, `proclip.py`: `instance_alignment_loss`, `structure_alignment_loss`, `distill_loss`,
  `self_distillation_loss`.
- DCLIP, `dclip.py`: `infonce`, `dclip_teacher_loss`, `teacher_image_negatives_loss`, `dclip_student_loss`,
  `preservation_loss`.
- MM-GEM, `mmgem.py`: `caption_loss`, `mmgem_loss`, `mmgem_objective_loss`.

`vla.losses` re-exports every one of them.
"""

from vla.losses.contrastive import ClipLoss, LogitScale, gather_features, gather_rows, symmetric_cross_entropy  # noqa: F401
from vla.losses.dclip import (dclip_student_loss, dclip_teacher_loss, infonce, preservation_loss,  # noqa: F401
                              teacher_image_negatives_loss)
from vla.losses.mmgem import MMGEM_OBJECTIVES, caption_loss, mmgem_loss, mmgem_objective_loss  # noqa: F401
from vla.losses.proclip import (distill_loss, instance_alignment_loss, self_distillation_loss,  # noqa: F401
                                structure_alignment_loss)
