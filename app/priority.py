"""Queue priority: which waiting scoring job a free worker takes first.

The worklist's own order (severity band, identification, severity) is ``models.priority``.
"""

from __future__ import annotations

from app.db.models import JobTrigger

# Celery on Redis serves priority 0 first (kombu's emulated priorities). The policy:
#   0  a re-scan (new images) of a study last scored CT-3 or CT-4: an urgent patient's new
#      images must not wait behind anything;
#   3  first-time scoring and re-scans of other studies: their urgency is unknown until scored,
#      so they go in arrival order;
#   6  a rescore an admin asked for of a study that already has scores on the worklist: the
#      worklist is already right enough, fresh studies come first.
#   8  a prior retrieved from the PACS (app.prior_lookups): it only fills in another study's
#      comparison, so every new study comes first.
# A failed study asked to be rescored has no score and gets 3, like a first-time study.
URGENT_RESCAN = 0
NORMAL = 3
MANUAL_RESCORE = 6
RETRIEVED_PRIOR = 8
URGENT_BAND = 3


def queue_priority(trigger: str, previous_band: int | None, retrieved_prior: bool = False) -> int:
    if retrieved_prior:
        return RETRIEVED_PRIOR
    if trigger == JobTrigger.rescore.value:
        return MANUAL_RESCORE if previous_band is not None else NORMAL
    if previous_band is not None and previous_band >= URGENT_BAND:
        return URGENT_RESCAN
    return NORMAL
