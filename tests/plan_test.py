"""`ipadapter-jax plan`: the training step compiled for TPU topologies on this CPU host (libtpu), its report's
numbers consistent, multi-host and multi-slice batch arithmetic, the automatic batch search, and the errors.

Compiling tests skip (with the reason) where libtpu cannot be imported; the datasheet table, the batch search's
logic and the usage errors are checked everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from ipadapter_jax import sharding
from ipadapter_jax.cli import plan as plan_cli
from ipadapter_jax.cli.main import EXIT_USAGE
from ipadapter_jax.data import loader
from ipadapter_jax.presets import get_preset
from ipadapter_jax.training import accelerators
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.training.plan import REPORT_FIELDS, DoesNotFit, StepPlan, _oom_sizes, max_batch_per_chip

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def libtpu():
    """Compiling for a TPU topology needs libtpu; without it these tests skip and say why."""
    return pytest.importorskip("libtpu", reason='compiling for TPU topologies needs libtpu (pip install "jax[tpu]")')


def _tiny(**overrides) -> TrainConfig:
    config = get_preset("tiny")
    for path, value in overrides.items():
        group, _, field = path.rpartition(".")
        setattr(config[group] if group else config, field, value)
    return TrainConfig.from_config_dict(config)


def test_accelerator_table_finds_jax_device_kinds():
    assert accelerators.lookup("TPU v5 lite") is accelerators.TPU_V5E  # not v5p, whose kind is "TPU v5"
    assert accelerators.lookup("TPU v5") is accelerators.TPU_V5P
    assert accelerators.lookup("NVIDIA H100 80GB HBM3") is accelerators.H100
    assert accelerators.lookup("cpu") is None and accelerators.peak_flops("cpu") is None
    assert accelerators.peak_flops("TPU v6 lite") == 918e12 and accelerators.TPU_V5E.hbm_bytes == 16 * GiB


def test_hosts_per_topology_follow_the_published_machine_shapes():
    generations = accelerators.TPU_GENERATIONS
    assert generations["v5e"].chips_per_host_bounds("2x4") == (2, 4, 1)  # one 8-chip host
    assert generations["v5e"].chips_per_host_bounds("16x16") == (2, 2, 1)  # 64 hosts of 4
    assert generations["v6e"].chips_per_host_bounds("1x1") == (1, 1, 1)
    assert generations["v5p"].chips_per_host_bounds("2x2x2") == (2, 2, 1)
    assert generations["v4"].chip_config == "megacore"  # one jax device per chip


def test_per_host_batch_is_the_loaders_arithmetic():
    assert loader.per_process_batch(loader.global_batch(8, 16), 4) == 32
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        loader.per_process_batch(10, 4)


def _fake_compiles(total_gib, calls):
    def compile_at(batch: int) -> StepPlan:
        calls.append(batch)
        total = int(total_gib(batch) * GiB)
        if total > 16 * GiB:  # what a compile that ran out of HBM reports: XLA's error's figures only
            return StepPlan(batch, 0.0, False, {"required": total, "available": 16 * GiB})
        return StepPlan(batch, 0.0, True, {"arguments": 2 * GiB, "total": total, "footprint": total})

    return compile_at


@pytest.mark.parametrize(
    "total_gib, limit, start, expected, most_compiles",
    [
        (lambda b: 2 + 1.5 * b, 64, 1, 9, 3),  # linear: predicted from batch 1, confirmed at 9 and 10
        (lambda b: 2 + 1.5 * b, 64, 12, 9, 3),  # the first batch does not fit: down to the predicted one
        (lambda b: 3.5 + 1.3 * b, 64, 1, 9, 4),  # batch 1's guess low: the line through two measurements
        (lambda b: 2 + 0.02 * b * b, 64, 8, 26, 9),  # not linear: bisection steps in, the bracket still closes
        (lambda b: 2 + 0.1 * b, 16, 8, 16, 2),  # everything up to the limit fits
    ],
)
def test_batch_search_finds_the_largest_fitting_batch(total_gib, limit, start, expected, most_compiles):
    calls = []
    best, tried = max_batch_per_chip(_fake_compiles(total_gib, calls), limit, 16 * GiB, start)
    assert best == expected and calls[0] == start and len(calls) <= most_compiles
    assert [t.batch_per_chip for t in tried] == sorted(calls)


def test_batch_search_says_when_not_even_one_example_fits():
    out_of_hbm = r"at batch 1 per chip \(XLA ran out of HBM \(18.00 GiB needed of 16.00\)\); try .*splash"
    with pytest.raises(DoesNotFit, match=out_of_hbm):
        max_batch_per_chip(_fake_compiles(lambda b: 17 + b, []), 64, 16 * GiB, start=8)


def test_out_of_memory_errors_say_which_memory_ran_out():
    # XLA:TPU's messages as libtpu 0.0.42.1 wrote them (bench/tpu_plan.json, cases f2 and f1)
    hbm = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (32.22G) "
        "exceeds available HBM (31.25G)."
    )
    assert _oom_sizes(hbm) == {"required": int(32.22 * GiB), "available": int(31.25 * GiB)}
    sflag = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space sflag. Used 2.4K of "
        "2.0K sflag. Exceeded sflag capacity by 436B."
    )
    assert _oom_sizes(sflag) == {"memory_space": "sflag", "space_required": 2457, "space_available": 2048}
    assert _oom_sizes("RESOURCE_EXHAUSTED: something else") == {}
    out_of_sflag = r"at batch 1 per chip \(XLA ran out of the chip's sflag memory \(2457 of 2048 bytes\), not of HBM\)"
    with pytest.raises(DoesNotFit, match=out_of_sflag):
        max_batch_per_chip(lambda batch: StepPlan(batch, 0.0, False, _oom_sizes(sflag)), 64, 16 * GiB)
    report = json.loads((ROOT / "bench" / "tpu_plan.json").read_text())["cases"]["f1"]["report"]
    assert "does not fit: XLA ran out of the chip's sflag memory (2457 of 2048 bytes), not of HBM" in (
        plan_cli.format_report(report)
    )
    report = json.loads((ROOT / "bench" / "tpu_plan.json").read_text())["cases"]["f2"]["report"]
    assert "does not fit: XLA ran out of HBM (32.22 GiB needed of 31.25)" in plan_cli.format_report(report)


@pytest.mark.parametrize("topology", ["v9z:2x2", "v5e", "v5e:two"])
def test_unknown_topology_is_one_usage_error(topology, capsys):
    assert plan_cli.main(["--config", "tiny", "--topology", topology]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: unknown TPU topology {topology!r}; known generations: v4:")


def test_a_shape_the_generation_does_not_have_is_a_usage_error(libtpu, capsys):
    assert plan_cli.main(["--config", "tiny", "--topology", "v5e:3x3"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TPU topology 'v5e:3x3': ")


@pytest.mark.slow
def test_plan_cli_compiles_the_tiny_step_for_v5e_and_finds_the_largest_batch(libtpu, tmp_path, capsys):
    """One host of 4 chips: every report field, numbers positive and consistent; the automatic batch from the
    config's batch (1) up to the limit (2)."""
    out = tmp_path / "plan.json"
    argv = ["--config", "tiny", "--topology", "v5e:2x2", "--batch-per-chip", "auto", "--max-batch-per-chip", "2"]
    argv.append("--config.data.batch_size_per_device=1")
    assert plan_cli.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "images/s <=" in printed
    assert f"best images/s bound of those that fit: batch {report['auto']['fastest_batch_per_chip']} " in printed
    for section, fields in REPORT_FIELDS.items():
        assert section in report and all(field in report[section] for field in fields), section
    topology, batch, memory, roof = (report[k] for k in ("topology", "batch", "memory_per_chip", "roofline"))
    assert (topology["chips"], topology["hosts"], topology["device_kind"]) == (4, 1, "TPU v5 lite")
    assert topology["mesh"] == {"data": 4, "fsdp": 1}
    assert topology["libtpu_init_args"] == os.environ.get("LIBTPU_INIT_ARGS", "")
    assert report["auto"]["max_batch_per_chip"] == batch["per_chip"] == 2
    assert [t["batch_per_chip"] for t in report["auto"]["tried"]] == [1, 2]  # 2: the limit, predicted from batch 1
    bounds = [t["images_per_s_upper_bound"] for t in report["auto"]["tried"]]
    assert bounds[1] == roof["images_per_s_upper_bound"] and all(bound > 0 for bound in bounds)
    assert report["auto"]["fastest_batch_per_chip"] == 1 + bounds.index(max(bounds))
    assert (batch["global"], batch["per_host"]) == (8, 8)
    for field in ("arguments", "temporaries", "outputs", "code", "xla_peak", "total"):
        assert memory[field] > 0, field
    assert memory["total"] == memory["arguments"] + memory["temporaries"] + memory["outputs"] - memory["aliased"]
    assert memory["footprint"] == max(memory["total"], memory["xla_peak"])
    assert memory["capacity"] == 16 * GiB and memory["fits"] == (memory["footprint"] <= memory["capacity"])
    assert memory["headroom_pct"] == round(100 * (1 - memory["footprint"] / memory["capacity"]), 1)
    assert report["cost_per_chip"]["flops"] > 0 and report["cost_per_chip"]["bytes_accessed"] > 0
    assert roof["step_s_lower_bound"] == max(roof["compute_s"], roof["memory_s"]) > 0
    assert roof["compute_s"] == pytest.approx(report["cost_per_chip"]["flops"] / 197e12)
    assert roof["images_per_s_upper_bound"] == pytest.approx(8 / roof["step_s_lower_bound"])
    assert 0 < roof["mfu_upper_bound"] <= 1 and report["compile_s"] > 0
    cost = report["cost_per_chip"]
    assert (cost["while_loops"], cost["loop_trips"], cost["unknown_trip_counts"]) == (0, 0, 0)  # data parallel
    assert (cost["flops"], cost["bytes_accessed"]) == (cost["xla_flops"], cost["xla_bytes_accessed"])


