"""Scoring samples against a reference batch: IS, FID, sFID, precision, recall (ADM protocol).

    python -m udit_jax.main --mode=evaluate --config=... --workdir=...   (see evaluate_from_config:
        scores config.eval.sample_npz, or samples the export first; or writes a dataset reference)

    from udit_jax.evaluation import evaluate_npz
    metrics = evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz",
                           inception_weights="pt_inception-2015-12-05-6726825d.pth")

`Evaluator` holds the network and the reference side (statistics and pool3 features, computed
once), so a training loop can score sample sets repeatedly.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import jax
import numpy as np
from etils import epath

from udit_jax import config as config_lib
from udit_jax import export
from udit_jax.evaluation import metrics as M
from udit_jax.evaluation import reference as R
from udit_jax.evaluation.inception_weights import load_inception_variables
from udit_jax.evaluation.features import DTYPES, Activations, InceptionFeatures
from udit_jax.evaluation.inception import POOL3_DIM

SPATIAL_DIM = 17 * 17 * 7  # Mixed_6d grid at 299x299 input, 7 channels
METRIC_NAMES = ("inception_score", "fid", "sfid", "precision", "recall")


def _check_statistics(stats: tuple[M.Statistics, M.Statistics], path) -> None:
    pool, spatial = stats
    if pool.mu.shape != (POOL3_DIM,) or spatial.mu.shape != (SPATIAL_DIM,):
        raise ValueError(f"{path}: statistics have mu {pool.mu.shape} / mu_s {spatial.mu.shape}; "
                         f"ADM's layout is mu [{POOL3_DIM}] (pool3) and mu_s [{SPATIAL_DIM}] "
                         "(mixed_6/conv, 7 channels): this file was made with other features")


class Evaluator:
    """The Inception network plus a reference batch, ready to score sample sets.

    reference_path: ADM-layout .npz (arr_0 images and/or mu/sigma/mu_s/sigma_s).
    inception_weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .npz/.safetensors).
    preprocess: "adm" (the papers' numbers) or "pytorch_fid".
    pr_distance: "float16" (ADM), "float32" or "float64" (exact).
    dtype: "float32" (parity) or "bfloat16" (faster, approximate).
    fid_method: "sqrtm" (ADM's matrix square root) or "eigh" (faster, ~1e-7 relative).
    sample_count, sample_resolution: when given, the samples to be scored are checked against
    the reference and the metrics' minimum sizes before anything is computed.
    """

    def __init__(self, reference_path, inception_weights, *, preprocess: str = "adm",
                 batch_size: int = 256, pr_distance: str = "float16",
                 is_split_size: int = M.IS_SPLIT_SIZE, dtype: str = "float32",
                 mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                 read_batch: int = 1000, sample_resolution: tuple[int, int] | None = None,
                 sample_count: int | None = None, fid_method: str = "sqrtm"):
        if fid_method not in M.FRECHET_METHODS:
            raise ValueError(f"unknown fid_method {fid_method!r}; use one of {M.FRECHET_METHODS}")
        if pr_distance not in M.DISTANCE_MODES:
            raise ValueError(f"unknown pr_distance {pr_distance!r}; use one of {M.DISTANCE_MODES}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {tuple(DTYPES)}")
        self.reference_path = str(reference_path)
        self.pr_distance = pr_distance
        self.fid_method = fid_method
        self.is_split_size = is_split_size
        self.progress = progress
        self.read_batch = read_batch
        # Everything cheap is checked before the network runs.
        keys = R.npz_keys(reference_path)
        self.reference_stats = R.load_statistics(reference_path)
        self.stats_source = "computed" if self.reference_stats is None else "stored"
        if self.reference_stats is not None:
            _check_statistics(self.reference_stats, reference_path)
        self.reference_info = None
        if R.IMAGES_KEY in keys:
            self.reference_info = R.image_array_info(reference_path)
            R.check_image_array(self.reference_info, reference_path)
        elif self.reference_stats is None:
            raise ValueError(f"{reference_path} holds neither images (arr_0) nor statistics "
                             f"(mu, sigma, mu_s, sigma_s); keys: {keys}")
        if sample_count is not None:
            self.check_samples(sample_count, sample_resolution)
        variables = load_inception_variables(inception_weights)
        self.features = InceptionFeatures(variables, preprocess, batch_size, mesh,
                                          dtype=DTYPES[dtype],
                                          precision="highest" if dtype == "float32" else None)
        self.reference_acts = None
        if self.reference_info is not None:
            self.reference_acts = self.features.from_batches(
                R.iter_images(reference_path, read_batch), self.reference_info.count,
                "reference", progress)
        if self.reference_stats is None:
            self.reference_stats = (M.feature_statistics(self.reference_acts.pool3),
                                    M.feature_statistics(self.reference_acts.spatial))

    def _check_resolution(self, resolution: tuple[int, int]) -> None:
        if self.reference_info is not None and tuple(resolution) != self.reference_info.resolution:
            raise ValueError(
                f"samples are {resolution[0]}x{resolution[1]} but the reference "
                f"{self.reference_path} is {self.reference_info.resolution[0]}x"
                f"{self.reference_info.resolution[1]}: use the reference batch of the sample "
                "resolution (e.g. VIRTUAL_imagenet256_labeled.npz for 256x256 samples)")

    def check_samples(self, count: int, resolution: tuple[int, int] | None = None,
                      with_pr: bool = True) -> None:
        """Raises when `count` images at `resolution` cannot be scored against this reference."""
        if resolution is not None:
            self._check_resolution(resolution)
        M.check_split(count, self.is_split_size)
        if count < 2:
            raise ValueError(f"FID needs at least 2 samples, got {count}")
        if with_pr and self.reference_info is not None and count < M.PR_NEIGHBOURS + 1:
            raise ValueError(f"precision/recall needs at least {M.PR_NEIGHBOURS + 1} samples, "
                             f"got {count}")

    def sample_activations(self, batches: Iterable[np.ndarray], total: int | None = None
                           ) -> Activations:
        return self.features.from_batches(batches, total, "samples", self.progress)

    def score(self, samples: Activations, with_pr: bool = True) -> dict:
        """{inception_score, fid, sfid, precision, recall} of sample activations (precision and
        recall are None without reference images or when `with_pr` is False)."""
        self.check_samples(len(samples), with_pr=with_pr)
        pool = M.feature_statistics(samples.pool3)
        spatial = M.feature_statistics(samples.spatial)
        out = {"inception_score": M.inception_score(samples.probs, self.is_split_size),
               "fid": M.frechet_distance(pool, self.reference_stats[0], method=self.fid_method),
               "sfid": M.frechet_distance(spatial, self.reference_stats[1],
                                          method=self.fid_method),
               "precision": None, "recall": None}
        if with_pr and self.reference_acts is not None:
            pr = M.precision_recall(self.reference_acts.pool3, samples.pool3, self.pr_distance)
            out["precision"], out["recall"] = pr.precision, pr.recall
        return out


def metric_names(count: int) -> dict[str, str]:
    """{"fid": "FID-50K", "sfid": "sFID-50K", "inception_score": "IS-50K"} for `count`
    samples: a number is reported with the count it was computed on (FID-5K is not FID-50K)."""
    tag = f"{count // 1000}K" if count % 1000 == 0 else str(count)
    return {"fid": f"FID-{tag}", "sfid": f"sFID-{tag}", "inception_score": f"IS-{tag}"}


def format_table(metrics: dict) -> str:
    """The metrics as a table; FID, sFID and IS named with metrics["num_samples"] when given."""
    names = metric_names(metrics["num_samples"]) if metrics.get("num_samples") else {}
    rows = [(names.get(name, name), metrics.get(name)) for name in METRIC_NAMES]
    width = max(len(n) for n, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ---------"]
    lines += [f"{n.ljust(width)}  {'-' if v is None else f'{v:.4f}'}" for n, v in rows]
    return "\n".join(lines)


def evaluate_npz(sample_path, reference_path, inception_weights, *, preprocess: str = "adm",
                 batch_size: int = 256, pr_distance: str = "float16",
                 is_split_size: int = M.IS_SPLIT_SIZE, dtype: str = "float32",
                 mesh: jax.sharding.Mesh | None = None, output_json=None,
                 progress: bool = True, read_batch: int = 1000,
                 fid_method: str = "sqrtm", evaluator: Evaluator | None = None) -> dict:
    """Scores an ADM-layout sample .npz (arr_0 uint8 [N, H, W, 3]) against a reference batch.

    Returns (and, with `output_json`, writes from process 0) a dict with the metrics
    (inception_score, fid, sfid, precision, recall) and the settings that produced them;
    prints a table. `evaluator`: one built with these settings already (its reference read).
    """
    t0 = time.time()
    sample_info = R.image_array_info(sample_path)
    R.check_image_array(sample_info, sample_path)
    if evaluator is None:
        evaluator = Evaluator(reference_path, inception_weights, preprocess=preprocess,
                              batch_size=batch_size, pr_distance=pr_distance,
                              is_split_size=is_split_size, dtype=dtype, mesh=mesh,
                              progress=progress, read_batch=read_batch,
                              sample_count=sample_info.count,
                              sample_resolution=sample_info.resolution, fid_method=fid_method)
    else:
        evaluator.check_samples(sample_info.count, sample_info.resolution)
    samples = evaluator.sample_activations(R.iter_images(sample_path, read_batch),
                                           sample_info.count)
    result = evaluator.score(samples)
    result.update({
        "num_samples": sample_info.count, "metric_names": metric_names(sample_info.count),
        "num_reference": (None if evaluator.reference_info is None
                          else evaluator.reference_info.count),
        "sample_resolution": list(sample_info.resolution),
        "reference_statistics": evaluator.stats_source,
        "sample_path": str(sample_path), "reference_path": str(reference_path),
        "preprocess": preprocess, "pr_distance": pr_distance, "is_split_size": is_split_size,
        "fid_method": fid_method, "dtype": dtype, "devices": jax.device_count(),
        "seconds": round(time.time() - t0, 2),
    })
    if jax.process_index() == 0:
        print(format_table(result))
        if output_json is not None:
            _write_result(output_json, result)
    return result


def _check_output(output_json, sample_path) -> None:
    """Refuses to replace the scores of another sample file (two jobs' samples.npz share a
    name); the same file's are replaced by its new scores."""
    output_json = epath.Path(output_json)
    if not output_json.exists():
        return
    try:
        scored = json.loads(output_json.read_text()).get("sample_path")
    except (ValueError, AttributeError):
        scored = "?"
    if scored != str(sample_path):
        raise FileExistsError(f"{output_json} holds the scores of {scored}, not of {sample_path}; "
                              "set --config.eval.output_json=FILE for these samples (or move "
                              "that file)")


def _write_result(output_json, result: dict) -> None:
    output_json = epath.Path(output_json)
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output_json}")


def _check_eval_fields(ev) -> None:
    """The scoring settings of config.eval, named as fields, before anything is sampled."""
    for field, allowed in (("fid_method", M.FRECHET_METHODS), ("pr_distance", M.DISTANCE_MODES),
                           ("inception_dtype", tuple(DTYPES))):
        if ev[field] not in allowed:
            raise ValueError(f"config.eval.{field}={ev[field]!r}; use one of {tuple(allowed)}")
    if not isinstance(ev.is_split_size, int) or ev.is_split_size < 1:
        raise ValueError(f"config.eval.is_split_size={ev.is_split_size!r} must be a positive "
                         f"integer (ADM's: {M.IS_SPLIT_SIZE})")


def _export_dir(config, workdir: epath.Path) -> epath.Path:
    return epath.Path(config.eval.export_dir) if config.eval.export_dir else workdir / "export"


def _result_stem(sample: epath.Path, from_job: bool) -> str:
    """A sampling job's folder name (its settings) for its samples.npz, else the file's stem."""
    if from_job or (sample.name == "samples.npz" and (sample.parent / "job.json").exists()):
        return sample.parent.name
    return sample.stem


def _eval_job(config, workdir: epath.Path) -> tuple[epath.Path, epath.Path, dict]:
    """(export dir, job dir, sampling settings) of the evaluation's own sampling job: the job
    dir's name is its settings, so other settings never share it."""
    ev = config.eval
    export_dir = _export_dir(config, workdir)
    s = config_lib.sampling(config, "eval",
                            config_lib.export_objective(export.read_info(export_dir)))
    out_dir = (workdir / "eval" / "samples"
               / f"{config_lib.sampling_tag(s)}-{s['dtype']}-{ev.num_samples}")
    return export_dir, out_dir, s


def _sample_export(config, workdir: epath.Path) -> epath.Path:
    """Samples config.eval.num_samples images of random classes from the export with the
    evaluation's sampling settings (config.sampling(config, "eval"): the papers' protocol by
    default) and returns the job's samples.npz (a finished job with the same settings is
    reused, an interrupted one resumed)."""
    from udit_jax import sample as sample_lib
    export_dir, out_dir, s = _eval_job(config, workdir)
    result = sample_lib.run_sampling_job(
        export_dir, out_dir, num_images=config.eval.num_samples, seed=s["seed"],
        sampler=s["sampler"], steps=s["steps"], cfg_scale=s["cfg_scale"],
        guidance_interval=s["guidance_interval"], transport_options=s["transport_options"],
        guide_all_channels=s["guide_all_channels"],
        per_device_batch=config.sample.per_device_batch, write_png=False,
        vae_weights=config.vae.weights or None, mesh=config_lib.make_mesh(config),
        dtype=s["dtype"])
    return epath.Path(result["npz"])


def evaluate_from_config(config, workdir) -> dict:
    """`--mode=evaluate`: scores samples against config.eval.reference_npz, or writes a
    dataset's reference statistics.

    config.eval fields (defaults and meanings in udit_jax.config.base_config):
      write_reference_to               if set: write the reference statistics of config.data's
                                       dataset there (write_dataset_reference) and stop
      reference_npz, inception_weights the ADM reference batch and pytorch-fid weights
      sample_npz                       the samples to score; if empty, num_samples [50,000]
                                       images of random classes are first sampled from the
                                       export (export_dir) into <workdir>/eval/samples/<settings>/
                                       with config.sampling(config, "eval")'s settings: the
                                       papers' protocol by default (DDPM-250, no guidance,
                                       float32; config.EVAL_PROTOCOL)
      inception_dtype                  the Inception network's compute dtype
      output_json                      "" = <workdir>/eval/<name>.json, <name> the sampling
                                       job's folder (its settings) for a job's samples.npz,
                                       else the sample file's stem; a file holding another
                                       sample file's scores is never replaced
    config.eval.quality='fashion_mnist' (the demo) scores with the project's classifier instead
    and writes its table's numbers the same way.
    The metric names carry the sample count (FID-50K; FID-5K when fewer). The mesh is
    config.mesh's.
    """
    ev = config.eval
    workdir = epath.Path(workdir)
    mesh = config_lib.make_mesh(config)
    if ev.write_reference_to:
        from udit_jax.evaluation.dataset_reference import write_dataset_reference
        if not ev.inception_weights:
            raise ValueError("config.eval.write_reference_to needs config.eval.inception_weights "
                             "(pytorch-fid Inception weights)")
        return write_dataset_reference(
            config, ev.write_reference_to, ev.inception_weights,
            max_images=ev.reference_max_images or None, seed=ev.seed,
            with_images=ev.reference_with_images, preprocess=ev.preprocess,
            batch_size=ev.batch_size, dtype=ev.inception_dtype, mesh=mesh)
    if not ev.quality:
        missing = [k for k in ("reference_npz", "inception_weights") if not ev[k]]
        if missing:
            raise ValueError(f"--mode=evaluate needs config.eval.{', config.eval.'.join(missing)} "
                             "(ADM reference .npz, pytorch-fid Inception weights), and either "
                             "config.eval.sample_npz or an export to sample from")
        _check_eval_fields(ev)
    else:
        from udit_jax.evaluation import fashion_mnist_quality
        fashion_mnist_quality.check_quality_config(config)
    # Everything that can be checked is checked before sampling from the export (which can
    # take hours): the settings, the reference and the network, and where the result goes.
    sample = (epath.Path(ev.sample_npz) if ev.sample_npz
              else _eval_job(config, workdir)[1] / "samples.npz")
    stem = _result_stem(sample, from_job=not ev.sample_npz)
    output = epath.Path(ev.output_json or workdir / "eval" / f"{stem}.json")
    _check_output(output, sample)
    if ev.quality:
        # Fashion-MNIST: recognised % and FD from the project's own classifier (no Inception).
        classifier = fashion_mnist_quality.load_or_train_classifier(config.data.dir or None)
        if not ev.sample_npz:
            sample = _sample_export(config, workdir)
        score = fashion_mnist_quality.evaluate_npz(sample, classifier=classifier)
        result = dict(score.scalars(), num_samples=int(score.counts.sum()),
                      sample_path=str(sample), metric="fashion_mnist_quality")
        if jax.process_index() == 0:
            _write_result(output, result)
        return result
    evaluator = None
    if not ev.sample_npz:
        if not epath.Path(ev.inception_weights).exists():
            raise FileNotFoundError(f"config.eval.inception_weights={ev.inception_weights!r} "
                                    "not found (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        size = export.read_info(_export_dir(config, workdir))["data"]["image_size"]
        evaluator = Evaluator(ev.reference_npz, ev.inception_weights, preprocess=ev.preprocess,
                              batch_size=ev.batch_size, pr_distance=ev.pr_distance,
                              is_split_size=ev.is_split_size, dtype=ev.inception_dtype,
                              mesh=mesh, sample_count=ev.num_samples,
                              sample_resolution=(size, size), fid_method=ev.fid_method)
        sample = _sample_export(config, workdir)
    return evaluate_npz(sample, ev.reference_npz, ev.inception_weights,
                        preprocess=ev.preprocess, batch_size=ev.batch_size,
                        pr_distance=ev.pr_distance, is_split_size=ev.is_split_size,
                        dtype=ev.inception_dtype, mesh=mesh, output_json=output,
                        fid_method=ev.fid_method, evaluator=evaluator)
