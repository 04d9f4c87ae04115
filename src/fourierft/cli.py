"""``fourierft``: the command line for finished adapter folders (local, offline).

::

    fourierft inspect ADAPTER_DIR [--json]
    fourierft merge ADAPTER_DIR OUT_DIR [--base PATH] [--safe-merge]
    fourierft to-lora ADAPTER_DIR OUT_DIR --rank R [--base PATH] [--svd auto|exact|randomized] [--min-energy F]

``merge`` folds the adapter into its base model and saves a plain transformers model (with the base's
tokenizer files), which any serving stack loads. ``to-lora`` writes a PEFT LoRA adapter
(:func:`fourierft.save_as_lora`). ``inspect`` prints the method, targets, sizes and the PEFT version that wrote
the folder, from the files alone. The base model is ``--base`` or the adapter's ``base_model_name_or_path``,
and must be a local folder: nothing is downloaded. A bad folder gets one line naming the problem and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Optional

from .lora_conversion import save_as_lora
from .peft_model import PeftModel

logger = logging.getLogger("fourierft.cli")

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
CONVERTIBLE = ("FOURIERFT", "BOFT")
#: Method tensors by the prefix of their last key part (everything else is a modules_to_save copy or a bias).
PREFIXES = ("fourierft_", "boft_", "lora_")
SETTINGS = {
    "FOURIERFT": ("n_frequency", "scaling", "random_loc_seed", "n_frequency_pattern", "frequency_band", "init_weights"),
    "BOFT": ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "init_weights"),
    "LORA": ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora"),
}
TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "sentencepiece.bpe.model")


class CLIError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


# ------------------------------------------------------------------ reading a folder
def read_config(folder: str) -> dict:
    """The folder's ``adapter_config.json`` as a dict, or a :class:`CLIError` saying what is wrong."""
    if not os.path.isdir(folder):
        raise CLIError(f"{folder} is not a folder")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CLIError(f"no {CONFIG_NAME} in {folder}: not an adapter folder")
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise CLIError(f"{path} names no peft_type: not an adapter config")
    return config


def weights_path(folder: str) -> str:
    for name in WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise CLIError(f"no {' or '.join(WEIGHT_NAMES)} in {folder}: the adapter's weights are missing")


def tensor_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """``key -> (shape, dtype)`` of a weights file (safetensors: from the header, no tensor is read)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as fh:
                return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in data.items()}
    except Exception as err:  # safetensors and pickle raise many types: name the file
        raise CLIError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def _writer(version: Optional[str]) -> str:
    if not version:
        return "unknown (no peft_version: PEFT 0.20 or older)"
    if "+fourierft." in version:
        peft_format, ours = version.split("+fourierft.", 1)
        return f"{version} (fourierft {ours}, PEFT {peft_format} file format)"
    return f"{version} (PEFT)"


def describe(folder: str) -> dict:
    """What ``inspect`` prints, as a dict."""
    config = read_config(folder)
    path = weights_path(folder)
    shapes = tensor_shapes(path)
    split = {k: _method_part(k) for k in shapes}
    method_keys = [k for k, part in split.items() if part is not None]
    layers = sorted({k[: len(k) - len(split[k]) - 1] for k in method_keys})
    groups: dict[str, int] = {}
    for key in method_keys:
        label = f"{split[key]} {shapes[key][0]}"
        groups[label] = groups.get(label, 0) + 1
    numel = {k: _numel(shape) for k, (shape, _) in shapes.items()}
    peft_type = config["peft_type"]
    return {
        "folder": folder, "method": peft_type, "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"), "written_by": _writer(config.get("peft_version")),
        "target_modules": config.get("target_modules"), "modules_to_save": config.get("modules_to_save"),
        "settings": {k: config.get(k) for k in SETTINGS.get(peft_type, ())},
        "weights_file": os.path.basename(path), "file_bytes": os.path.getsize(path),
        "tensors": len(shapes), "adapted_layers": len(layers),
        "adapter_parameters": sum(numel[k] for k in method_keys),
        "other_parameters": sum(n for k, n in numel.items() if k not in method_keys),
        "dtypes": sorted({dtype for _, dtype in shapes.values()}),
        "tensor_groups": groups, "layers": layers,
    }


def _method_part(key: str) -> Optional[str]:
    """The tail of ``key`` from its method tensor name on (``lora_A.weight``, ``boft_R``), or ``None``."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith(PREFIXES):
            return ".".join(parts[i:])
    return None


