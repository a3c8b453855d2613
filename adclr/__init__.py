"""adclr: ADCLR self-supervised ViT backbones for timm.

Importing the package registers the `adclr_vit_*` architectures with timm (`timm.list_models("adclr*")`) and their
pretrained cfgs from the weights manifest.
"""
from . import models as models  # registers the architectures with timm
from .features import attention_maps, embed_regions, extract_features
from .pictures import attention_image, pca_image
from .errors import ADCLRError, ChecksumMismatchError, ManifestError, WeightsUnavailableError
from .manifest import WeightsEntry, load_manifest
from .weights import fetch_verified

__version__ = "0.1.0"
