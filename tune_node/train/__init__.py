"""Training and testing Neural ODEs, without Ray: the models (:mod:`.models`), the one training
loop over a stack of seeds (:mod:`.training`, :mod:`.seed_groups`), the paper's test matrix
(:mod:`.evaluation`), step and tolerance adaptation (:mod:`.adaptation`), the checks of a
user's study (:mod:`.user_study`) and of a model trained elsewhere (:mod:`.check`).
"""

# The spheres' fast path registers itself with integrate (models.py does not import it).
from .. import fast  # noqa: F401,E402