@pytest.mark.slow
def test_multi_host_multi_slice_plan_splits_the_batch_over_hosts_and_slices_along_data(libtpu):
    """Two v5e:4x4 slices, each 4 hosts of 4 chips: each of the 8 hosts reads an eighth of the global batch (the
    loader's blocks, checked against the batch sharding); fsdp groups stay inside a host, slices lie along data."""
    from ipadapter_jax.training.plan import plan

    topology = accelerators.tpu_topology("v5e:4x4", num_slices=2)
    assert {d.slice_index for d in topology.devices} == {0, 1} and topology.hosts == 8
    config = _tiny(**{"mesh.fsdp": 4})
    report = plan(config, topology, 2, log=lambda _: None)
    assert (report["topology"]["chips"], report["topology"]["hosts"], report["topology"]["num_slices"]) == (32, 8, 2)
    assert report["topology"]["mesh"] == {"data": 8, "fsdp": 4}
    assert report["batch"] == {"per_chip": 2, "global": 64, "per_host": 8}
    assert report["memory_per_chip"]["fits"] and report["cost_per_chip"]["flops"] > 0
    mesh = sharding.make_mesh(-1, 4, topology.devices)  # the run's mesh: its rows are the fsdp groups
    slices = [[d.slice_index for d in row] for row in mesh.devices]
    assert all(len(set(row)) == 1 for row in slices) and [row[0] for row in slices] == [0] * 4 + [1] * 4
    assert all(len({d.process_index for d in row}) == 1 for row in mesh.devices)


