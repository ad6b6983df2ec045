"""python -m fera_core compare in a tiny mode (a few seconds): its four files, the equal-size rule, the
methods being what their names say, and every method seeing the same images and noise."""
import json
import math
import time

import pytest
import torch

from fera_core.__main__ import main
from fera_core.compare import methods, runner
from fera_core.demo.model import NEW, load_base, striped_tiles
from fera_core.demo.run import adapt

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--quick", "--steps", "2", "--seeds", "2", "--samples", "8", "--sample-steps", "4", "--lrs", "0.001,0.01",
        "--workers", "1", "--methods", "lora,fera,uniform"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    start = time.time()
    assert main(["compare", *TINY, "--output", str(out)]) == 0
    return out, time.time() - start


def test_tiny_compare_writes_its_four_files_in_seconds(tiny):
    out, seconds = tiny
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compare_results.json", "compare_table.md", "compare_levels.png", "compare_samples.png"])
    from matplotlib.image import imread
    assert imread(out / "compare_levels.png").shape[1] > 600
    assert imread(out / "compare_samples.png").shape[0] > 300  # a row per method, the base model and the data
    assert seconds < 60  # about 10 s on two idle cores; a shared machine is slower


def test_results_hold_every_run_scored_with_equal_adapter_sizes(tiny):
    out, _ = tiny
    results = json.loads((out / "compare_results.json").read_text())
    assert list(results["methods"]) == ["lora", "fera", "uniform"]
    counts = results["counts"]
    assert counts["lora"][0] == counts["fera"][0] == counts["uniform"][0]
    assert counts["lora"][1] == counts["uniform"][1] == 0 and counts["fera"][1] > 0  # only FeRA trains its router
    assert set(results["learning_rates"].values()) <= {0.001, 0.01}
    for method, scores in results["sweep"].items():  # [learning rate, validation SWD]: the lowest was chosen
        assert [lr for lr, _ in scores] == [0.001, 0.01]
        assert results["learning_rates"][method] == min(scores, key=lambda s: s[1])[0]
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        [("base", 0)] + [(m, s) for m in ("lora", "fera", "uniform") for s in (0, 1)])
    for r in runs:
        values = r["target_swd"] + r["retention_swd"] + [r["target_spectrum"], r["retention_spectrum"]]
        assert len(r["target_swd"]) == len(r["retention_swd"]) == 2 and all(math.isfinite(v) for v in values), r
        assert (r["router"] is not None) == (r["method"] == "fera")
    router = next(r["router"] for r in runs if r["method"] == "fera")
    assert 0.0 <= router["entropy"] <= 1.0 and 0.0 <= router["spread"] <= 1.0
    assert {router["lead_high_noise"], router["lead_low_noise"]} <= {0, 1, 2}


def test_table_names_every_method_and_soda(tiny):
    out, _ = tiny
    table = (out / "compare_table.md").read_text()
    for title in ("LoRA (2 seeds)", "FeRA (2 seeds)", "FeRA, uniform mix (2 seeds)", "base model", "noise floor"):
        assert title in table
    assert table.count("SODA: not built yet") == 2
    assert "routing entropy" in table


def test_existing_outputs_are_kept_without_force(tiny, capsys):
    out, _ = tiny
    before = (out / "compare_table.md").read_text()
    assert main(["compare", *TINY, "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "compare_table.md").read_text() == before


def test_unknown_method_is_refused(tmp_path, capsys):
    assert main(["compare", "--methods", "lora,dora", "--output", str(tmp_path)]) == 2
    assert "dora" in capsys.readouterr().err


def test_methods_of_unequal_size_are_refused(monkeypatch):
    def bigger(base):
        return methods._fera(base, routed=False, fecl_weight=0.0, num_experts=1, rank=16, alpha=16.0)
    monkeypatch.setitem(methods.METHODS, "lora-16", ("LoRA 16", bigger))
    with pytest.raises(ValueError, match="equal numbers of adapter weights"):
        runner.parameter_counts(["lora", "lora-16"], str(runner.ASSET))


def test_every_method_trains_the_same_number_of_adapter_weights():
    counts = runner.parameter_counts(list(methods.METHODS), str(runner.ASSET))
    weights = {c[0] for c in counts.values()}
    adapted = set(methods.fera(load_base()).model.adapter.layers)
    layers = [m for path, m in load_base().named_modules() if path in adapted]
    assert len(layers) == 23
    rank12 = sum(12 * (m.in_features + m.out_features) if isinstance(m, torch.nn.Linear)
                 else 12 * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels) for m in layers)
    assert weights == {rank12}  # 23 layers, rank 12 (3 experts x 4) each, counted here by hand
    assert counts["fera"][1] == counts["no-fecl"][1] == counts["reference"][1] == 3 * 64 + 64 + 64 * 3 + 3


def test_lora_is_one_expert_of_rank_12_with_plain_mse():
    lora = methods.lora(load_base())
    cfg = lora.config
    assert (cfg.num_experts, cfg.rank, cfg.alpha / cfg.rank, cfg.fecl_weight) == (1, 12, 1.0, 0.0)
    assert not lora.routed and not {id(p) for p in lora.model.router.parameters()} & {id(p) for p in lora.trainable}


def test_uniform_mix_routes_a_third_to_each_expert_whatever_the_spectrum():
    uniform = methods.uniform_mix(load_base())
    energies = torch.softmax(torch.randn(16, 3), dim=1)
    assert torch.equal(uniform.model.router(energies), torch.full((16, 3), 1 / 3))
    assert uniform.config.fecl_weight == methods.SHIPPED.fecl_weight and not uniform.routed


def test_ablations_change_one_thing_each():
    shipped = methods.SHIPPED
    assert methods.no_fecl(load_base()).config.fecl_weight == 0.0
    assert methods.reference_indicator(load_base()).config.indicator == "reference" != shipped.indicator
    one = methods.one_expert(load_base()).config
    assert (one.num_experts, one.rank, one.fecl_weight) == (1, 12, shipped.fecl_weight)


def test_methods_see_the_same_images_and_noise():
    """LoRA and FeRA without FECL start as the base model (their up-projections are zero) and both train
    with plain MSE, so their first losses agree exactly only if they drew the same images, noise levels
    and noise."""
    train = striped_tiles(16, torch.Generator().manual_seed(1))

    def first_loss(build, seed):
        torch.manual_seed(seed)
        return adapt(build(load_base()), lambda g: train[torch.randint(16, (4,), generator=g)], 1, 1e-3, seed)[0]
    assert first_loss(methods.lora, 3) == first_loss(methods.no_fecl, 3) != first_loss(methods.lora, 4)
    assert NEW == 2  # what adapt labels the images with: the class the base model never saw