def _numel(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def format_description(info: dict) -> str:
    lines = [f"{info['folder']}: {info['method']} adapter", f"  written by          {info['written_by']}"]
    for label, key in (("task type", "task_type"), ("base model", "base_model"), ("targets", "target_modules"),
                       ("modules to save", "modules_to_save")):
        lines.append(f"  {label:<19} {info[key]}")
    for key, value in info["settings"].items():
        lines.append(f"  {key:<19} {value}")
    lines.append(f"  weights             {info['weights_file']}, {info['file_bytes']:,d} bytes, {info['tensors']} tensors "
                 f"({', '.join(info['dtypes'])})")
    lines.append(f"  adapted layers      {info['adapted_layers']}; adapter parameters {info['adapter_parameters']:,d}, "
                 f"other saved parameters {info['other_parameters']:,d}")
    for label, count in sorted(info["tensor_groups"].items()):
        lines.append(f"    {count:>4} x {label}")
    return "\n".join(lines)


# ------------------------------------------------------------------ loading base + adapter
def _base_folder(config: dict, base: Optional[str]) -> str:
    name = base or config.get("base_model_name_or_path")
    if not name:
        raise CLIError("the adapter does not name its base model: pass --base PATH")
    if not os.path.isdir(name) or not os.path.isfile(os.path.join(name, "config.json")):
        raise CLIError(f"base model {name!r} not found: it must be a local transformers model folder (with "
                       "config.json); pass --base PATH (this command never downloads)")
    return name


def _auto_class(config: dict, base_dir: str):
    """The transformers class for the base: by task type, else the class recorded when saving, else the
    base folder's own architecture, else ``AutoModel``. Only transformers' own classes are used."""
    import transformers

    name = TASK_AUTO_CLASSES.get(config.get("task_type") or "")
    candidates = [name] if name else []
    candidates.append((config.get("auto_mapping") or {}).get("base_model_class"))
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as fh:
        candidates += (json.load(fh).get("architectures") or [])[:1]
    for candidate in candidates:
        if candidate and isinstance(getattr(transformers, candidate, None), type):
            return getattr(transformers, candidate)
    return transformers.AutoModel


def _num_labels(config: dict, shapes: dict) -> dict:
    """``num_labels`` for a classification head saved in the adapter (its output rows), if any."""
    if config.get("task_type") not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    heads = [shape[0] for k, (shape, _) in shapes.items() if k.endswith(("classifier.weight", "score.weight",
                                                                          "classifier.out_proj.weight"))]
    return {"num_labels": heads[0]} if heads else {}


def load_adapter_model(folder: str, base: Optional[str]):
    """``(config dict, base folder, PeftModel)`` for a FourierFT or BOFT folder, all problems as CLIError."""
    config = read_config(folder)
    if config["peft_type"] not in CONVERTIBLE:
        raise CLIError(f"{folder} holds a {config['peft_type']} adapter; this command handles "
                       f"{' and '.join(CONVERTIBLE)} adapters")
    shapes = tensor_shapes(weights_path(folder))
    base_dir = _base_folder(config, base)
    cls = _auto_class(config, base_dir)
    logger.info("Loading the base model %s from %s", cls.__name__, base_dir)
    try:
        model = cls.from_pretrained(base_dir, **_num_labels(config, shapes))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the base model from {base_dir}: {err}") from err
    logger.info("Loading the adapter from %s", folder)
    try:
        return config, base_dir, PeftModel.from_pretrained(model, folder)
    except (ValueError, KeyError, RuntimeError) as err:  # CheckpointError is a ValueError
        raise CLIError(f"the adapter in {folder} does not fit the base model {base_dir}: {err}") from err


def _check_out(out: str, folder: str) -> None:
    if os.path.isfile(out):
        raise CLIError(f"{out} is a file; OUT_DIR must be a folder")
    if os.path.abspath(out) == os.path.abspath(folder):
        raise CLIError("OUT_DIR must differ from ADAPTER_DIR")


# ------------------------------------------------------------------ commands
def cmd_inspect(args) -> None:
    info = describe(args.adapter_dir)
    print(json.dumps(info, indent=2) if args.json else format_description(info))


def cmd_merge(args) -> None:
    _check_out(args.out_dir, args.adapter_dir)
    _, base_dir, model = load_adapter_model(args.adapter_dir, args.base)
    logger.info("Merging")
    try:
        merged = model.merge_and_unload(progressbar=True, safe_merge=args.safe_merge)
    except ValueError as err:
        raise CLIError(f"merge refused: {err}") from err
    logger.info("Saving the merged model to %s", args.out_dir)
    merged.save_pretrained(args.out_dir)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(base_dir, n))]
    for name in copied:
        shutil.copy2(os.path.join(base_dir, name), os.path.join(args.out_dir, name))
    print(f"merged {args.adapter_dir} into {base_dir}; saved a {type(merged).__name__} to {args.out_dir}"
          + (f" (with {len(copied)} tokenizer files)" if copied else ""))


def _rank(text: str):
    try:
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int rank or a float energy threshold, got {text!r}") from None


def cmd_to_lora(args) -> None:
    _check_out(args.out_dir, args.adapter_dir)
    _, _, model = load_adapter_model(args.adapter_dir, args.base)
    try:
        report = save_as_lora(args.out_dir, model, args.rank, progressbar=True, svd=args.svd,
                                        min_energy=args.min_energy)
    except (ValueError, TypeError) as err:
        raise CLIError(f"conversion refused: {err}") from err
    kept = [row.energy_kept for row in report]
    worst = min(report, key=lambda row: row.energy_kept)
    print(f"wrote a LoRA adapter of {len(report)} layers to {args.out_dir}: energy kept mean {sum(kept) / len(kept):.1%}, "
          f"lowest {worst.energy_kept:.1%} ({worst.name}, relative error {worst.relative_error:.3f})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fourierft", description="Work with finished FourierFT and BOFT adapter folders.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="print what an adapter folder holds", parents=[common])
    s.add_argument("adapter_dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)
    for name, func, help_text in (("merge", cmd_merge, "merge into the base model, save a transformers model"),
                                  ("to-lora", cmd_to_lora, "convert to a PEFT LoRA adapter")):
        s = sub.add_parser(name, help=help_text, parents=[common])
        s.add_argument("adapter_dir")
        s.add_argument("out_dir")
        s.add_argument("--base", help="local base model folder (default: the adapter's base_model_name_or_path)")
        s.set_defaults(func=func)
        if name == "merge":
            s.add_argument("--safe-merge", action="store_true", help="check the merged weights are finite first")
        else:
            s.add_argument("--rank", type=_rank, required=True, help="int rank, or a float energy threshold in (0, 1]")
            s.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto")
            s.add_argument("--min-energy", type=float, default=0.5, help="warn below this fraction of energy kept")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except CLIError as err:
        print(f"fourierft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
