"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax linen, NHWC.

    vae = build_vae()                                   # sd-vae-ft-ema / ft-mse architecture
    mean, logvar = vae.apply({"params": p}, x, method="encode")   # x [B, H, W, 3] in [-1, 1]
    image = vae.apply({"params": p}, z, method="decode")          # z [B, H/8, W/8, 4], unscaled
    latents = encode_to_latents(vae, p, x, key=key)     # posterior sample * scaling_factor
    images = decode_latents(vae, p, latents)            # the inverse scaling, then decode

Submodule names follow diffusers' state_dict names ('down_blocks_0' for `down_blocks.0`), so
the converter (udit_jax/convert/vae.py) maps keys mechanically and captured intermediates
line up with diffusers' module paths.

Exactness points (SPEC section 11): the encoder downsample pads (0 left/top, 1 right/bottom)
and then runs a 3x3 stride-2 VALID conv; the decoder upsample is nearest 2x then a 3x3 conv;
GroupNorm eps is 1e-6; the mid-block attention is single-head over all H*W positions with
scale 1/sqrt(C). GroupNorm statistics and the attention softmax run in float32 whatever the
compute dtype; encode/decode outputs are float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from udit_jax.models.layers import attention, conv, dense, with_axes
from udit_jax.parallel import batch_sharding, replicated

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution clamp
NORM_EPS = 1e-6

# The SD VAE (stabilityai/sd-vae-ft-ema, ft-mse): diffusers AutoencoderKL arguments.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, latent_channels=4, mid_block_add_attention=True, use_quant_conv=True,
    use_post_quant_conv=True, scaling_factor=0.18215, shift_factor=None, sample_size=256)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channels of [B, H, W, C], statistics in float32."""

    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (channels,), jnp.float32)
        bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (channels,), jnp.float32)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        reduce_axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # spatial axes and channels in a group
        mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)  # biased, as torch
        normed = ((grouped - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (normed * scale + bias).astype(self.dtype)


def _conv3x3(features: int, name: str, dtype: Dtype) -> nn.Conv:
    return conv(features, 3, ("embed", "mlp"), name=name, dtype=dtype, padding=((1, 1), (1, 1)))


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x [B, H, W, Cin] -> [B, H, W, out_channels]."""

    out_channels: int
    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(self.num_groups, self.dtype, name="norm1")(x))
        h = _conv3x3(self.out_channels, "conv1", self.dtype)(h)
        h = nn.silu(GroupNorm(self.num_groups, self.dtype, name="norm2")(h))
        h = _conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, ("embed", "mlp"), name="conv_shortcut", dtype=self.dtype,
                     padding="VALID")(x)
        return x.astype(self.dtype) + h


