"""Adapter files: round trips, reference .pt reading, refusal of hostile or malformed files, atomic saves."""
import json
import os
import re
import shlex

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fera_core.adapter_file as adapter_file
from fera_core import AdapterFileError, FeRAAdapter, FeRAConfig, load_adapter, save_adapter

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
LAYER2 = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"  # not the first layer of the file


@pytest.fixture
def ref_sd(ref_adapter_path):
    return torch.load(ref_adapter_path, map_location="cpu", weights_only=True)


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def assert_refused(path, problem):
    """load_adapter(path) raises AdapterFileError naming the file and matching `problem`."""
    with pytest.raises(AdapterFileError) as info:
        load_adapter(path)
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(problem, message), message
    return message


# ---------------------------------------------------------------- reference .pt

def test_reference_pt_gets_reference_defaults(ref_adapter_path, ref_sd):
    adapter = load_adapter(ref_adapter_path)
    c = adapter.config
    assert (c.rank, c.alpha, c.num_bands, c.num_experts, c.router_tau, c.router_hidden) == (4, 1.0, 3, 3, 0.7, 64)
    assert c.indicator == "reference" and c.base_model == "unknown" and c.target_modules == ["to_k", "to_q", "to_v"]
    assert len(adapter.layers) == 24 and adapter.router.tau == 0.7
    assert all(e.scale == 0.25 for e in adapter.layers.values())
    assert adapter.num_parameters() == sum(v.numel() for v in ref_sd.values())
    sd = adapter.file_state_dict()
    assert set(sd) == set(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)


def test_reference_pt_options(ref_adapter_path):
    adapter = load_adapter(ref_adapter_path, alpha=8.0, tau=0.5, base_model="sd15")
    assert (adapter.config.alpha, adapter.config.router_tau, adapter.config.base_model) == (8.0, 0.5, "sd15")
    assert adapter.router.tau == 0.5 and all(e.scale == 2.0 for e in adapter.layers.values())


@pytest.mark.parametrize("options,match", [(dict(tau=0.0), "router_tau must be > 0"),
                                           (dict(alpha=float("nan")), "alpha must be a finite number")])
