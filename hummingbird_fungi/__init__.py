"""hummingbird-fungi: in-context dense retrieval segmentation of any frozen encoder, with FUNGI features.

The names users need are exported here (imported on first use, so `import hummingbird_fungi` stays
light); everything else is internal to its sub-package:

    from hummingbird_fungi import hbird_evaluation            # open-hummingbird-eval's signature
    from hummingbird_fungi import evaluate, create_encoder, build_dataset, MemoryOptions
    from hummingbird_fungi import InContextSegmenter          # segment your own images
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hbird_evaluation": "hummingbird_fungi.eval.hbird",
    "davis_evaluation": "hummingbird_fungi.eval.davis",
    "evaluate": "hummingbird_fungi.eval.hbird",
    "Encoder": "hummingbird_fungi.models.encoders",
    "create_encoder": "hummingbird_fungi.models.factory",
    "load_backbone": "hummingbird_fungi.models.backbones",
    "build_dataset": "hummingbird_fungi.data.segmentation",
    "InContextSegmenter": "hummingbird_fungi.segment.segmenter",
    "DataOptions": "hummingbird_fungi.config.schema",
    "FeatureOptions": "hummingbird_fungi.config.schema",
    "FungiOptions": "hummingbird_fungi.config.schema",
    "MemoryOptions": "hummingbird_fungi.config.schema",
    "RetrievalOptions": "hummingbird_fungi.config.schema",
    "TransferOptions": "hummingbird_fungi.config.schema",
    "TransformOptions": "hummingbird_fungi.config.schema",
    "MemoryBank": "hummingbird_fungi.memory.bank",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hummingbird_fungi' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