def test_fsdp_across_slices_is_refused(libtpu):
    from ipadapter_jax.training.plan import Planner

    with pytest.raises(ConfigError, match=r"mesh.fsdp=8 spans slices of v5e:2x2 \(4 chips each\)"):
        Planner(_tiny(**{"mesh.fsdp": 8}), accelerators.tpu_topology("v5e:2x2", num_slices=2))


@pytest.mark.slow
def test_published_configs_give_the_published_parameter_counts():
    """SD1.5's UNet / text encoder and CLIP ViT-H/14 from `known_models`, shapes only (REFERENCE.md s.4)."""
    from ipadapter_jax.models.adapter import count_params
    from ipadapter_jax.weights import known_models

    base = known_models.abstract_base("", "sd15", "bfloat16")
    encoder = known_models.abstract_image_encoder("", "sd15", "bfloat16")
    assert count_params(base.unet_params) == 859_520_964 and base.unet.cross_attention_dim == 768
    assert count_params(base.text_encoders[0].params) == 123_060_480
    assert count_params(base.vae_params) == 83_653_863 and base.vae.config.scaling_factor == 0.18215
    assert count_params(encoder.params) == 632_076_800 and encoder.config.projection_dim == 1024


@pytest.mark.slow
def test_new_adapters_and_plans_build_the_same_image_projection():
    """`new_adapter` (training from weights) and `known_models.image_proj_spec` (plans) agree on the module."""
    from ipadapter_jax.weights import known_models, load_base, load_image_encoder, new_adapter
    from ipadapter_jax.weights.image_proj_keys import build_image_proj

    base, encoder = load_base("tiny", progress=False), load_image_encoder("tiny")
    for kind, tokens in (("base", 4), ("plus", 16), ("full", 50)):
        adapter = new_adapter(kind, base, encoder, num_tokens=tokens)
        spec = known_models.image_proj_spec(kind, base.unet.cross_attention_dim, encoder.config, tokens)
        assert build_image_proj(spec) == adapter.image_proj, kind


