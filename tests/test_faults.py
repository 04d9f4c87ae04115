"""Checkpoint faults: damaged, mismatched and foreign files, symlinks, and disks that fail during a save.

Loading: every bad folder raises a specific error naming the problem, and both entry points
(``PeftModel.from_pretrained`` on a bare model, ``load_adapter`` on an adapted one) leave the model exactly
as before. Saving: whatever fails, the folder afterwards holds the previous adapter byte for byte (or, once
every file of the new one is in place, the new one), never a mix, never a stray temporary file, and
nothing is written through a symlink. ``docs/guarantees.md`` lists the promises these tests hold.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import tempfile

import peft
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fourierft import CheckpointError, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from conftest import MLP
from test_hostile import CONFIGS, METHODS, adapted, assert_unchanged, snapshot

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------- helpers
def trained(method: str, seed: int = 0):
    """An adapted MLP (``default`` on lin0 and lin1) with distinctive adapter values."""
    torch.manual_seed(seed)
    model = get_peft_model(MLP(), CONFIGS[method](target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def base() -> MLP:
    """The base model ``trained`` adapts (same seed)."""
    torch.manual_seed(0)
    return MLP()


def files(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                out[name] = fh.read()
        else:
            out[name] = "<dir>" if os.path.isdir(path) else "<other>"
    return out


def same_adapter(left: dict[str, bytes], right: dict[str, bytes]) -> bool:
    """Equal files, except that safetensors headers are compared as JSON: safetensors writes its metadata
    map in a random order, so two saves of one adapter can differ in header bytes only."""
    def normal(folder_files):
        out = dict(folder_files)
        data = out.get(WEIGHTS)
        if isinstance(data, bytes) and len(data) >= 8:
            size = struct.unpack("<Q", data[:8])[0]
            out[WEIGHTS] = (json.loads(data[8:8 + size]), data[8 + size:])
        return out
    return normal(left) == normal(right)


def saved(tmp_path, method: str, name: str = "adapter") -> str:
    folder = str(tmp_path / name)
    trained(method).save_pretrained(folder)
    return folder


def assert_load_fails_cleanly(folder: str, method: str, error, match: str) -> None:
    """Both load entry points raise ``error`` and change nothing."""
    torch.manual_seed(1)
    base = MLP()
    before = snapshot(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, folder)
    assert_unchanged(base, before)
    assert not hasattr(base, "peft_config")
    model = adapted(method)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        model.load_adapter(folder, adapter_name="loaded")
    assert_unchanged(model, before)


def rewrite_json(folder: str, **changes) -> None:
    path = os.path.join(folder, CONFIG)
    data = json.load(open(path)) | changes
    with open(path, "w") as fh:
        json.dump(data, fh)


# ---------------------------------------------------------------------------------------------- damaged files
def _truncate(at):
    def apply(folder):
        path = os.path.join(folder, WEIGHTS)
        data = open(path, "rb").read()
        cut = int(len(data) * at) if isinstance(at, float) else (at if at >= 0 else len(data) + at)
        open(path, "wb").write(data[:cut])
    return apply


def _overwrite(offset: int, payload: bytes):
    def apply(folder):
        path = os.path.join(folder, WEIGHTS)
        data = bytearray(open(path, "rb").read())
        data[offset:offset + len(payload)] = payload
        open(path, "wb").write(bytes(data))
    return apply


def _flip(offset):
    """Flip one bit of the tensor payload (the header stays valid: only the checksum can tell)."""
    def apply(folder):
        path = os.path.join(folder, WEIGHTS)
        data = bytearray(open(path, "rb").read())
        at = 8 + struct.unpack("<Q", data[:8])[0] if offset == "payload" else offset
        data[at] ^= 0x10
        open(path, "wb").write(bytes(data))
    return apply


def _write(name: str, payload: bytes):
    def apply(folder):
        open(os.path.join(folder, name), "wb").write(payload)
    return apply


def _header_length(length: int):
    def apply(folder):
        path = os.path.join(folder, WEIGHTS)
        data = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<Q", length) + data[8:])
    return apply


DAMAGED = [
    ("empty-file", _truncate(0), CheckpointError, "Cannot read adapter weights .*adapter_model.safetensors"),
    ("cut-in-length-prefix", _truncate(4), CheckpointError, "Cannot read adapter weights"),
    ("cut-in-header", _truncate(20), CheckpointError, "Cannot read adapter weights"),
    ("cut-in-half", _truncate(0.5), CheckpointError, "Cannot read adapter weights"),
    ("last-byte-missing", _truncate(-1), CheckpointError, "Cannot read adapter weights"),
    ("header-garbage", _overwrite(8, b"\xff\xfe\x00garbage"), CheckpointError, "Cannot read adapter weights"),
    ("header-length-huge", _header_length(2**62), CheckpointError, "Cannot read adapter weights"),
    ("header-length-zero", _header_length(0), CheckpointError, "Cannot read adapter weights"),
    ("random-binary", _write(WEIGHTS, os.urandom(4096)), CheckpointError, "Cannot read adapter weights"),
    ("payload-byte-flipped", _flip(-3), CheckpointError,
     "adapter_model.safetensors is corrupted: its tensors do not match the checksum saved with them"),
    ("payload-first-byte-flipped", _flip("payload"), CheckpointError, "is corrupted"),
    ("text-file", _write(WEIGHTS, b"hello, I am not a tensor file\n" * 10), CheckpointError,
     "Cannot read adapter weights"),
    ("config-empty", _write(CONFIG, b""), ValueError, "adapter_config.json is not valid JSON"),
    ("config-truncated", _write(CONFIG, b'{"peft_type": "FOURIERFT", "n_freq'), ValueError, "is not valid JSON"),
    ("config-binary", _write(CONFIG, bytes(range(256))), ValueError, "adapter_config.json is not valid JSON"),
    ("config-list", _write(CONFIG, b'[{"peft_type": "FOURIERFT"}]'), ValueError,
     "must hold a JSON object, got list"),
    ("config-string", _write(CONFIG, b'"FOURIERFT"'), ValueError, "must hold a JSON object, got str"),
    ("config-null", _write(CONFIG, b"null"), ValueError, "must hold a JSON object, got NoneType"),
    ("config-no-peft-type", _write(CONFIG, b'{"n_frequency": 5}'), TypeError, "missing required keys"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damage,error,match", [d[1:] for d in DAMAGED], ids=[d[0] for d in DAMAGED])
def test_damaged_files_are_rejected_cleanly(method, damage, error, match, tmp_path):
    folder = saved(tmp_path, method)
    damage(folder)
    assert_load_fails_cleanly(folder, method, error, match)


# ---------------------------------------------------------------------------------------------- mismatches
def _tensors(change):
    def apply(folder):
        path = os.path.join(folder, WEIGHTS)
        save_file(change(load_file(path)), path, metadata={"format": "pt"})
    return apply


def _json(**changes):
    return lambda folder: rewrite_json(folder, **changes)


def _first_key(sd):
    return sorted(k for k in sd if k.endswith(("fourierft_spectrum", "boft_R")))[0]


MISMATCHES = [
    ("dtype-int32", _tensors(lambda sd: {k: v.to(torch.int32) for k, v in sd.items()}), None,
     "has dtype torch.int32, the model expects torch.float32"),
    ("dtype-bool", _tensors(lambda sd: {k: v.bool() for k, v in sd.items()}), None, "has dtype torch.bool"),
    ("dtype-uint8", _tensors(lambda sd: {k: v.to(torch.uint8) for k, v in sd.items()}), None, "has dtype torch.uint8"),
    ("dtype-complex", _tensors(lambda sd: {k: v.to(torch.complex64) for k, v in sd.items()}), None,
     "has dtype torch.complex64"),
    ("extra-dim", _tensors(lambda sd: {k: v[None] for k, v in sd.items()}), None, "has shape"),
    ("scalar", _tensors(lambda sd: {k: v.reshape(-1)[0] for k, v in sd.items()}), None, r"has shape \(\)"),
    ("key-missing", _tensors(lambda sd: {k: v for k, v in sd.items() if k != _first_key(sd)}), None, "missing key"),
    ("key-renamed", _tensors(lambda sd: {k.replace("lin0", "lin9"): v for k, v in sd.items()}), None,
     "unexpected key 'base_model.model.lin9"),
    ("no-tensors", _tensors(lambda sd: {}), None, "missing key"),
    ("fewer-targets-in-config", _json(target_modules=["lin0"]), None, "unexpected key 'base_model.model.lin1"),
    ("target-not-in-model", _json(target_modules=["lin7"]), ValueError, r"Target modules \{'lin7'\} not found"),
    ("other-method-type", None, None, None),  # filled per method below
    ("lora-folder", None, ValueError, "peft_type 'LORA' is not supported by fourierft"),
]
METHOD_MISMATCHES = {
    "fourierft": [
        ("n-frequency-disagrees", _json(n_frequency=5), None,
         r"'base_model.model.lin0.fourierft_spectrum' has shape \(6,\), the model expects \(5,\)"),
        ("n-frequency-pattern-disagrees", _json(n_frequency_pattern={"lin1": 3}), None,
         r"lin1.fourierft_spectrum' has shape \(6,\), the model expects \(3,\)"),
        ("seed-disagrees", _json(random_loc_seed=1), None, "fingerprint does not match"),
        ("band-disagrees", _json(frequency_band=[0.1, 0.05]), None, "fingerprint does not match"),
        ("fingerprint-tampered", _tensors(lambda sd: sd), None, None),  # rewritten below with a bad fingerprint
        ("scaling-not-finite", _write(CONFIG, b'{"peft_type": "FOURIERFT", "target_modules": ["lin0"], '
                                              b'"scaling": NaN}'), ValueError, "scaling must be a number and finite"),
    ],
    "boft": [
        ("block-size-disagrees", _json(boft_block_size=5), None,
         r"boft_R' has shape \(1, 5, 2, 2\), the model expects \(1, 2, 5, 5\)"),
        ("factor-counts-mixed", _tensors(lambda sd: {k: (torch.cat([v, v]) if "lin1" in k and k.endswith("boft_R")
                                                          else v) for k, v in sd.items()}),
         ValueError, r"mixes boft_R tensors with \[1, 2\] butterfly factors"),
        ("scale-shape", _tensors(lambda sd: {k: (v.T if k.endswith("boft_s") else v) for k, v in sd.items()}), None,
         "boft_s' has shape"),
        ("dropout-out-of-range", _json(boft_dropout=1.5), ValueError, r"boft_dropout must be in \[0, 1\)"),
    ],
}


def _mismatch_cases():
    for method in METHODS:
        for name, change, error, match in MISMATCHES + METHOD_MISMATCHES[method]:
            yield pytest.param(method, name, change, error or CheckpointError, match, id=f"{method}-{name}")


@pytest.mark.parametrize("method,name,change,error,match", list(_mismatch_cases()))
def test_mismatched_files_are_rejected_cleanly(method, name, change, error, match, tmp_path):
    folder = saved(tmp_path, method)
    if name == "other-method-type":
        other = "boft" if method == "fourierft" else "fourierft"
        folder = saved(tmp_path, other, "other")
        # a file of the other method: from_pretrained loads it (it is valid), load_adapter must refuse to mix
        model = adapted(method)
        before = snapshot(model)
        with pytest.raises(ValueError, match="Cannot combine adapters of type"):
            model.load_adapter(folder, adapter_name="loaded")
        assert_unchanged(model, before)
        return
    if name == "lora-folder":
        torch.manual_seed(0)
        peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"])).save_pretrained(folder)
    elif name == "fingerprint-tampered":
        path = os.path.join(folder, WEIGHTS)
        save_file(load_file(path), path, metadata={"format": "pt", "fourierft_derived_sha256": "0" * 64})
        match = "fingerprint does not match"
    else:
        change(folder)
    assert_load_fails_cleanly(folder, method, error, match)


@pytest.mark.parametrize("method", METHODS)
def test_files_without_checksum_still_load(method, tmp_path):
    """PEFT writes no checksum (metadata is just {"format": "pt"}): such files load as before."""
    folder = saved(tmp_path, method)
    path = os.path.join(folder, WEIGHTS)
    with safe_open(path, "pt") as fh:
        metadata = fh.metadata()
    assert len(metadata["fourierft_tensors_sha256"]) == 64
    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(base(), folder)
    for key, value in get_peft_model_state_dict(loaded).items():
        assert torch.equal(value, tensors[key])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_and_are_cast(method, dtype, tmp_path):
    """A float file of another precision loads into the model's (float32) adapter, value for value."""
    folder = saved(tmp_path, method)
    path = os.path.join(folder, WEIGHTS)
    narrowed = {k: v.to(dtype) for k, v in load_file(path).items()}
    save_file(narrowed, path, metadata={"format": "pt"})
    loaded = PeftModel.from_pretrained(MLP(), folder)
    sd = loaded.state_dict()
    for key, value in narrowed.items():
        model_key = key.replace("boft_R", "boft_R.default").replace("boft_s", "boft_s.default").replace(
            "fourierft_spectrum", "fourierft_spectrum.default")
        assert sd[model_key].dtype == torch.float32
        torch.testing.assert_close(sd[model_key], value.float(), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_values_in_a_file_warn(method, tmp_path, caplog):
    folder = saved(tmp_path, method)
    path = os.path.join(folder, WEIGHTS)
    sd = load_file(path)
    key = _first_key(sd)
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, path, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="fourierft"):
        PeftModel.from_pretrained(MLP(), folder)
    assert "NaN or Inf" in caplog.text and key.replace("base_model.model.", "") in caplog.text