def test_reference_pt_bad_options(ref_adapter_path, options, match):
    with pytest.raises(AdapterFileError, match=re.escape(str(ref_adapter_path)) + ".*" + match):
        load_adapter(ref_adapter_path, **options)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_safetensors_round_trip(tmp_path, ref_adapter_path, dtype):
    adapter = load_adapter(ref_adapter_path, alpha=2.0, tau=0.4, base_model="sd15").to(dtype)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    assert path == tmp_path / "a.safetensors" and listing(tmp_path) == ["a.safetensors"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["fera.format_version"] == "1" and meta["fera.key_namespace"] == "diffusers"
    assert json.loads(meta["fera.config"]) == adapter.config.to_dict()

    loaded = load_adapter(path)
    assert loaded.config.to_dict() == adapter.config.to_dict()
    assert loaded.config.alpha == 2.0 and loaded.config.router_tau == 0.4 and loaded.router.tau == 0.4
    a, b = adapter.file_state_dict(), loaded.file_state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    assert set(loaded.layers) == set(adapter.layers)
    assert all(e.scale == 0.5 for e in loaded.layers.values())


def test_round_trip_of_partition_and_conv_adapter(tmp_path):
    config = FeRAConfig(rank=2, alpha=4.0, num_bands=4, num_experts=2, indicator="partition",
                        target_modules=["proj_in", "to_out.0"], match_full_name=True, base_model="sdxl",
                        router_hidden=16, fecl_weight=0.3)
    torch.manual_seed(0)
    layers = {"blocks.0.proj_in": adapter_file.RoutedExperts(8, 8, 2, 2, 4.0, (3, 3)),
              "blocks.0.attn.to_out.0": adapter_file.RoutedExperts(8, 6, 2, 2, 4.0)}
    for e in layers.values():
        torch.nn.init.normal_(e.up)
    adapter = FeRAAdapter(config, layers)
    loaded = load_adapter(save_adapter(adapter, tmp_path / "p.safetensors"))
    assert loaded.config == config
    assert loaded.layers["blocks.0.proj_in"].down.shape == (4, 8, 3, 3)
    assert loaded.layers["blocks.0.proj_in"].up.shape == (8, 4, 1, 1)
    a, b = adapter.file_state_dict(), loaded.file_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_safetensors_refuses_reference_options(tmp_path, ref_adapter_path):
    path = save_adapter(load_adapter(ref_adapter_path), tmp_path / "a.safetensors")
    for option in (dict(alpha=2.0), dict(tau=0.5), dict(base_model="sd15")):
        with pytest.raises(AdapterFileError, match=re.escape(str(path)) + ".*can only be supplied for reference .pt"):
            load_adapter(path, **option)


def test_reference_pt_save_round_trip(tmp_path, tiny_unet, ref_adapter_path):
    from fera_core import FeRAModel

    fm = FeRAModel.from_file(tiny_unet, ref_adapter_path)
    out = fm.save_adapters(tmp_path / "again.pt")
    assert listing(tmp_path) == ["again.pt"]
    raw = torch.load(out, weights_only=True)  # the reference's tensor-only pickle
    ref = torch.load(ref_adapter_path, weights_only=True)
    assert set(raw) == set(ref) and all(torch.equal(raw[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- hostile pickle

class Hostile:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path, ref_sd):
    marker = tmp_path / "pwned"
    sd = dict(ref_sd)
    sd["router.net.0.bias"] = Hostile(marker)
    path = tmp_path / "evil.pt"
    torch.save(sd, path)

    assert_refused(path, r"not a plain tensor file, refused without unpickling")
    assert not marker.exists()

    # The payload is live: a plain unpickle would have run it.
    proof = tmp_path / "proof"
    torch.save({"x": Hostile(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()


# ---------------------------------------------------------------- malformed files

def write_pt(tmp_path, sd, name="bad.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def good_safetensors(tmp_path, ref_adapter_path):
    path = save_adapter(load_adapter(ref_adapter_path), tmp_path / "good.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def write_st(tmp_path, sd, meta, name="bad.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), metadata=meta)
    return path


def without(sd, *keys):
    return {k: v for k, v in sd.items() if k not in keys}


def k(m, kind, layer=LAYER):
    return f"base_model.{layer}.experts.{m}.lora_{kind}.weight"


PT_CASES = {
    "nan": (lambda sd: {**sd, k(1, "up"): sd[k(1, "up")].clone().index_fill_(0, torch.tensor([2]), float("nan"))},
            rf"{re.escape(k(1, 'up'))} contains NaN or infinite values"),
    "inf router": (lambda sd: {**sd, "router.net.2.bias": torch.tensor([0.0, float("inf"), 0.0])},
                   r"router.net.2.bias contains NaN or infinite values"),
    "integer dtype": (lambda sd: {**sd, k(0, "down"): sd[k(0, "down")].long()},
                      rf"{re.escape(k(0, 'down'))} has dtype torch.int64; expected a floating-point dtype"),
    "unexpected keys": (lambda sd: {**sd, "base_model.x.lora_A.weight": torch.zeros(2, 2)},
                        r"1 unexpected keys, e.g. \['base_model.x.lora_A.weight'\]"),
    "missing expert": (lambda sd: without(sd, k(2, "down"), k(2, "up")),
                       rf"{re.escape(LAYER)} has experts \[0, 1\], expected 0..2"),
    "missing lora_up": (lambda sd: without(sd, k(1, "up")), rf"{re.escape(LAYER)} expert 1 lacks lora_down or lora_up"),
    "mismatched experts": (lambda sd: {**sd, k(1, "down"): torch.zeros(4, 40)},
                           rf"{re.escape(LAYER)} expert 1: lora_down \(4, 40\) / lora_up \(32, 4\) do not match "
                           r"expert 0 \(\(4, 32\) / \(32, 4\)\)"),
    "wrong rank in one layer": (
        lambda sd: {**sd, **{k(m, "down", LAYER2): torch.zeros(2, 32) for m in range(3)},
                    **{k(m, "up", LAYER2): torch.zeros(32, 2) for m in range(3)}},
        rf"{re.escape(LAYER2)} lora_down has shape \(2, 32\); expected \(rank=4, in\)"),
    "3-d lora_down": (lambda sd: {**sd, k(0, "down"): torch.zeros(4, 32, 3)},
                      r"lora_down has shape \(4, 32, 3\); expected \(rank=4, in\) or \(rank, in, kh, kw\)"),
    "missing router tensor": (lambda sd: without(sd, "router.net.2.bias"), r"router tensors must be \["),
    "router shape": (lambda sd: {**sd, "router.net.0.bias": torch.zeros(63)},
                     r"router.net.0.bias has shape \(63,\), expected \(64,\) for 3 bands, 3 experts, hidden 64"),
    "router experts vs files' experts": (
        lambda sd: {**sd, "router.net.2.weight": torch.zeros(4, 64), "router.net.2.bias": torch.zeros(4)},
        r"has experts \[0, 1, 2\], expected 0..3"),
    "no router": (lambda sd: {k_: v for k_, v in sd.items() if not k_.startswith("router.")},
                  r"no valid router.net.0.weight / router.net.2.weight"),
    "no experts": (lambda sd: {k_: v for k_, v in sd.items() if k_.startswith("router.")},
                   r"no expert weights \(no 'base_model.<path>.experts.<m>.lora_down.weight' keys\)"),
    "0-d tensor": (lambda sd: {**sd, "router.net.2.weight": torch.tensor(1.0)},
                   r"router.net.2.weight is a 0-d tensor"),
    "0-d expert": (lambda sd: {**sd, k(0, "down"): torch.tensor(1.0)}, rf"{re.escape(k(0, 'down'))} is a 0-d tensor"),
    "list": (lambda sd: list(sd.values()), r"expected a non-empty dict of tensors, got list"),
    "tensor": (lambda sd: sd["router.net.0.weight"], r"expected a non-empty dict of tensors, got Tensor"),
    "empty": (lambda sd: {}, r"expected a non-empty dict of tensors, got dict"),
    "nested": (lambda sd: {"state_dict": sd}, r"entry 'state_dict' is not a named tensor"),
}


@pytest.mark.parametrize("case", list(PT_CASES))
def test_malformed_reference_pt_is_refused(tmp_path, ref_sd, case):
    build, problem = PT_CASES[case]
    assert_refused(write_pt(tmp_path, build(dict(ref_sd))), problem)


def _meta_with(meta, **config_changes):
    config = json.loads(meta["fera.config"]) | config_changes
    return {**meta, "fera.config": json.dumps(config)}


ST_CASES = {
    "no metadata": (lambda sd, meta: (sd, None), r"not a FeRA adapter of format version 1 \(fera.format_version = None\)"),
    "other metadata": (lambda sd, meta: (sd, {"format": "pt"}), r"not a FeRA adapter of format version 1"),
    "format version 2": (lambda sd, meta: (sd, {**meta, "fera.format_version": "2"}),
                         r"not a FeRA adapter of format version 1 \(fera.format_version = '2'\)"),
    "key namespace": (lambda sd, meta: (sd, {**meta, "fera.key_namespace": "kohya"}), r"unsupported key namespace 'kohya'"),
    "config not json": (lambda sd, meta: (sd, {**meta, "fera.config": "{rank: 4"}), r"invalid fera.config metadata"),
    "config missing": (lambda sd, meta: (sd, without(meta, "fera.config")), r"invalid fera.config metadata"),
    "config unknown field": (lambda sd, meta: (sd, _meta_with(meta, lora_alpha=8)),
                             r"invalid fera.config metadata: unknown config fields \['lora_alpha'\]"),
    "config bad value": (lambda sd, meta: (sd, _meta_with(meta, rank=0)),
                         r"invalid fera.config metadata: rank must be a positive integer, got 0"),
    "config bad indicator": (lambda sd, meta: (sd, _meta_with(meta, indicator="dct")),
                             r"invalid fera.config metadata: unknown indicator definition 'dct'"),
    "wrong rank": (lambda sd, meta: (sd, _meta_with(meta, rank=2)), r"lora_down has shape \(4, \d+\); expected \(rank=2, in\)"),
    "experts vs config": (lambda sd, meta: (sd, _meta_with(meta, num_experts=2)),
                          r"router.net.2.weight has shape \(3, 64\), expected \(2, 64\) for 3 bands, 2 experts"),
    "rank vs config in a later layer": (
        lambda sd, meta: ({**sd, **{k(m, "down", LAYER2): torch.zeros(2, 32) for m in range(3)},
                           **{k(m, "up", LAYER2): torch.zeros(32, 2) for m in range(3)}}, meta),
        rf"{re.escape(LAYER2)} lora_down has shape \(2, 32\); expected \(rank=4, in\)"),
    "bands vs config": (lambda sd, meta: (sd, _meta_with(meta, num_bands=4)),
                        r"router.net.0.weight has shape \(64, 3\), expected \(64, 4\)"),
    "nan": (lambda sd, meta: ({**sd, k(0, "down"): torch.full_like(sd[k(0, "down")], float("nan"))}, meta),
            rf"{re.escape(k(0, 'down'))} contains NaN or infinite values"),
    "integer dtype": (lambda sd, meta: ({**sd, "router.net.0.bias": torch.zeros(64, dtype=torch.int32)}, meta),
                      r"router.net.0.bias has dtype torch.int32"),
    "unexpected keys": (lambda sd, meta: ({**sd, "extra": torch.zeros(1), "more": torch.zeros(1)}, meta),
                        r"2 unexpected keys"),
    "mismatched experts": (lambda sd, meta: ({**sd, k(2, "up"): torch.zeros(33, 4)}, meta),
                           rf"{re.escape(LAYER)} expert 2: lora_down \(4, 32\) / lora_up \(33, 4\) do not match"),
    "missing expert": (lambda sd, meta: (without(sd, k(0, "down"), k(0, "up")), meta),
                       rf"{re.escape(LAYER)} has experts \[1, 2\], expected 0..2"),
}


@pytest.mark.parametrize("case", list(ST_CASES))
def test_malformed_safetensors_is_refused(tmp_path, ref_adapter_path, case):
    build, problem = ST_CASES[case]
    sd, meta = build(*good_safetensors(tmp_path, ref_adapter_path))
    assert_refused(write_st(tmp_path, sd, meta), problem)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_truncated_safetensors_is_refused(tmp_path, ref_adapter_path, keep):
    data = save_adapter(load_adapter(ref_adapter_path), tmp_path / "good.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:n])
    assert_refused(path, r"unreadable safetensors file \(.+\)")


def test_garbage_pt_is_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(256))
    assert_refused(path, r"not a plain tensor file, refused without unpickling")


@pytest.mark.parametrize("name", ["adapter.ckpt", "adapter.json", "adapter"])
def test_wrong_extension_is_refused(tmp_path, ref_adapter_path, name):
    path = tmp_path / name
    path.write_bytes(ref_adapter_path.read_bytes())  # valid content, wrong name
    assert_refused(path, r"unsupported extension; expected .safetensors, .pt, .pth or .bin")


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pt"])
def test_missing_file_is_refused(tmp_path, name):
    assert_refused(tmp_path / name, "no such file")


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    assert_refused(tmp_path / "dir.safetensors", "no such file")


def test_from_state_dict_names_its_source(ref_sd):
    config = FeRAConfig()
    with pytest.raises(AdapterFileError, match=r"^my dict: 1 unexpected keys"):
        FeRAAdapter.from_state_dict({**ref_sd, "junk": torch.zeros(1)}, config, source="my dict")


# ---------------------------------------------------------------- atomic saves

def test_failed_save_leaves_no_file_and_no_temp_file(tmp_path, ref_adapter_path, monkeypatch):
    adapter = load_adapter(ref_adapter_path)

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_file, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapter, tmp_path / "a.safetensors")
    assert listing(tmp_path) == []


def test_failed_save_keeps_the_previous_file(tmp_path, ref_adapter_path, monkeypatch):
    adapter = load_adapter(ref_adapter_path)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_file, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(adapter, path)
    assert listing(tmp_path) == ["a.safetensors"] and path.read_bytes() == before
    monkeypatch.undo()
    assert load_adapter(path).config == adapter.config


def test_failed_reference_pt_save_leaves_nothing(tmp_path, tiny_unet, ref_adapter_path, monkeypatch):
    from fera_core import FeRAModel

    fm = FeRAModel.from_file(tiny_unet, ref_adapter_path)

    def failing(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(RuntimeError, match="killed"):
        fm.save_adapters(tmp_path / "a.pt")
    assert listing(tmp_path) == []


def test_save_refuses_other_extensions(tmp_path, ref_adapter_path):
    adapter = load_adapter(ref_adapter_path)
    with pytest.raises(ValueError, match=r"a.pt: adapters are saved as .safetensors"):
        save_adapter(adapter, tmp_path / "a.pt")
    assert listing(tmp_path) == []


def test_save_into_missing_directory_fails_cleanly(tmp_path, ref_adapter_path):
    with pytest.raises(Exception, match="No such file or directory"):
        save_adapter(load_adapter(ref_adapter_path), tmp_path / "nope" / "a.safetensors")
    assert listing(tmp_path) == []


def test_saved_file_is_readable_by_others(tmp_path, ref_adapter_path):
    path = save_adapter(load_adapter(ref_adapter_path), tmp_path / "a.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644