@pytest.mark.slow
def test_abstract_components_of_a_folder_have_the_loaded_shapes(sdxl, tmp_path):
    """From a diffusers SDXL folder's config.json files alone: every param and frozen array has the shape and dtype
    `components.load` gives it from the weights (two text encoders, text-time conditioning, Plus adapter)."""
    import jax

    from ipadapter_jax.training import components

    folders = {"model.base": str(sdxl.folder), "model.image_encoder": str(sdxl.folder / "image_encoder")}
    config = _tiny(**folders, **{"model.adapter_kind": "plus", "model.num_tokens": 4})
    abstract, loaded = components.abstract_components(config), components.load(config, str(tmp_path))

    def shapes(tree):
        return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)

    assert shapes(abstract.frozen) == shapes(loaded.frozen)
    assert shapes(abstract.adapter) == shapes(loaded.adapter)
    assert abstract.models.image_proj == loaded.models.image_proj and abstract.models.unet == loaded.models.unet
    assert [t.model_max_length for t in abstract.tokenizers] == [t.model_max_length for t in loaded.tokenizers]


def test_the_readmes_tpu_tables_are_the_benchmarks():
    """README's "Plan a TPU run" tables are what `python bench/tpu_plan.py --table` prints from bench/tpu_plan.json,
    not numbers typed by hand (regenerate them when a case is added)."""
    spec = importlib.util.spec_from_file_location("tpu_plan_tables", ROOT / "bench" / "tpu_plan_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    results = json.loads((ROOT / "bench" / "tpu_plan.json").read_text())["cases"]
    readme = (ROOT / "README.md").read_text()
    for name, table in [("matrix", tables.matrix(results)), ("compiles", tables.compiles(results))]:
        assert table in readme, f"README.md's {name} table differs from bench/tpu_plan.py's; paste `--table`'s"
