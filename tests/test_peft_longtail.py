"""The long tail of PEFT's behaviour: code written against peft 0.21.2, run unchanged on both libraries
through the public API (see ``peft_surface.py``); errors are compared by class and full message."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from peft_surface import (  # noqa: E402
    CONFIGS,
    MLP,
    Case,
    build,
    case_id,
    check,
    for_both_methods,
    grads,
    layer,
    output,
    quiet,
    raises,
    two_adapters,
)


# ------------------------------------------------------------------------------------- modules_to_save
def _two_heads(lib, method):
    """Two adapters that both keep a trainable copy of ``lin1``."""
    m = build(lib, method, modules_to_save=["lin1"])
    torch.manual_seed(1)
    quiet(m.add_adapter, "other", CONFIGS[method](lib, modules_to_save=["lin1"]))
    return m


def _two_heads_active(lib, tmp, method):
    m = _two_heads(lib, method)
    err = raises(lambda: m.base_model.set_adapter(["default", "other"]), message=True)
    return err, m.active_adapters, layer(m, "lin1").active_adapters, grads(m)


def _walk_adapter_modules(lib, tmp, method):
    """What peft's own ``set_requires_grad`` checks do: every module with ``adapter_layer_names``, read."""
    m = _two_heads(lib, method)
    m.set_requires_grad("other", requires_grad=True)
    seen = []
    for name, module in m.named_modules():
        if not hasattr(module, "adapter_layer_names"):
            continue
        for attr in module.adapter_layer_names:
            for adapter, sub in getattr(module, attr).items():
                flags = [p.requires_grad for p in sub.parameters()] if isinstance(sub, torch.nn.Module) \
                    else [sub.requires_grad]
                seen.append((name, attr, adapter, flags))
    return sorted(seen), grads(m)


def _head_set_requires_grad(lib, tmp, method):
    m = _two_heads(lib, method)
    head = layer(m, "lin1")
    head.set_requires_grad("other", requires_grad=True)
    head.set_requires_grad("default", requires_grad=False)
    return head.adapter_layer_names, head.merged_adapters, grads(m)


# ------------------------------------------------------------------------ layers lacking the active adapter
def _split(lib, method):
    """``default`` on lin0 only, ``other`` on lin1 only."""
    torch.manual_seed(0)
    m = quiet(lib.get_peft_model, MLP(), CONFIGS[method](lib, target_modules=["lin0"]))
    torch.manual_seed(1)
    quiet(m.add_adapter, "other", CONFIGS[method](lib, target_modules=["lin1"]))
    return m


def _actives(m):
    return [layer(m, "lin0").active_adapters, layer(m, "lin1").active_adapters,
            [s.active_adapters for s in m.get_layer_status()], m.get_model_status().active_adapters]


def _split_set_adapter(lib, tmp, method):
    m = _split(lib, method)
    after_add = _actives(m)
    m.set_adapter("other")
    return after_add, _actives(m), grads(m), output(m)


def _split_both_active(lib, tmp, method):
    m = _split(lib, method)
    m.base_model.set_adapter(["default", "other"])
    return _actives(m), grads(m), output(m)


def _split_merge(lib, tmp, method):
    m = _split(lib, method)
    m.set_adapter("other")
    quiet(m.merge_adapter)
    merged = [layer(m, "lin0").merged_adapters, layer(m, "lin1").merged_adapters]
    quiet(m.unmerge_adapter)
    return merged, output(m)


def _split_delete(lib, tmp, method):
    m = _split(lib, method)
    m.set_adapter("other")
    quiet(m.delete_adapter, "other")
    # not compared: what lin1 (which held only "other") reports afterwards, see the next test
    return m.active_adapters, layer(m, "lin0").active_adapters, grads(m), output(m)


# --------------------------------------------------------------------------------------- deleting adapters
def _delete_merged_message(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.merge_adapter)
    return raises(lambda: m.delete_adapter("default"), message=True), sorted(m.peft_config)


def _delete_inactive_merged_message(lib, tmp, method):
    m = two_adapters(lib, method)
    quiet(m.merge_adapter, ["other"])
    return raises(lambda: m.delete_adapter("other"), message=True), layer(m).merged_adapters


