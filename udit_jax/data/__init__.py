"""Data: image sources, ADM preprocessing, the VAE latent cache and grain training loaders.

    source = data.source_from_config(config.data)        # class folders / tfds / Fashion-MNIST
    manifest = data.encode_dataset(config, workdir)        # --mode=encode: the latent cache
    loader = data.make_loader(config, global_batch_size=256, seed=0, workdir=workdir)
    batch = data.to_global_batch(mesh, next(loader))       # {mean, std, label} or {image, label}
    x0 = data.sample_latents(batch, key, vae.scaling_factor)
"""

from udit_jax.data.latents import (LatentCache, build_latent_cache, cache_dir_from_config,
                                   check_cache_matches, encode_dataset, vae_encode_fn,
                                   vae_identity)
from udit_jax.data.loader import (ImageTable, Loader, example_order, image_table_from_source,
                                  make_loader, sample_latents, to_global_batch)
from udit_jax.data.preprocess import BadImageError, center_crop_arr, decode_image, hflip, to_unit_range
from udit_jax.data.sources import (ClassFolderSource, FashionMnistSource, TfdsSource,
                                   check_num_classes, read_with_retry, source_from_config)

__all__ = [
    "BadImageError", "ClassFolderSource", "FashionMnistSource", "ImageTable", "LatentCache", "Loader",
    "TfdsSource", "build_latent_cache", "cache_dir_from_config", "center_crop_arr",
    "check_cache_matches", "check_num_classes", "decode_image",
    "encode_dataset", "example_order", "hflip", "image_table_from_source", "make_loader",
    "read_with_retry", "sample_latents", "source_from_config", "to_global_batch", "to_unit_range", "vae_encode_fn",
    "vae_identity",
]
