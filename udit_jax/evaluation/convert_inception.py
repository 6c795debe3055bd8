"""Command line: pytorch-fid's FID Inception weights -> a torch-free .safetensors / .npz copy.

    python -m udit_jax.evaluation.convert_inception pt_inception-2015-12-05-6726825d.pth \
        inception_fid.safetensors

Run it once on a machine with torch; the copy loads anywhere (`inception_weights`). A module of
its own, which the package does not import, so `python -m` runs it without runpy's warning.
"""

from __future__ import annotations

import sys

import numpy as np

from udit_jax import errors, paths
from udit_jax.convert.io import load_state_dict, save_state_dict
from udit_jax.evaluation.inception_weights import UNUSED_SUFFIX, inception_variables_from_torch


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: python -m udit_jax.evaluation.convert_inception IN OUT"
                         "  (IN: .pth/.npz/.safetensors; OUT: .safetensors or .npz)")
    src, dst = (paths.resolve(a) for a in argv)
    try:
        state_dict = load_state_dict(src)
        inception_variables_from_torch(state_dict)  # refuses a file that is not this network
        save_state_dict(dst, {k: np.asarray(v, np.float32) for k, v in state_dict.items()
                              if not k.endswith(UNUSED_SUFFIX)})
    except errors.EXPECTED as e:
        errors.report(e)
        return 1
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
