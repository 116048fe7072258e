"""Models: CC-CMR and the literature baselines, all accepted by Opacus' ModuleValidator as they are."""

from ccmr_core.models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
