"""The 29 class names of the ASL Alphabet data set, in label order.

The index of a name in `CLASSES` is its integer label everywhere in the pipeline (shards, model
outputs, metrics), so the order must never change: models trained before a change would silently
predict the wrong letters.
"""

from __future__ import annotations

import string

CLASSES: tuple[str, ...] = (*string.ascii_uppercase, "del", "nothing", "space")
