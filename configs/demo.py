"""The embedded demo: a tiny U-DiT learns Fashion-MNIST in pixel space on a laptop CPU.

28x28 grey images padded to 32x32 (1 channel, 10 classes), diffusion straight on pixels
(no VAE). 1500 steps of 32 images (0.8 epoch). Costs (`python -m benchmarks.bench_demo`,
2-core VM with other jobs at load ~3; CPU-s = user + sys): parameter init 27 s (mostly XLA
compile), train-step compile 30 s, one train step 1.52 s wall / 1.37 CPU-s on two XLA devices
(mesh.cpu_devices=2, the batch sharded over both cores) against 1.86 s / 1.58 CPU-s on one;
each 80-image preview (25 DPM steps with CFG) ~98 CPU-s. So the run takes ~40 minutes of
wall time (1500 x 1.52 s + 3 previews), far from the 10-minute goal; the step keeps only
~0.9 cores busy. Quality of the final 80-sample preview grid (eval.quality: recognised by
the project's Fashion-MNIST classifier, test accuracy 89.4%; FD in its 64-d features):

    total_steps  minutes  recognised  FD (n=80)
    1500         ~40      51%         25.4       (docs/demo_samples.png; coats 0/8)

EMA sample grids (one row per class: T-shirt, trouser, pullover, dress, coat, sandal, shirt,
sneaker, bag, ankle boot) are written to <workdir>/samples/step_*.png every 500 steps; the
final one is docs/demo_samples.png. Needs the four Fashion-MNIST files: Debian/Ubuntu package
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or --config.data.dir=DIR holding them.

    python -m udit_jax.main --config=configs/demo.py --workdir=/tmp/udit_demo
"""

from udit_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.model.name = "U-DiT"
    # The official U-DiT block design at 1/24 of U-DiT-S's width; no blocks at full 32x32
    # resolution (the costly stage on a CPU), U-DiT blocks at 16x16 and 8x8.
    config.model.kwargs = dict(
        hidden_size=32, depth=(0, 1, 2, 1, 0), num_heads=1, mlp_ratio=2, down_factor=2,
        ffn_type="basic", attn_type="v2", posemb_type="rope2d", downsampler="dwconv5",
        down_shortcut=1, patch_size=2, class_dropout_prob=0.1)
    config.data.space = "pixel"
    config.data.source = "fashion_mnist"
    config.data.image_size = 32
    config.data.channels = 1
    config.data.num_classes = 10
    config.data.dir = ""                  # "" = /usr/share/datasets/fashion-mnist
    config.data.random_flip = False       # every shoe points left in Fashion-MNIST; keep it so
    # One XLA device per core of a 2-core laptop, the batch sharded over them (8% fewer
    # CPU-seconds per step than one device with intra-op threads; read on CPU hosts only).
    config.mesh.cpu_devices = 2
    config.batch_size = 32
    config.total_steps = 1200
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.ema_decay = 0.995    # a short run: average over the last ~200 steps
    config.log_every_steps = 50
    config.checkpoint_every_steps = 600
    config.checkpoint.keep = 2
    config.checkpoint.keep_every = 0
    config.sample_every_steps = 600
    config.sample.classes = list(range(10))
    config.sample.per_class = 8
    config.sample.sampler = "dpm"         # DPM-Solver++(2M): 25 steps, cheap on a CPU
    config.sample.steps = "25"
    config.sample.cfg_scale = 3.0
    # Sample quality with the project's Fashion-MNIST classifier (trained once, ~2 CPU-minutes,
    # cached): recognised % and FD logged with each preview; --mode=evaluate scores 1000
    # samples of the export.
    config.eval.quality = "fashion_mnist"
    config.eval.num_samples = 1000
    return config