# ---------------------------------------------------------------------------------------------- foreign folders
FOREIGN = [
    ("empty-folder", lambda f: None, FileNotFoundError, "No adapter_config.json in"),
    ("full-model-only", lambda f: save_file(MLP().state_dict(), os.path.join(f, "model.safetensors")),
     FileNotFoundError, "No adapter_config.json in"),
    ("config-is-a-folder", lambda f: os.mkdir(os.path.join(f, CONFIG)), FileNotFoundError, "No adapter_config.json"),
    ("config-without-weights", "config-only", FileNotFoundError, "No adapter_model.safetensors or adapter_model.bin"),
    ("weights-is-a-folder", "weights-dir", FileNotFoundError, "No adapter_model.safetensors or adapter_model.bin"),
    ("full-model-as-adapter", "full-as-adapter", CheckpointError,
     "unexpected key 'base_model.model.lin0.weight'.*missing key"),
    ("bin-list", "bin-list", CheckpointError, "adapter_model.bin holds a list, not a dict of tensors"),
    ("bin-non-tensors", "bin-ints", CheckpointError, "is not a tensor \\(int\\)"),
    ("bin-garbage", "bin-garbage", CheckpointError, "Cannot read adapter weights .*adapter_model.bin"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make,error,match", [f[1:] for f in FOREIGN], ids=[f[0] for f in FOREIGN])
def test_foreign_folders_are_rejected_cleanly(method, make, error, match, tmp_path):
    folder = str(tmp_path / "foreign")
    os.makedirs(folder)
    if callable(make):
        make(folder)
    else:
        trained(method).save_pretrained(folder)
        weights = os.path.join(folder, WEIGHTS)
        keys = list(load_file(weights))
        os.remove(weights)
        if make == "weights-dir":
            os.mkdir(weights)
        elif make == "full-as-adapter":
            save_file(MLP().state_dict(), weights)
        elif make == "bin-list":
            torch.save([1, 2], os.path.join(folder, "adapter_model.bin"))
        elif make == "bin-ints":
            torch.save({k: 1 for k in keys}, os.path.join(folder, "adapter_model.bin"))
        elif make == "bin-garbage":
            open(os.path.join(folder, "adapter_model.bin"), "wb").write(os.urandom(512))
    assert_load_fails_cleanly(folder, method, error, match)


# ---------------------------------------------------------------------------------------------- symlinks
@pytest.mark.parametrize("method", METHODS)
def test_symlinked_adapter_files_are_followed_for_reading(method, tmp_path):
    real = saved(tmp_path, method, "real")
    links = tmp_path / "links"
    links.mkdir()
    for name in os.listdir(real):
        os.symlink(os.path.join(real, name), links / name)
    x = torch.randn(5, 10)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base(), real)(x)
        torch.testing.assert_close(PeftModel.from_pretrained(base(), str(links))(x), expected, rtol=0, atol=0)
    linked_dir = tmp_path / "linked-dir"
    os.symlink(real, linked_dir)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base(), str(linked_dir))(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_never_writes_through_a_symlink(method, tmp_path):
    """Each file symlink (weights, config, README) is replaced by a regular file; its target stays as it was."""
    elsewhere = saved(tmp_path, method, "elsewhere")
    with open(os.path.join(elsewhere, "README.md"), "w") as fh:
        fh.write("my own notes, not a model card\n")
    untouched = files(elsewhere)
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in os.listdir(elsewhere):
        os.symlink(os.path.join(elsewhere, name), folder / name)
    model = trained(method, seed=7)
    model.save_pretrained(str(folder))
    assert files(elsewhere) == untouched
    for name in (WEIGHTS, CONFIG, "README.md"):
        assert not os.path.islink(folder / name) and os.path.isfile(folder / name)
    assert "my own notes" in open(folder / "README.md").read()  # the card keeps the body it read via the link
    fresh = str(tmp_path / "fresh")
    model.save_pretrained(fresh)
    without_card = [{k: v for k, v in files(f).items() if k != "README.md"} for f in (str(folder), fresh)]
    assert same_adapter(*without_card)


@pytest.mark.parametrize("method", METHODS)
def test_dangling_symlink_in_place_of_weights(method, tmp_path):
    folder = saved(tmp_path, method)
    os.remove(os.path.join(folder, WEIGHTS))
    os.symlink(str(tmp_path / "gone.safetensors"), os.path.join(folder, WEIGHTS))
    assert_load_fails_cleanly(folder, method, FileNotFoundError, "No adapter_model.safetensors")
    trained(method).save_pretrained(folder)
    assert not os.path.islink(os.path.join(folder, WEIGHTS)) and not os.path.lexists(tmp_path / "gone.safetensors")


# ---------------------------------------------------------------------------------------------- failing disks
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _eacces(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def _fail_on(real, predicate, exc):
    def wrapper(*args, **kwargs):
        if predicate(*args):
            exc()
        return real(*args, **kwargs)
    return wrapper


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt("power cut")


def _half_written(real):
    """safetensors writes half the file, then the disk is full."""
    def wrapper(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        _enospc()
    return wrapper


def _new_config(src, dst):
    return dst.endswith(CONFIG) and ".previous-" not in src  # not the roll-back of an earlier move


SAVE_FAULTS = [
    # (id, owner, attribute to patch, factory(real) -> replacement, error; None: the save must succeed)
    ("replace-weights-enospc", os, "replace",
     lambda real: _fail_on(real, lambda src, dst: dst.endswith(WEIGHTS), _enospc), OSError),
    ("replace-config-enospc", os, "replace", lambda real: _fail_on(real, _new_config, _enospc), OSError),
    ("replace-config-eacces", os, "replace", lambda real: _fail_on(real, _new_config, _eacces), PermissionError),
    ("replace-config-interrupt", os, "replace", lambda real: _fail_on(real, _new_config, _interrupt),
     KeyboardInterrupt),
    ("tmpdir-read-only", tempfile, "mkdtemp", lambda real: _eacces, PermissionError),
    ("weights-half-written", safetensors.torch, "save_file", _half_written, OSError),
    ("bin-write-enospc", torch, "save", lambda real: _enospc, OSError),
    ("config-write-enospc", PeftConfig, "save_pretrained", lambda real: _enospc, OSError),
    ("hard-links-unsupported", os, "link", lambda real: _eacces, None),  # falls back to a copy
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("owner,attr,factory,error", [f[1:] for f in SAVE_FAULTS], ids=[f[0] for f in SAVE_FAULTS])
def test_failing_save_keeps_the_previous_adapter(method, owner, attr, factory, error, tmp_path, monkeypatch):
    folder = saved(tmp_path, method)
    previous = files(folder)
    model = trained(method, seed=7)  # different values, same layout
    model.save_pretrained(str(tmp_path / "reference"))
    new = files(str(tmp_path / "reference"))
    assert new[WEIGHTS] != previous[WEIGHTS]
    safe = owner is not torch
    if not safe:  # the previous adapter is a .bin too (which replaces the .safetensors)
        trained(method).save_pretrained(folder, safe_serialization=False)
        previous = files(folder)
        model.save_pretrained(str(tmp_path / "reference"), safe_serialization=False)
        new = files(str(tmp_path / "reference"))
        assert WEIGHTS not in previous and WEIGHTS not in new
    monkeypatch.setattr(owner, attr, factory(getattr(owner, attr)))
    if error is None:
        model.save_pretrained(folder)
        monkeypatch.undo()
        assert same_adapter(files(folder), new)
        return
    with pytest.raises(error):
        model.save_pretrained(folder, safe_serialization=safe)
    monkeypatch.undo()
    assert files(folder) == previous, "the previous adapter was damaged"
    loaded = PeftModel.from_pretrained(MLP(), folder)  # and it still loads
    assert loaded is not None
    model.save_pretrained(folder, safe_serialization=safe)  # once the disk is back, the next save goes through
    assert same_adapter(files(folder), new)


@pytest.mark.parametrize("method", METHODS)
def test_failing_model_card_leaves_a_complete_adapter(method, tmp_path, monkeypatch):
    """The card is written last: if it fails, the adapter files are the complete new adapter, README the old."""
    folder = saved(tmp_path, method)
    previous = files(folder)
    model = trained(method, seed=7)
    model.save_pretrained(str(tmp_path / "reference"))
    new = files(str(tmp_path / "reference"))
    real = os.replace
    monkeypatch.setattr(os, "replace", _fail_on(real, lambda src, dst: dst.endswith("README.md"), _enospc))
    with pytest.raises(OSError):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert same_adapter(files(folder), {**new, "README.md": previous["README.md"]})


@pytest.mark.parametrize("method", METHODS)
def test_multi_adapter_save_failing_midway_keeps_each_folder_whole(method, tmp_path, monkeypatch):
    """Each adapter folder is replaced as a unit: the one written before the fault is new, the other previous."""
    model = trained(method)
    model.add_adapter("second", CONFIGS[method](target_modules=["lin1"]))
    folder = str(tmp_path / "multi")
    model.save_pretrained(folder)
    previous_root, previous_second = files(folder), files(os.path.join(folder, "second"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".default", ".second")):
                p.add_(1.0)
    real = os.replace
    monkeypatch.setattr(os, "replace", _fail_on(
        real, lambda src, dst: os.sep + "second" + os.sep in dst and ".previous-" not in src, _enospc))
    with pytest.raises(OSError):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert files(os.path.join(folder, "second")) == previous_second
    root = files(folder)
    assert root[WEIGHTS] != previous_root[WEIGHTS] and root[CONFIG] == previous_root[CONFIG]
    PeftModel.from_pretrained(MLP(), folder)
    PeftModel.from_pretrained(MLP(), folder, subfolder="second", adapter_name="second")


@pytest.mark.parametrize("method", METHODS)
def test_no_temporary_files_are_left_behind(method, tmp_path, monkeypatch):
    folder = saved(tmp_path, method)
    monkeypatch.setattr("safetensors.torch.save_file", _enospc)
    with pytest.raises(OSError):
        trained(method, seed=3).save_pretrained(folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == ["README.md", CONFIG, WEIGHTS]
    trained(method, seed=3).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["README.md", CONFIG, WEIGHTS]