class MidBlockAttention(nn.Module):
    """Single-head self-attention over the H*W positions with a residual: [B, H, W, C] -> same."""

    num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(self.num_groups, self.dtype, name="group_norm")(x)
        tokens = lambda name: dense(channels, ("embed", "mlp"), name=name, dtype=self.dtype)(h).reshape(
            batch, height * width, 1, channels)
        out = attention(tokens("to_q"), tokens("to_k"), tokens("to_v"), scale=channels ** -0.5)
        out = dense(channels, ("mlp", "embed"), name="to_out_0", dtype=self.dtype)(
            out.reshape(batch, height, width, channels))
        return x.astype(self.dtype) + out


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at constant width: [B, H, W, C] -> same."""

    num_groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.num_groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = MidBlockAttention(self.num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.num_groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """Zero pad (top 0, bottom 1, left 0, right 1), then 3x3 stride-2 VALID conv: [B,H,W,C] -> [B,floor(H/2),floor(W/2),C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, ("embed", "mlp"), name="conv", dtype=self.dtype, stride=2,
                    padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
        x = x.reshape(batch, 2 * height, 2 * width, channels)
        return _conv3x3(channels, "conv", self.dtype)(x)


class ResolutionBlock(nn.Module):
    """diffusers DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then a resampler."""

    out_channels: int
    num_layers: int
    num_groups: int
    resample: str | None  # 'down', 'up' or None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.num_groups, self.dtype, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in] -> posterior parameters before quant_conv [B, H/f, W/f, 2*latent]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv3x3(self.block_out_channels[0], "conv_in", self.dtype)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = ResolutionBlock(channels, self.layers_per_block, self.norm_num_groups,
                                "down" if i < last else None, self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(self.norm_num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(self.norm_num_groups, self.dtype, name="conv_norm_out")(x))
        return _conv3x3(2 * self.latent_channels, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """Latent [B, h, w, latent] (after post_quant_conv) -> image [B, h*f, w*f, out_channels]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    out_channels: int
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = _conv3x3(self.block_out_channels[-1], "conv_in", self.dtype)(z.astype(self.dtype))
        x = MidBlock(self.norm_num_groups, self.mid_block_add_attention, self.dtype, name="mid_block")(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            x = ResolutionBlock(channels, self.layers_per_block + 1, self.norm_num_groups,
                                "up" if i < last else None, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(self.norm_num_groups, self.dtype, name="conv_norm_out")(x))
        return _conv3x3(self.out_channels, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL (argument names kept); defaults are the SD VAE.

    `scaling_factor` (and `shift_factor`, None for SD) describe how latents are normalised for
    diffusion; `encode_to_latents` / `decode_latents` apply them. `dtype` is the compute dtype;
    parameters are float32 and GroupNorm / softmax run in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int = 256
    dtype: Dtype = jnp.float32

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, ("embed", "mlp"), name=None,
                                   dtype=self.dtype, padding="VALID")
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, ("embed", "mlp"), name=None,
                                        dtype=self.dtype, padding="VALID")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        """Raises ValueError for a configuration diffusers could not build either."""
        channels = tuple(self.block_out_channels)
        if not channels or any(int(c) <= 0 for c in channels):
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {channels}")
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"block_out_channels={channels} (not {bad})")
        for field in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """(x,) with x [batch, sample_size, sample_size, in_channels] for init."""
        return (jnp.zeros((batch, self.sample_size, self.sample_size, self.in_channels), jnp.float32),)

    def fixed_param_count(self) -> int:
        return 0

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior parameters of images.

        x: [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]
        float32 with f = 2**(len(block_out_channels) - 1) (rounded down at each halving), logvar clamped to [-30, 20].
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"encode expects images [B, H, W, {self.in_channels}] (NHWC), got shape "
                             f"{tuple(x.shape)}; transpose NCHW arrays with x.transpose(0, 2, 3, 1)")
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images from unscaled latents: z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels] float32."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"decode expects latents [B, h, w, {self.latent_channels}] (NHWC, unscaled), "
                             f"got shape {tuple(z.shape)}")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (diffusers' forward with sample_posterior=False)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) per latent element; mean, logvar [B, h, w, C]."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array | None = None, noise: jax.Array | None = None) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1) drawn from `key`, or the given `noise` (shape of mean)."""
        if (key is None) == (noise is None):
            raise ValueError("DiagonalGaussian.sample needs exactly one of key= or noise=")
        if noise is None:
            noise = jax.random.normal(key, self.mean.shape, jnp.float32)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != posterior shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise


def scale_latents(vae: AutoencoderKL, z: jax.Array) -> jax.Array:
    """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor."""
    if vae.shift_factor is not None:
        z = z - vae.shift_factor
    return z * vae.scaling_factor


def unscale_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> VAE latents, the inverse of `scale_latents`."""
    z = latents / vae.scaling_factor
    if vae.shift_factor is not None:
        z = z + vae.shift_factor
    return z


def encode_to_latents(vae: AutoencoderKL, params, x: jax.Array, *, key: jax.Array | None = None,
                      noise: jax.Array | None = None) -> jax.Array:
    """Diffusion latents of images: a posterior sample (from `key` or the given `noise`), scaled.

    With neither key nor noise the posterior mean is used. params: the 'params' collection.
    x: [B, H, W, in_channels] in [-1, 1] -> [B, H/f, W/f, latent_channels].
    """
    mean, logvar = vae.apply({"params": params}, x, method="encode")
    posterior = DiagonalGaussian(mean, logvar)
    z = mean if key is None and noise is None else posterior.sample(key=key, noise=noise)
    return scale_latents(vae, z)


def decode_latents(vae: AutoencoderKL, params, latents: jax.Array) -> jax.Array:
    """Images from diffusion latents (scaled as `encode_to_latents` returns them).

    latents: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels] float32, roughly [-1, 1]
    (not clipped).
    """
    return vae.apply({"params": params}, unscale_latents(vae, latents), method="decode")


def _data_parallel(fn: Callable, mesh) -> Callable:
    """Wraps a jitted fn(params, batch) to run any batch on `mesh`.

    Params are placed replicated and the batch sharded over its leading axis (no-ops when
    they already are); a batch not divisible by the device count is zero-padded and the
    outputs cut back. With several processes pass a global jax.Array
    (`parallel.global_batch_from_local`), not a host numpy batch.
    """
    params_sharding, devices = replicated(mesh), mesh.size

    def call(params, batch):
        n = batch.shape[0]
        pad = (-n) % devices
        if pad:
            xp = np if isinstance(batch, np.ndarray) else jnp
            batch = xp.concatenate([batch, xp.zeros((pad,) + batch.shape[1:], batch.dtype)])
        batch = jax.device_put(batch, batch_sharding(mesh, batch.ndim))
        out = fn(jax.device_put(params, params_sharding), batch)
        return jax.tree_util.tree_map(lambda a: a[:n], out) if pad else out

    return call


def make_encode_fn(vae: AutoencoderKL, mesh) -> Callable:
    """A jitted `(params, x) -> (mean, logvar)` running data-parallel over `mesh`.

    x: [B, H, W, in_channels] (numpy or a global jax.Array); mean, logvar [B, h, w, latent]
    sharded over the batch. Params are replicated on every device; batches not divisible by
    the device count are padded internally.
    """
    images = batch_sharding(mesh, 4)
    fn = jax.jit(lambda params, x: vae.apply({"params": params}, x, method="encode"),
                 in_shardings=(replicated(mesh), images), out_shardings=(images, images))
    return _data_parallel(fn, mesh)


def make_decode_fn(vae: AutoencoderKL, mesh) -> Callable:
    """A jitted `(params, latents) -> images` (latents scaled, as `decode_latents`) over `mesh`.

    latents: [B, h, w, latent_channels] -> images [B, H, W, out_channels] float32, sharded over
    the batch; batches not divisible by the device count are padded internally.
    """
    arrays = batch_sharding(mesh, 4)
    fn = jax.jit(lambda params, latents: decode_latents(vae, params, latents),
                 in_shardings=(replicated(mesh), arrays), out_shardings=arrays)
    return _data_parallel(fn, mesh)


# diffusers AutoencoderKL arguments that this port accepts only with the values it implements.
_FIXED_ARGUMENTS = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
_IGNORED_ARGUMENTS = ("force_upcast",)  # diffusers runs the VAE in float32 for fp16; we keep norms in f32


def build_vae(**overrides) -> AutoencoderKL:
    """An AutoencoderKL: the SD VAE, with diffusers AutoencoderKL arguments as overrides.

    A diffusers `config.json` can be passed as is (`build_vae(**json.load(f))`): keys starting
    with '_' and `force_upcast` are ignored; `act_fn`, `down_block_types`, `up_block_types`,
    `latents_mean`/`latents_std` are checked against what this port implements. `dtype` sets
    the compute dtype.
    """
    kwargs = dict(SD_VAE_CONFIG)
    fields = set(kwargs) | {"dtype"}
    for name, value in overrides.items():
        if name.startswith("_") or name in _IGNORED_ARGUMENTS:
            continue
        if name in _FIXED_ARGUMENTS:
            if value != _FIXED_ARGUMENTS[name]:
                raise ValueError(f"AutoencoderKL {name}={value!r} is not supported; only "
                                 f"{_FIXED_ARGUMENTS[name]!r} (the SD VAE's value)")
            continue
        if name in _BLOCK_TYPES:
            if any(t != _BLOCK_TYPES[name] for t in value):
                raise ValueError(f"AutoencoderKL {name}={list(value)} is not supported; every entry "
                                 f"must be {_BLOCK_TYPES[name]!r}")
            continue
        if name not in fields:
            raise ValueError(f"AutoencoderKL has no argument {name!r}; it takes "
                             f"{sorted(fields | set(_FIXED_ARGUMENTS) | set(_BLOCK_TYPES))}")
        kwargs[name] = value
    kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
    for name in _BLOCK_TYPES:
        if name in overrides and len(overrides[name]) != len(kwargs["block_out_channels"]):
            raise ValueError(f"{name} has {len(overrides[name])} entries but block_out_channels has "
                             f"{len(kwargs['block_out_channels'])}; they must match")
    vae = AutoencoderKL(**kwargs)
    vae.validate()
    return vae
