"""--mode=compile: the train step compiled for TPU topologies on this CPU host (needs libtpu)."""

import functools
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from udit_jax import compile as compile_lib
from udit_jax import hlo_cost, memory_fit, parallel
from udit_jax import config as config_lib


def tiny_config(family: str, topology: str, batch_size: int = 16):
    c = config_lib.base_config()
    c.model.name = family
    if family == "U-DiT":
        c.model.kwargs = dict(hidden_size=16, depth=(0, 1, 0, 0, 0), num_heads=1, mlp_ratio=2,
                              ffn_type="rep", rep=1, attn_type="v2", posemb_type="rope2d",
                              downsampler="dwconv5", down_shortcut=1)
    else:
        c.model.kwargs = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)
    c.data.space = "pixel"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.num_classes = 10
    c.batch_size = batch_size
    c.compile.topology = topology
    return c


# Cloud TPU's slice shapes for its accelerator-type names (cloud.google.com/tpu/docs).
@pytest.mark.parametrize("name, libtpu_name, chips", [
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v5p-8", "v5:2x2x1", 4),
    ("v5p-128", "v5:4x4x4", 64), ("v5p-256", "v5:4x4x8", 128), ("v5p-512", "v5:4x8x8", 256),
    ("v5e-16", "v5e:4x4", 16), ("v5litepod-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8),
    ("v6e-256", "v6e:16x16", 256), ("v5p:4x4x8", "v5:4x4x8", 128), ("v5e:2x2", "v5e:2x2", 4),
])
def test_topology_names(name, libtpu_name, chips):
    t = compile_lib.parse_topology(name)
    assert (t.libtpu_name, t.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v7-8", "v5p-12", "v5e:2x2x1", "tpu", "v4-2"])
def test_unknown_topology_is_a_clear_error(name, tmp_path):
    with pytest.raises(compile_lib.TopologyError, match="compile.topology="):
        compile_lib.compile_from_config(tiny_config("DiT", name), str(tmp_path))


def test_collectives_from_hlo_text():
    hlo = """
  %all-reduce.1 = (f32[192]{0}, bf16[32,192]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ag = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%c), dimensions={0}
  %agd = f32[32,4]{1,0} all-gather-done(%ag)
  ROOT %rs = f32[2,4]{1,0} reduce-scatter(%d), dimensions={0}
  %x = f32[4]{0} add(%all-reduce.1, %e)
"""
    got = {c["kind"]: (c["count"], c["bytes"]) for c in hlo_cost.collectives(hlo)}
    assert got == {"all-reduce": (1, 192 * 4 + 32 * 192 * 2), "all-gather": (1, 32 * 4 * 4),
                   "reduce-scatter": (1, 2 * 4 * 4)}


REQUIRED = ("topology", "chips", "device_kind", "global_batch", "mesh", "hbm_bytes_per_chip",
            "hbm_capacity_bytes", "fits", "headroom", "compile_seconds", "xla_flops_per_chip",
            "model_flops_per_chip", "estimated_step_seconds",
            "estimated_images_per_second_per_chip", "estimated_mfu", "collectives", "versions",
            "compiler_flags", "host_allocator", "host_cpu_cores")


JEMALLOC_MAPS = "7f12-7f13 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"


@pytest.mark.parametrize("preload, maps, allocator", [
    ("libjemalloc.so.2", JEMALLOC_MAPS, "jemalloc"),
    ("/opt/lib/libtcmalloc_minimal.so.4", "... /opt/lib/libtcmalloc_minimal.so.4\n", "tcmalloc"),
    ("", JEMALLOC_MAPS, "glibc"),                      # loaded by a library, not malloc's owner
    ("libjemalloc.so.2", "... /usr/lib/libc.so.6\n", "glibc"),   # preload named, not loaded
    ("", "... /usr/lib/libc.so.6\n", "glibc")])
def test_host_allocator_is_the_preloaded_malloc(preload, maps, allocator):
    assert compile_lib.host_allocator(preload, maps) == allocator


def test_compile_line_names_the_malloc_and_what_a_glibc_host_can_do(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert compile_lib.host_allocator() == "glibc"   # this process, as the tests run it
    line = lambda a: compile_lib._allocator_note(a)  # noqa: E731
    assert line("glibc") == "glibc malloc; with jemalloc preloaded it compiles faster, see the README"
    assert line("jemalloc") == "jemalloc malloc"
    assert line(None) == "unknown malloc"   # a report written before the field existed
    # The cores the compile ran on: its time means little without them.
    assert compile_lib._cores({"host_cpu_cores": 2}) == " on 2 cores"
    assert compile_lib._cores({"host_cpu_cores": 1}) == " on 1 core"
    assert compile_lib._cores({}) == ""


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu", reason="needs the [tpu] extra (pip install -e '.[tpu]')")


@pytest.fixture(autouse=True)
def _no_persistent_cache():
    """The TPU programs compiled here stay out of the tests' persistent compilation cache: no
    CPU host can read them back (each read is a warning)."""
    with parallel.without_compilation_cache():
        yield


# Each family and each topology once in CI (a tiny U-DiT takes a minute to compile for a TPU
# on a 2-core CI machine); the fourth pairing with -m slow.
@pytest.mark.parametrize("family, topology, chips, kind", [
    ("U-DiT", "v5e:2x2", 4, "TPU v5 lite"), ("DiT", "v5e:2x2", 4, "TPU v5 lite"),
    ("DiT", "v4:2x2x1", 4, "TPU v4"),
    pytest.param("U-DiT", "v4:2x2x1", 4, "TPU v4", marks=pytest.mark.slow)])
def test_tiny_models_compile_with_a_full_report(libtpu, family, topology, chips, kind, tmp_path):
    report = compile_lib.compile_from_config(tiny_config(family, topology), str(tmp_path))
    assert set(REQUIRED) <= set(report)
    assert json.loads((tmp_path / "compile" / f"{topology}.json").read_text()) == report
    assert (report["chips"], report["device_kind"], report["global_batch"]) == (chips, kind, 16)
    assert report["versions"]["libtpu"] and report["versions"]["jax"] == jax.__version__
    assert f"  compiler       jax {jax.__version__}, " in compile_lib.format_report(report)
    cores = len(os.sched_getaffinity(0))
    assert report["host_cpu_cores"] == cores
    assert (f"CPU-s on {cores} core{'s' if cores > 1 else ''}; {report['host_allocator']} malloc"
            in compile_lib.format_report(report))
    assert report["mesh"] == {"data": 4, "fsdp": 1}
    hbm = report["hbm_bytes_per_chip"]
    assert set(hbm) >= {"arguments", "outputs", "temporaries", "total"}
    assert report["fits"] and 0.99 < report["headroom"] < 1
    # Float32 params + EMA + two Adam moments, replicated: at least 4 x the params per chip.
    from udit_jax.models import info
    n_params = info.count_params(config_lib.build_model(tiny_config(family, topology)))
    assert hbm["arguments"] >= 4 * 4 * n_params
    # XLA counts every FLOP (norms, softmax, Adam, the loss, and the q.k matmul that
    # attention_recomputed's backward does again: 4% of the tiny DiT's, whose 64 tokens are
    # many for its width of 32); the model's count only the matmuls/convs (3 x forward). For
    # these models they agree within 20% (DiT 1.18, U-DiT 1.04).
    ratio = report["xla_flops_per_chip"] / report["model_flops_per_chip"]
    assert 1.0 <= ratio < 1.2, ratio
    assert report["estimated_step_seconds"] > 0 and report["estimate_covers_step"]
    assert report["estimated_images_per_second_per_chip"] == pytest.approx(
        4 / report["estimated_step_seconds"])
    assert report["custom_kernels"] == {"count": 0, "undeclared": 0}   # XLA prices all of it
    profile = report["cost_profile"]
    assert len(profile) > 3 and 0.3 < sum(p["share"] for p in profile) <= 1 + 1e-9
    kinds = {k["kind"]: k["share"] for k in report["cost_by_kind"]}
    assert sum(kinds.values()) == pytest.approx(1) and set(kinds) <= set(hlo_cost.KINDS)
    assert 0.05 < kinds["matmuls and convolutions"] < 1
    # Data parallel: the float32 gradients are all-reduced (combined into few all-reduces;
    # XLA may reduce a smaller tensor instead where that is cheaper, so not all 4 bytes/param).
    reduced = {c["kind"]: c for c in report["collectives"]}["all-reduce"]["bytes"]
    assert 2 * n_params <= reduced <= 8 * n_params


def test_multi_slice_compiles_with_the_slices_on_the_data_axis(libtpu, tmp_path):
    """--config.compile.num_slices=2: the mesh spans both slices (jax.make_mesh lays out one
    slice and failed on an assertion), the slices split the data axis, and the step gets an
    estimate (XLA prices the program's SliceId op at -1 s, like ConcatBitcast)."""
    import numpy as np
    config = tiny_config("DiT", "v5e:2x2")
    config.compile.num_slices = 2
    report = compile_lib.compile_from_config(config, str(tmp_path))
    assert report["chips"] == 8 and report["num_slices"] == 2
    assert report["mesh"] == {"data": 8, "fsdp": 1}
    assert report["estimated_step_seconds"] > 0 and report["estimated_mfu"] > 0
    assert "on 2 slices of v5e:2x2 (v5e:2x2, 8 x TPU v5 lite)" in compile_lib.format_report(report)
    assert (tmp_path / "compile" / "v5e:2x2x2.json").exists()
    devices = compile_lib.topology_devices(compile_lib.parse_topology("v5e:2x2"), 2)
    mesh = parallel.build_mesh([("data", -1), ("fsdp", 2)], devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert slice_of.tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_split_update_keeps_a_quarter_of_the_optimizer_state_per_chip(libtpu, tmp_path):
    """mesh.shard_update on 4 chips: params whole on each chip, EMA and Adam moments split in
    4 (float32: 4 + 12 / 4 bytes per param instead of 16), new params all-gathered."""
    config = tiny_config("DiT", "v5e:2x2")
    # Widths of whole TPU tiles, so that padding does not hide the split.
    config.model.kwargs = dict(hidden_size=256, depth=1, num_heads=2, patch_size=2)
    config.mesh.shard_update = True
    report = compile_lib.compile_from_config(config, str(tmp_path))
    assert report["shard_update"] is True and report["fits"]
    from udit_jax.models import info
    n_params = info.count_params(config_lib.build_model(config))
    assert 6 * n_params <= report["hbm_bytes_per_chip"]["arguments"] <= 9 * n_params
    assert "all-gather" in {c["kind"] for c in report["collectives"]}
    assert "update split over the data axes" in compile_lib.format_report(report)


@pytest.mark.parametrize("family", ["DiT", "U-DiT"])
def test_fsdp_slices_the_qkv_bias_on_each_chip(libtpu, family, tmp_path):
    """FSDP shards the fused qkv bias [3D] in 4, across the q|k|v boundaries. DiT's TPU form
    slices it for its three q/k/v matmuls; U-DiT reorders q's and k's columns for RoPE. Done
    on the split bias, the partitioner moved its pieces between chips (DiT-XL/2 on v5p-8: 196
    collective-permutes and 225 zero-filled buffers; U-DiT-L: 616 collective-permutes); both
    gather the bias whole first, so each chip slices its own copy."""
    config = tiny_config(family, "v5e:2x2")   # 3 x 32 (16) bias channels: 24 (12) per chip
    # 4 input channels as SD-VAE latents have: with 1, the patch embedding's split kernel
    # moves between chips too.
    config.data.channels = 4
    config.mesh.rules, config.mesh.fsdp, config.mesh.data = "fsdp", 4, -1
    report = compile_lib.compile_from_config(config, str(tmp_path))
    assert report["mesh"] == {"data": 1, "fsdp": 4}
    kinds = {c["kind"] for c in report["collectives"]}
    assert "all-gather" in kinds, report["collectives"]
    assert not kinds & {"collective-permute", "all-to-all"}, report["collectives"]


@pytest.mark.slow   # a minute of TPU compile on 2 cores; loop_scale itself: test_loop_scale_*
def test_scanned_stages_are_estimated_with_their_trip_counts(libtpu, tmp_path):
    """XLA counts a scanned stage's body once; the report scales the cost model's time by the
    loops' trip counts (loop_scale) and then gives img/s and MFU for the whole step."""
    config = tiny_config("U-DiT", "v5e:2x2")
    config.model.kwargs = dict(config.model.kwargs, depth=(0, 3, 0, 0, 0))
    config.model.scan_blocks = True
    report = compile_lib.compile_from_config(config, str(tmp_path))
    assert report["xla_flops_per_chip"] < 0.9 * report["model_flops_per_chip"]  # bodies once
    assert report["estimate_covers_step"] and report["loop_scale"] > 1.2
    assert report["estimated_step_seconds"] == pytest.approx(
        report["cost_model_seconds_loop_bodies_once"] * report["loop_scale"])
    assert report["estimated_images_per_second_per_chip"] == pytest.approx(
        4 / report["estimated_step_seconds"])
    assert "loop bodies times their trip counts" in compile_lib.format_report(report)


def _one_v5e_chip():
    """A replicated sharding over one TPU v5e chip of libtpu's topology devices (no TPU)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    device = compile_lib.topology_devices(compile_lib.parse_topology("v5e-1"))[0]
    return NamedSharding(Mesh(np.array([device]), ("d",)), PartitionSpec())


def _matmul_loop(n: int, scanned: bool):
    """n (1024 x 1024 bf16 matmul + tanh) layers, as one lax.scan or unrolled, compiled for
    one TPU v5e chip: (cost-model seconds with loop bodies once, loop_scale)."""
    sharding = _one_v5e_chip()
    layer = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731

    def run(x, ws):
        if scanned:
            return jax.lax.scan(layer, x, ws)[0]
        for i in range(n):
            x = layer(x, ws[i])[0]
        return x

    compiled = jax.jit(run).lower(
        jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=sharding),
        jax.ShapeDtypeStruct((n, 1024, 1024), jnp.bfloat16, sharding=sharding)).compile()
    text = compiled.as_text()
    seconds = hlo_cost.cost_analysis(compiled)["optimal_seconds"]
    return hlo_cost.cost_model_seconds(seconds, text), hlo_cost.loop_scale(text)


def test_loop_scale_counts_each_iteration(libtpu):
    """A scan of n identical layers: XLA's cost model gives about the same time for 4 and 8
    iterations (one body each); loop_scale restores the factor n (the body dominates)."""
    (once4, scale4), (once8, scale8) = _matmul_loop(4, True), _matmul_loop(8, True)
    assert once8 == pytest.approx(once4, rel=0.1)
    assert 3.5 < scale4 <= 4 and 7 < scale8 <= 8
    assert once8 * scale8 / (once4 * scale4) == pytest.approx(2, rel=0.1)
    # Without loops there is nothing to scale.
    assert _matmul_loop(4, False)[1] == 1.0


def _pallas_program(kernel_cost: str):
    """tanh(x) @ w (1024^2, bf16) for one TPU v5e chip, the matmul as XLA's dot
    (kernel_cost "xla") or as one Pallas kernel that declares its true cost ("declared") or
    none ("undeclared"). Returns the compiled program."""
    from jax.experimental import pallas as pl
    n = 1024
    # One bf16 pass (the tests' default precision, highest, is no Mosaic matmul).
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.DEFAULT,
                            preferred_element_type=jnp.float32)

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = dot(a_ref[...], b_ref[...]).astype(o_ref.dtype)

    def run(x, w):
        x = jnp.tanh(x)
        if kernel_cost == "xla":
            return dot(x, w).astype(x.dtype)
        declared = pl.CostEstimate(flops=2 * n ** 3, transcendentals=0,
                                   bytes_accessed=3 * n * n * 2)
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n, n), jnp.bfloat16),
                              cost_estimate=declared if kernel_cost == "declared" else None)(x, w)

    arg = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=_one_v5e_chip())
    return jax.jit(run).lower(arg, arg).compile()


def test_pallas_kernels_are_estimated_only_as_they_declare(libtpu):
    """XLA's cost model does not look inside a Pallas (Mosaic) kernel: it adds the FLOPs the
    kernel declares, and nothing for one that declares none. The report then gives no step
    time, img/s or MFU and says why, and says when declared costs are in the estimate."""
    n, peak = 1024, 197.0
    est = {k: compile_lib.estimate(_pallas_program(k), images=1, steps=1,
                                   model_flops=2 * n ** 3, peak_tflops=peak)
           for k in ("xla", "declared", "undeclared")}
    flops = {k: e["xla_flops_per_chip"] for k, e in est.items()}
    assert flops["declared"] - flops["undeclared"] == 2 * n ** 3   # taken as declared
    assert flops["undeclared"] < 1e-3 * flops["xla"]               # the kernel priced at zero
    assert [est[k]["custom_kernels"] for k in est] == [
        {"count": 0, "undeclared": 0}, {"count": 1, "undeclared": 0},
        {"count": 1, "undeclared": 1}]
    for k in ("xla", "declared"):
        assert est[k]["estimate_covers_step"]
        assert est[k]["estimated_step_seconds"] >= 2 * n ** 3 / (peak * 1e12)
    lines = {k: "\n".join(compile_lib.estimate_lines(dict(e, what="train")))
             for k, e in est.items()}
    mfu = re.compile(r"MFU [\d.]+%")
    assert "kernel" not in lines["xla"] and mfu.search(lines["xla"])
    assert "custom kernels 1 Pallas kernel(s) in the estimate at the cost each declares" \
        in lines["declared"] and mfu.search(lines["declared"])
    u = est["undeclared"]
    assert not u["estimate_covers_step"] and u["estimated_step_seconds"] is None
    assert u["estimated_images_per_second_per_chip"] is None and u["estimated_mfu"] is None
    assert "1 Pallas kernel(s) declare no cost estimate" in lines["undeclared"]
    assert not mfu.search(lines["undeclared"])


_HLO_WITH_LOOPS = """
%inner.cond (p: (s32[])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  %p = (s32[]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT, metadata={op_name="while/cond/lt"}
}

%inner.body (p: (s32[])) -> (s32[]) {
  %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/transpose(jvp(M))/while/body/blocks_3/attn/exp"}, backend_config={"estimated_cycles":"10"}
}

%outer.cond (p: (s32[])) -> pred[] {
  %n.clone = s32[]{:T(128)} constant(5)
  %p = (s32[]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.2 = pred[]{:T(512)} compare(%i, %n.clone), direction=LT
}

%outer.body (p: (s32[])) -> (s32[]) {
  %g = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"20"}
  %w = (s32[]) while(%t), condition=%inner.cond, body=%inner.body, backend_config={}
}

%fused (p: f32[8]) -> f32[8] {
  %e = f32[8]{0} exponential(%p), backend_config={"estimated_cycles":"999"}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %h = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(step)/jvp(M)/embed/dot_general"}, backend_config={"estimated_cycles":"100"}
  %w.1 = (s32[]) while(%t), condition=%outer.cond, body=%outer.body
  ROOT %cc = f32[8]{0} custom-call(%a, %b), custom_call_target="ConcatBitcast"
}
"""


_HLO_KINDS = """
%dot.fused (p: bf16[8,8]) -> bf16[8,8] {
  %n = bf16[8,8]{1,0} fusion(%p), kind=kLoop, calls=%inner.fused
  ROOT %d = bf16[8,8]{1,0} dot(%n, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner.fused (p: bf16[8,8]) -> bf16[8,8] {
  ROOT %m = bf16[8,8]{1,0} multiply(%p, %p)
}

%nested.dot (p: bf16[8,8]) -> bf16[8,8] {
  ROOT %f = bf16[8,8]{1,0} fusion(%p), kind=kOutput, calls=%dot.fused
}

%slice.fused (p: bf16[4,8,8], i: s32[]) -> bf16[1,8,8] {
  ROOT %s = bf16[1,8,8]{2,1,0} dynamic-slice(%p, %i, %i, %i), dynamic_slice_sizes={1,8,8}
}

%copy.fused (p: bf16[8,8]) -> bf16[8,8] {
  %c = bf16[8,8]{0,1} convert(%p)
  ROOT %t = bf16[8,8]{1,0} copy(%c)
}

ENTRY %main (x: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0:T(8,128)(2,1)} fusion(%x), kind=kOutput, calls=%nested.dot, backend_config={"estimated_cycles":"50"}
  %b = (bf16[8]{0}, bf16[8,8]{1,0}) fusion(%x), kind=kLoop, calls=%inner.fused, backend_config={"estimated_cycles":"20"}
  %c = bf16[1,8,8]{2,1,0} fusion(%y, %i), kind=kLoop, calls=%slice.fused, backend_config={"estimated_cycles":"10"}
  %d = bf16[8,8]{1,0} fusion(%x), kind=kLoop, calls=%copy.fused, backend_config={"estimated_cycles":"10"}
  %e = bf16[8,8]{0,1:T(8,128)(2,1)} copy(%x), backend_config={"estimated_cycles":"5"}
  %f = bf16[8,8]{1,0} convolution(%x, %x), window={size=1x1}, backend_config={"estimated_cycles":"5"}
  %g = bf16[8,8]{1,0} all-reduce(%x), to_apply=%add, backend_config={"estimated_cycles":"0"}
  ROOT %h = bf16[8,8]{1,0} all-gather(%x), dimensions={0}, backend_config={"estimated_cycles":"10"}
}
"""


def test_cost_by_kind_reads_what_each_fusion_fuses():
    """A fusion is a matmul when it fuses a dot, also inside a nested fusion (50 + the bare
    convolution 5); multi-output (tuple-shaped) fusions are read by their opcode too."""
    assert [(k["kind"], k["share"]) for k in hlo_cost.cost_by_kind(_HLO_KINDS)] == [
        ("matmuls and convolutions", pytest.approx(55 / 110)),
        ("elementwise, reductions and the rest", pytest.approx(20 / 110)),
        ("copies and transposes", pytest.approx(15 / 110)),
        ("dynamic slices (scan residuals, stacked params)", pytest.approx(10 / 110)),
        ("collectives", pytest.approx(10 / 110))]   # the all-reduce's 0 cycles: not listed
    assert hlo_cost.cost_by_kind("HloModule m") == []


def test_loop_scale_and_unpriced_ops_from_hlo_text():
    # Once: 100 + 20 + 10 = 130 cycles (fused computations are priced at their fusion).
    # With trip counts: 100 + 5 x (20 + 3 x 10) = 350.
    assert hlo_cost.loop_scale(_HLO_WITH_LOOPS) == pytest.approx(350 / 130)
    # FSDP's windowed-einsum loops (the SPMD partitioner's) count in u32.
    u32_loops = _HLO_WITH_LOOPS.replace("s32[]", "u32[]")
    assert hlo_cost.loop_scale(u32_loops) == pytest.approx(350 / 130)
    unknown = _HLO_WITH_LOOPS.replace("direction=LT, metadata", "direction=NE, metadata")
    assert hlo_cost.loop_scale(unknown) is None      # a trip count it cannot read
    assert hlo_cost.loop_scale("HloModule m") is None
    # Where the time goes, by source op, loops counted in full.
    assert [(p["op"], p["share"]) for p in hlo_cost.cost_profile(_HLO_WITH_LOOPS)] == [
        ("backward blocks_*/attn", pytest.approx(150 / 350)),
        ("forward embed", pytest.approx(100 / 350)),
        ("(no source op)", pytest.approx(100 / 350))]
    # By kind: the loop's exp fusion is elementwise work.
    assert hlo_cost.cost_by_kind(_HLO_WITH_LOOPS) == [
        {"kind": "elementwise, reductions and the rest", "share": 1.0}]
    # remat's forward, recomputed inside the backward, is the backward of the same part.
    remat = ('metadata={op_name="jit(step)/transpose(jvp(DiT))/jvp(DiT)/checkpoint/blocks_9/'
             'mlp/fc1/dot_general"}')
    assert hlo_cost._op_group(remat) == "backward blocks_*/mlp/fc1"
    # The cost model's -1 s for the unpriced ConcatBitcast is taken back out.
    assert hlo_cost.cost_model_seconds(-0.9994, _HLO_WITH_LOOPS) == pytest.approx(0.0006)
    assert hlo_cost.cost_model_seconds(-1.5, _HLO_WITH_LOOPS) is None
    assert hlo_cost.cost_model_seconds(0.002, "HloModule m") == 0.002
    # ZeroCrop, too (U-DiT-L's FSDP step on v5p-8: three of them, -2.87 s).
    zero_crop = '  %z = pred[512]{0} custom-call(%c), custom_call_target="ZeroCrop"\n'
    assert hlo_cost.cost_model_seconds(-2.87, _HLO_WITH_LOOPS + 2 * zero_crop) == pytest.approx(0.13)


def test_too_large_a_batch_does_not_fit(libtpu, tmp_path):
    config = tiny_config("DiT", "v5e-4", batch_size=2 ** 20)
    with pytest.raises(memory_fit.DoesNotFitError, match=r"needs (at least )?[\d.]+ GiB per chip but "
                       r"a TPU v5 lite has [\d.]+ GiB .*mesh.rules=fsdp.*shard_update=True.*remat"
                       r".*per-chip batch"):
        compile_lib.compile_from_config(config, str(tmp_path))
    report = json.loads((tmp_path / "compile" / "v5e-4.json").read_text())
    assert report["fits"] is False and report["headroom"] < 0
    assert report["hbm_bytes_per_chip"]["total"] > report["hbm_capacity_bytes"] > 15 * 2 ** 30


def test_sampling_batch_compiles_per_denoising_step(libtpu, tmp_path):
    config = tiny_config("DiT", "v5e:2x2")
    config.compile.what = "sample"
    config.sample.update(dict(sampler="ddim", steps="4", per_device_batch=2, cfg_scale=2.0))
    report = compile_lib.compile_from_config(config, str(tmp_path))
    assert (tmp_path / "compile" / "v5e:2x2.sample.json").exists()
    assert (report["global_batch"], report["steps_per_call"]) == (8, 4)
    # XLA counts the sampling loop's body once: one denoising step of the CFG batch (16 rows).
    ratio = report["xla_flops_per_chip"] / report["model_flops_per_chip"]
    assert 1.0 <= ratio < 1.25, ratio
    assert report["estimated_images_per_second_per_chip"] == pytest.approx(
        2 / (4 * report["estimated_step_seconds"]))


def test_saved_executable_for_a_pod_and_a_run_elsewhere(libtpu, tmp_path, caplog):
    """compile.save_executable writes the TPU train step beside the report; a training run
    with that workdir on other devices (this CPU) says why it does not use it and compiles."""
    import logging
    from udit_jax import train
    config = tiny_config("DiT", "v5e:2x2")
    config.compile.save_executable = True
    report = compile_lib.compile_from_config(config, str(tmp_path))
    saved = tmp_path / "compile" / "v5e:2x2.executable"
    assert report["executable"] == str(saved) and saved.stat().st_size > 10_000
    described = json.loads((tmp_path / "compile" / "v5e:2x2.executable.json").read_text())
    assert (described["device_kind"], described["num_devices"]) == ("TPU v5 lite", 4)
    assert described["versions"]["libtpu"] and len(described["program_sha256"]) == 64
    config.update_from_flattened_dict({"data.source": "synthetic", "batch_size": 4,
                                       "total_steps": 2, "checkpoint_every_steps": 2,
                                       "sample_every_steps": 0})
    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    assert "v5e:2x2.executable: the program differs" in caplog.text   # batch 4, CPU lowering
    assert "compiled for 4 x TPU v5 lite, this run has 1 x cpu" in caplog.text
    assert "compiling the train step" in caplog.text


def test_saving_an_executable_is_for_the_train_step(libtpu, tmp_path):
    config = tiny_config("DiT", "v5e:2x2")
    config.compile.update(dict(what="sample", save_executable=True))
    with pytest.raises(ValueError, match="save_executable=True saves the train step"):
        compile_lib.compile_from_config(config, str(tmp_path))


def test_cudnn_attention_is_refused_for_tpus(libtpu, tmp_path):
    config = tiny_config("DiT", "v5e:2x2")
    config.model.kwargs.attention_impl = "cudnn"
    config.model.dtype = config.eval.dtype = "bfloat16"
    with pytest.raises(ValueError, match="'cudnn' is the fused attention of NVIDIA GPUs, not TPUs"):
        compile_lib.compile_from_config(config, str(tmp_path))


def _fresh_process_with_libtpu_without_a_tpu(args: list[str], unset: tuple[str, ...], cwd=None,
                                             env_set=None):
    """Runs `python <args>` in `cwd` (the repository by default) in a fresh process (libtpu
    starts once per process) without the environment variables `unset` and with `env_set`;
    skips unless libtpu is installed on a machine without TPU chips."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("libtpu") is None or parallel.on_cloud_tpu_vm():
        pytest.skip("needs libtpu installed on a machine without TPU chips")
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run([sys.executable, *args], cwd=cwd or repo,
                          env=dict(env, PYTHONPATH=str(repo), **(env_set or {})),
                          capture_output=True, text=True,
                          timeout=300)


def test_plain_runs_do_not_start_libtpu_without_a_tpu(tmp_path):
    """With libtpu installed (for this file's compile mode) on a machine without TPU chips,
    the other modes start JAX without loading libtpu, whose start-up prints a page of TPU
    worker-hostname errors before JAX falls back to the CPU."""
    # --mode=export without checkpoints: JAX starts its backends, then one error line.
    proc = _fresh_process_with_libtpu_without_a_tpu(
        ["-m", "udit_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
         "--mode=export"], unset=("JAX_PLATFORMS",))
    assert proc.returncode == 1 and "devices (cpu)" in proc.stderr, proc.stderr[-2000:]
    for noise in ("TPU_WORKER_HOSTNAMES", "libtpu", "Unable to initialize backend"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_compile_mode_starts_libtpu_without_a_page_of_errors(tmp_path):
    """The command as users type it (main, a relative --workdir), on a machine without TPU
    chips: the demo's train step compiled for v5e:2x2, its report written, and libtpu started
    without its TPU worker-hostname errors (a page of E0000 lines before the report; main
    started JAX's backends, libtpu's among them, before the topology was built) or its
    "could not determine TPU accelerator type" warning. With
    JAX_COMPILATION_CACHE_DIR set, as many users keep it, the TPU program is not written to
    that cache: it could never be read back on this host (a warning on every later run), and
    on a TPU VM a read would be reported as the compile time."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    xla_cache = tmp_path / "xla_cache"
    proc = _fresh_process_with_libtpu_without_a_tpu(
        ["-m", "udit_jax.main", f"--config={repo / 'configs' / 'demo.py'}", "--workdir=runs/c",
         "--mode=compile", "--config.compile.topology=v5e:2x2"],
        unset=("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS"), cwd=tmp_path,
        env_set={"JAX_COMPILATION_CACHE_DIR": str(xla_cache),
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert proc.returncode == 0 and "train step of U-DiT" in proc.stdout, proc.stderr[-2000:]
    # Before the silent minutes of a large model's compile: what is compiling, where.
    assert "lowering the train step of U-DiT for v5e:2x2 (4 x TPU v5 lite), mesh" in proc.stderr
    assert re.search(r"compiling the train step of U-DiT for v5e:2x2 \(4 x TPU v5 lite\) on \d+ "
                     r"cores? \((glibc|jemalloc|tcmalloc|unknown) malloc\)", proc.stderr)
    assert "worker hostname" not in proc.stderr, proc.stderr[-2000:]
    assert "accelerator type" not in proc.stderr, proc.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "c" / "compile" / "v5e:2x2.json").read_text())
    assert report["fits"] and report["chips"] == 4 and report["estimated_step_seconds"] > 0
    assert not [p.name for p in xla_cache.glob("*train_step*")]
    assert "Resetting cache" not in proc.stderr, proc.stderr[-2000:]


def test_timed_compiles_bypass_the_persistent_cache_and_leave_it_as_it_was(libtpu, tmp_path):
    """parallel.without_compilation_cache (around --mode=compile's and the benchmarks' timed
    compiles): a program compiled inside is not written to JAX's persistent cache although
    this process uses one, and the next compile after it is written again."""
    from jax.experimental.compilation_cache import compilation_cache
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_enable_compilation_cache")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
    try:
        x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=_one_v5e_chip())
        with parallel.without_compilation_cache():
            jax.jit(lambda a: jnp.tanh(a @ a)).lower(x).compile()
            jax.jit(lambda a: a + 1.0).lower(jax.ShapeDtypeStruct((3,), jnp.float32)).compile()  # CPU
        assert not list(tmp_path.iterdir())
        assert jax.config.jax_enable_compilation_cache
        jax.jit(lambda a: a * 3.0 - 1.0).lower(jax.ShapeDtypeStruct((5,), jnp.float32)).compile()
        assert len(list(tmp_path.iterdir())) == 1
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def test_has_loops_on_compiled_programs():
    """bench_train reports XLA's counts only for programs without loops (bodies counted once)."""
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 3, lambda i, a: a * a + 1.0, x))
    plain = jax.jit(lambda x: x * x + 1.0)
    x = jnp.ones((4,))
    assert hlo_cost.has_loops(looped.lower(x).compile().as_text())
    assert not hlo_cost.has_loops(plain.lower(x).compile().as_text())
    assert hlo_cost.has_loops(_HLO_WITH_LOOPS)


def test_train_step_takes_its_tpu_chips_forms(libtpu):
    """The train step for a topology traces the forms of its chip generation
    (models.forms_for with the devices' device_kind): DiT's q, k and v projected tokens-minor
    ([D, B, N]: the tiny DiT's 32 channels, 16 images, 64 tokens) on v5p only
    (layers.qkv_projection; on v5e that form was slower)."""
    def lowered(topology):
        config = tiny_config("DiT", topology)
        devices = compile_lib.topology_devices(compile_lib.parse_topology(topology))
        mesh = parallel.mesh_from_config(config.mesh, devices)
        assert parallel.forms_device(mesh) == ("tpu", devices[0].device_kind)
        fn, args, *_ = compile_lib._train_program(config, config_lib.build_model(config), mesh)
        return fn.lower(*args).as_text()
    tokens_minor = re.compile(r"stablehlo.dot_general .*-> tensor<32x16x64x")
    assert tokens_minor.search(lowered("v5p:2x2x1"))
    assert not tokens_minor.search(lowered("v5e:2x2"))


def test_attention_writes_its_weights_only_in_bfloat16_on_tpus(libtpu):
    """attention_recomputed's forward and backward compiled for a TPU chip in bfloat16: no
    float32 [B, heads, N, M] array goes to HBM (on-chip VMEM, layout memory space S(1), is
    free to hold one). The forward normalises after the weighted sum, so XLA fuses the
    logits' row maximum, exp and sums into the q.k matmul; the backward recomputes the
    logits (no merging with the forward's) and keeps the weights in bfloat16. Before, the
    float32 logits went to HBM and were read three times (U-DiT-L's first-level attention on
    v5p: 3.8 ms against 2.2 ms by the cost model)."""
    import re
    from udit_jax.models import layers

    b, n, heads, hd = 64, 256, 8, 24      # logits too large for VMEM: 128 MiB in float32
    spec = jax.ShapeDtypeStruct((b, n, heads, hd), jnp.bfloat16, sharding=_one_v5e_chip())
    loss = lambda q, k, v: jnp.sum(layers.attention_recomputed(q, k, v, 0.3).astype(jnp.float32) ** 2)  # noqa: E731
    with jax.default_matmul_precision("default"):   # a run's, not the tests' "highest"
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile().as_text()
    entry = text[text.index("ENTRY"):]
    buffers = re.findall(rf"(\w+)\[{b},{heads},{n},{n}\]\{{([^}}]*)\}}", entry)
    in_hbm = {dtype for dtype, layout in buffers if "S(1)" not in layout}
    assert in_hbm == {"bf16"}, buffers


def test_rope_leaves_no_float32_queries_or_keys_in_the_tpu_program(libtpu):
    """U-DiT's attention (RoPE, cosine normalisation) compiled for a TPU chip in bfloat16,
    forward and backward: no op of the program outputs the rotated queries or keys in
    float32. Rotating them in float32 made XLA drop the round trip through bfloat16 and
    keep float32 q and k, in HBM at U-DiT-L's sizes, with a layout copy of each (U-DiT-L's
    decoder level-1 attention on v5p: 9.69 ms against 9.00 ms by the cost model)."""
    import re
    import flax.linen as nn
    from udit_jax.models import udit

    b, side, d, heads = 2, 8, 96, 4       # q, k: [8 = 4 groups x 2 images, 16 tokens, 96]
    attention = udit.DownsampledAttention(d, heads, 2, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((b, side, side, d), jnp.float32, sharding=_one_v5e_chip())
    params = jax.eval_shape(lambda: nn.unbox(
        attention.init(jax.random.key(0), jnp.zeros(x.shape))["params"]))
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x.sharding), params)
    loss = lambda p, x: jnp.sum(attention.apply({"params": p}, x) ** 2)  # noqa: E731
    with jax.default_matmul_precision("default"):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    entry = text[text.index("ENTRY"):]
    as_q = re.findall(r"f32\[(?:8,16,96|8,16,4,24|8,16,4,12)\]", entry)   # whole, by head, halves
    assert not as_q, as_q
