"""Sampler throughput (images/s) with classifier-free guidance on the current backend.

    python -m benchmarks.bench_sampler                          # small DiT; CPU-sized defaults
    python -m benchmarks.bench_sampler --model U-DiT-B --batch 32 --dtype bfloat16
    python -m benchmarks.bench_sampler --model DiT-XL/2 --samplers ddpm250,ddim50,dpm20
    python -m benchmarks.bench_sampler --samplers ode-heun2_26,ode-euler50,sde-Euler250,ode-dopri5_50

Times udit_jax.sampler's batch sampler, the program previews, in-loop evaluation and sampling
jobs run: one jitted program per sampler (the whole loop compiles to one XLA loop), the batch
sharded over all devices, per-image noise keys. With CFG each image's conditional and
unconditional rows run together, so one step costs one model forward on 2B examples. Random
float32 parameters (throughput does not depend on the weights); U-DiT runs in its inference
(fused-FFN) form. TFLOP/s counts
2 x the model's MACs per forward (the papers' "GFLOPs" convention) x forwards.

Transport (SiT) samplers are named <ode|sde>-<method><grid points>: ode-heun2_26 integrates
25 Heun steps (50 forwards), sde-Euler250 is SiT's default SDE; the same model stands in for a
transport-trained one (the cost does not depend on what it predicts). dopri5 is adaptive (its
step count depends on the weights): no forwards, ms/forward or TFLOP/s are given for it.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import peak_memory_gib, print_table, time_fn
from udit_jax import diffusion, models, parallel, sampler

NAMES = {"ddpm": "DDPM", "ddim": "DDIM (eta 0)", "dpm": "DPM-Solver++(2M)", "ode": "SiT ODE",
         "sde": "SiT SDE"}
# Model forwards per step of SiT's fixed-step methods (torchdiffeq's, and the SDE's).
STAGES = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "Euler": 1, "Heun": 2}
_SPEC = re.compile(r"(ddpm|ddim|dpm)(\d+)|(ode|sde)-(euler|midpoint|heun2|heun3|rk4|dopri5|Euler"
                   r"|Heun)_?(\d+)")


def parse_samplers(text: str) -> list[tuple[str, int, str | None]]:
    """'ddpm250,ddim50,ode-heun2_26' -> [('ddpm', 250, None), ('ddim', 50, None),
    ('ode', 26, 'heun2')]."""
    out = []
    for item in text.split(","):
        match = _SPEC.fullmatch(item.strip())
        if not match:
            raise SystemExit(f"--samplers: {item!r} is not <ddpm|ddim|dpm><steps> (ddim50) or "
                             "<ode|sde>-<method><grid points> (ode-heun2_26, sde-Euler250)")
        if match.group(1):
            out.append((match.group(1), int(match.group(2)), None))
        else:
            kind, method = match.group(3), match.group(4)
            if (kind == "sde") != (method in ("Euler", "Heun")):
                raise SystemExit(f"--samplers: {item!r}: ode methods are euler, midpoint, heun2, "
                                 "heun3, rk4, dopri5; sde methods Euler, Heun")
            out.append((kind, int(match.group(5)), method))
    return out


def make_sampler(kind: str, steps: int, method: str | None, model, cfg_scale: float, mesh):
    """(fn(params, vae_params, key, indices, labels) -> latents, forwards per image or None
    when adaptive)."""
    if kind in ("ode", "sde"):
        options = {"sampling_method": method}
        if kind == "sde":   # SiT's sample.py settings (its library default SBDM is NaN here)
            options.update(diffusion_form="sigma", last_step="Mean", last_step_size=0.04)
        process = sampler.transport_process({"path_type": "Linear", "prediction": "velocity"},
                                            kind, steps, options)
        forwards = None if method == "dopri5" else (steps - 1) * STAGES[method]
    else:
        process = diffusion.create_diffusion(str(steps))
        forwards = process.num_timesteps
    return (sampler.make_batch_sampler(model, process, sampler=kind, cfg_scale=cfg_scale,
                                       mesh=mesh,
                                       clip_denoised=None if kind in ("ode", "sde") else False),
            forwards)


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/8", help="a model name (DiT-XL/2, U-DiT-B, ...)")
    parser.add_argument("--image-size", type=int, default=128 if on_cpu else 256,
                        help="image side in pixels; latents are 1/8 of it with 4 channels")
    parser.add_argument("--batch", type=int, default=1 if on_cpu else 32,
                        help="images per batch (the model sees twice as many with CFG)")
    parser.add_argument("--samplers", default="ddpm250,ddim50,dpm20",
                        help="comma-separated <ddpm|ddim|dpm><steps> or <ode|sde>-<method><points>")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="1 disables guidance")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--iters", type=int, default=1 if on_cpu else 5)
    args = parser.parse_args()

    latent = args.image_size // 8
    model = models.build_model(args.model, input_size=latent, num_classes=args.num_classes,
                               dtype=jnp.dtype(args.dtype)).inference_form()
    mesh = parallel.make_mesh()
    params = jax.device_put(models.init_params(model, jax.random.key(0)), parallel.replicated(mesh))

    guided = args.cfg_scale > 1.0
    y = np.random.default_rng(0).integers(0, args.num_classes, args.batch).astype(np.int32)
    y = parallel.shard_batch(mesh, y)
    indices = parallel.shard_batch(mesh, np.arange(args.batch, dtype=np.int32))
    key = sampler.noise_key(0)
    flops_per_forward = 2 * model.count_macs() * args.batch * (2 if guided else 1)

    rows = []
    for kind, steps, method in parse_samplers(args.samplers):
        sample, forwards = make_sampler(kind, steps, method, model, args.cfg_scale, mesh)
        seconds = time_fn(lambda: sample(params, None, key, indices, y), warmup=1, iters=args.iters)
        rows.append({"sampler": NAMES[kind] + (f" {method}" if method else ""), "steps": steps,
                     "forwards": forwards, "images": args.batch,
                     "s/batch": seconds, "img/s": args.batch / seconds,
                     "ms/forward": None if forwards is None else 1e3 * seconds / forwards,
                     "TFLOP/s": None if forwards is None
                     else flops_per_forward * forwards / seconds / 1e12,
                     "peak GiB": peak_memory_gib()})
    print_table(rows, title=f"{args.model} @ {args.image_size}px ({latent}x{latent} latents), "
                            f"{args.dtype}, CFG {args.cfg_scale if guided else 'off'}")


if __name__ == "__main__":
    main()