@pytest.mark.parametrize("method", ["fourierft", "boft"])
def test_after_delete_every_layer_reports_the_models_active_adapters(method):
    """Documented difference (docs/migrating.md): PEFT leaves a layer that held only the deleted adapter with no
    active adapter ([]), and deleting the active adapter that the first layer holds alone leaves PEFT's model with
    none at all (its get_model_status then raises KeyError); here every layer reports the model's new choice."""
    import fourierft

    m = _split(fourierft, method)
    m.set_adapter("other")
    quiet(m.delete_adapter, "other")
    assert m.active_adapters == ["default"]
    assert _actives(m) == [["default"], ["default"], [["default"], ["default"]], ["default"]]
    m = _split(fourierft, method)
    quiet(m.delete_adapter, "default")
    assert m.active_adapters == ["other"] and m.get_model_status().active_adapters == ["other"]
    assert layer(m, "lin1").active_adapters == ["other"]
    assert grads(m) == ["base_model.model.lin1.%s" % n for n in _trainable_names(method, "other")]


def _trainable_names(method, adapter):
    return [f"fourierft_spectrum.{adapter}"] if method == "fourierft" else [f"boft_R.{adapter}", f"boft_s.{adapter}"]


# ----------------------------------------------------------------- several active adapters, set per layer
def _layer_class(lib):
    """What a PEFT user's ``isinstance`` check names: ``BaseTunerLayer`` there, ``AdapterLayer`` here."""
    if lib.__name__ == "peft":
        from peft.tuners.tuners_utils import BaseTunerLayer

        return BaseTunerLayer
    return lib.AdapterLayer


def _layer_level_active(lib, tmp, method, second_targets, unload=False):
    """PEFT's ``test_multiple_active_adapters_merge_and_unmerge``: activate both adapters on every layer
    directly (not through the model), merge, unmerge, disable."""
    torch.manual_seed(0)
    model = MLP().eval()
    base = output(model)
    m = quiet(lib.get_peft_model, model, CONFIGS[method](lib), adapter_name="adapter_1")
    quiet(m.add_adapter, "adapter_2", CONFIGS[method](lib, target_modules=second_targets))
    for module in m.modules():
        if isinstance(module, _layer_class(lib)):
            module.set_adapter(["adapter_1", "adapter_2"])
    combined = output(m)
    if unload:
        return combined, output(quiet(m.merge_and_unload))
    quiet(m.merge_adapter)
    merged = output(m)
    quiet(m.unmerge_adapter)
    with m.disable_adapter():
        disabled = output(m)
    return combined, merged, disabled, base, m.active_adapters


