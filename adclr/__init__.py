"""adclr: ADCLR self-supervised ViT backbones for timm.

Importing the package registers `adclr_vit_tiny`, `adclr_vit_small` and `adclr_vit_base` with timm.
"""
from . import models as models  # registers the architectures with timm
from .features import attention_image, attention_maps, embed_regions, extract_features, pca_image
from .manifest import ManifestError, WeightsEntry, load_manifest
from .weights import ChecksumMismatchError, WeightsUnavailableError, fetch_verified

__version__ = "0.1.0"