# --------------------------------------------------------------------------------- FSDP-wrapped state dicts
def _fsdp_state_dict(lib, tmp, method, policy, **kw):
    """``get_peft_model_state_dict`` of a model wrapped in ``FullyShardedDataParallel(use_orig_params=True)``,
    loaded with ``set_peft_model_state_dict`` into an unwrapped model of the same config."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    m = build(lib, method, **kw)
    torch.manual_seed(2)
    with torch.no_grad():  # move every trainable tensor away from its initial value
        for _, p in sorted(m.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    wrap = {} if policy == "root" else {"auto_wrap_policy": _peft_wrap_policy(m)}
    wrapped = FullyShardedDataParallel(m, use_orig_params=True, device_id=torch.device("cpu"), **wrap)
    want = output(wrapped)
    tensors = lib.get_peft_model_state_dict(wrapped)
    fresh = build(lib, method, **kw)
    quiet(lib.set_peft_model_state_dict, fresh, tensors)
    return tensors, want, output(fresh)


def _peft_wrap_policy(model):
    from peft.utils.other import fsdp_auto_wrap_policy  # what PEFT users pass (it only names module classes)

    return fsdp_auto_wrap_policy(model)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo group in this process, enough for FSDP1 on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("fsdp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


_HEAD_AND_BIAS = {"target_modules": ["lin1"], "modules_to_save": ["lin0"]}
FSDP_CASES = for_both_methods([
    (f"FSDP1 state dict ({policy}{label})",
     (lambda pol, k: lambda lib, tmp, meth: _fsdp_state_dict(lib, tmp, meth, pol, **k(meth)))(policy, kw))
    for policy in ("root", "peft policy")
    for label, kw in [
        ("", lambda meth: {}),
        (", two layers", lambda meth: {"target_modules": ["lin0", "lin1"]}),
        (", bias='all'", lambda meth: {"bias": "all"}),
        (", two layers, bias='all'", lambda meth: {"target_modules": ["lin0", "lin1"], "bias": "all"}),
        (", bias='<method>_only'", lambda meth: {"bias": "fourier_only" if meth == "fourierft" else "boft_only"}),
        (", modules_to_save", lambda meth: {"modules_to_save": ["lin1"]}),
        (", modules_to_save and bias='all'", lambda meth: {**_HEAD_AND_BIAS, "bias": "all"}),
    ]
])


@pytest.mark.parametrize("case", FSDP_CASES, ids=case_id)
def test_fsdp_state_dict_as_peft(case, tmp_path, one_rank_group):
    check(case, tmp_path)


# ------------------------------------------------------------------------------------ BOFT, grouped Conv2d
class _GroupedConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, groups=2)

    def forward(self, x):
        return self.conv(x)


def _boft_grouped_conv(lib, tmp, **kw):
    torch.manual_seed(0)
    model = _GroupedConv()
    err = raises(lambda: lib.get_peft_model(model, lib.BOFTConfig(target_modules=["conv"], **kw)), message=True)
    return err, type(model.conv).__name__


#: PEFT's per-adapter layer attributes (``adapter_layer_names + other_param_names`` of its layers)
_PER_ADAPTER = {"fourierft": ("fourierft_spectrum", "fourierft_n_frequency", "fourierft_scaling",
                              "fourierft_random_loc_seed", "indices"),
                "boft": ("boft_R", "boft_s", "boft_block_size", "boft_block_num", "boft_dropout")}


def _delete_leaves_nothing(lib, tmp, method):
    """PEFT's delete-adapter check: no per-adapter attribute of a layer keeps the deleted name."""
    m = two_adapters(lib, method, target_modules=["lin0", "lin1"])
    quiet(m.delete_adapter, "other")
    own = {n: sorted(getattr(layer(m, n), a).keys()) for n in ("lin0", "lin1")
           for a in layer(m, n).adapter_layer_names + layer(m, n).other_param_names}
    assert all("other" not in keys for keys in own.values()), own
    return {f"{n}.{a}": sorted(getattr(layer(m, n), a).keys()) for n in ("lin0", "lin1") for a in _PER_ADAPTER[method]}


CASES = for_both_methods([
    ("two modules_to_save adapters active at once raises", _two_heads_active),
    ("ModulesToSaveWrapper.adapter_layer_names (walking adapter modules)", _walk_adapter_modules),
    ("ModulesToSaveWrapper.set_requires_grad/merged_adapters", _head_set_requires_grad),
    ("set_adapter: a layer lacking the adapter reports the model's", _split_set_adapter),
    ("set_adapter([a, b]) on disjoint layers", _split_both_active),
    ("merge/unmerge with a layer lacking the active adapter", _split_merge),
    ("delete_adapter with a layer lacking it", _split_delete),
    ("delete_adapter leaves no per-adapter attribute (indices, ...)", _delete_leaves_nothing),
    ("delete_adapter(merged) message", _delete_merged_message),
    ("delete_adapter(merged, inactive) message", _delete_inactive_merged_message),
    ("layer-level set_adapter([a, b]), merge, unmerge (same layer)",
        lambda lib, tmp, meth: _layer_level_active(lib, tmp, meth, ["lin0"])),
    ("layer-level set_adapter([a, b]), merge, unmerge (different layers)",
        lambda lib, tmp, meth: _layer_level_active(lib, tmp, meth, ["lin1"])),
    ("layer-level set_adapter([a, b]), merge_and_unload",
        lambda lib, tmp, meth: _layer_level_active(lib, tmp, meth, ["lin0"], unload=True)),
])
CASES += [
    Case("BOFT on a grouped Conv2d raises [boft]", lambda lib, tmp: _boft_grouped_conv(lib, tmp, boft_block_size=2)),
    Case("BOFT on a grouped Conv2d raises, block_num [boft]",
         lambda lib, tmp: _boft_grouped_conv(lib, tmp, boft_block_size=0, boft_block_num=2)),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_behaves_as_peft(case, tmp_path):
    check(case, tmp_path)
