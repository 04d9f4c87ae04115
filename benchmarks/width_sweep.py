"""Does FourierFT learn at every width with the default learning rates? A one-layer teacher-student sweep.

A frozen ``Linear(d, d)`` (torch's initialisation, seed fixed) gets a FourierFT adapter (PEFT's defaults:
n_frequency=1000, scaling=150, positions from seed 777; the spectrum starts at zero). The teacher is the same
layer plus a FourierFT change at the same positions whose size is 2% of the weight (Frobenius norm). The student
is trained by ``AdapterTrainer`` on Gaussian inputs, 64 tokens a step, mean squared error against the teacher's
output, AdamW and Trainer's linear schedule, for 10, 60 and 200 steps (separate runs, each with its own
schedule). Reported: the fraction of the target recovered, ``1 - ||dW_student - dW_target|| / ||dW_target||``
(1 = found, 0 = still at the start, negative = further away than at the start), for two rules:

* ``fixed``: one spectrum learning rate for every layer, 5e-2 (the paper's value; this library's default
  before the width rule);
* ``width``: ``AdapterTrainer``'s default, a learning rate per layer from its shape, n and scaling
  (:func:`fourierft.integrations.spectrum_lr.spectrum_lr`).

Run (about 10 minutes on 2 idle cores; one thread)::

    python benchmarks/width_sweep.py                # JSON to benchmarks/results/width_sweep.json
    python benchmarks/width_sweep.py --quick        # d = 384, 1024 and 10, 60 steps (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from fourierft import AdapterTrainer, FourierFTConfig, get_peft_model  # noqa: E402
from fourierft.integrations.spectrum_lr import spectrum_lr  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOKENS_PER_STEP = 64
TARGET_RELATIVE_SIZE = 0.02
FIXED_LR = 5e-2


class TeacherStudent(nn.Module):
    """``proj`` is the student's layer; the teacher's weight is a buffer. The loss is the output MSE."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d, d)
        self.register_buffer("teacher_weight", self.proj.weight.detach().clone())
        self.register_buffer("teacher_bias", self.proj.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> dict:
        with torch.no_grad():
            target = F.linear(x, self.teacher_weight, self.teacher_bias)
        return {"loss": F.mse_loss(self.proj(x), target)}


class GaussianInputs(torch.utils.data.Dataset):
    """Row ``i`` is N(0, 1) from its own generator: the same inputs for every rule, none held in memory."""

    def __init__(self, d: int, rows: int, seed: int) -> None:
        self.d, self.rows, self.seed = d, rows, seed

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.randn(self.d, generator=torch.Generator().manual_seed(self.seed * 10_000_019 + i))}


def build(d: int, seed: int):
    """``(peft_model, layer, target_delta, mean |c| of the target)``: the student with a zero spectrum and the
    teacher set up."""
    model = get_peft_model(TeacherStudent(d, seed), FourierFTConfig(target_modules=["proj"], init_weights=True))
    layer = model.base_model.model.proj
    spectrum = layer.fourierft_spectrum["default"]
    with torch.no_grad():
        spectrum.copy_(torch.randn(spectrum.shape, generator=torch.Generator().manual_seed(seed + 1)))
        delta = layer.get_delta_weight("default")
        weight = layer.get_base_layer().weight
        factor = TARGET_RELATIVE_SIZE * weight.norm() / delta.norm()
        spectrum.mul_(factor)
        needed = spectrum.abs().mean().item()
        target = layer.get_delta_weight("default").clone()
        model.base_model.model.teacher_weight.copy_(weight + target)
        spectrum.zero_()
    return model, layer, target, needed


def train(d: int, rule: str, steps: int, seed: int) -> dict:
    model, layer, target, _ = build(d, seed)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=TOKENS_PER_STEP,
                                 learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0,
                                 save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                                 seed=seed, dataloader_num_workers=0, disable_tqdm=True)
        trainer = AdapterTrainer(model=model, args=args,
                                 train_dataset=GaussianInputs(d, steps * TOKENS_PER_STEP, seed),
                                 adapter_lr=FIXED_LR if rule == "fixed" else None)
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, once per run
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        lr = trainer.optimizer.param_groups[0].get("initial_lr", trainer.optimizer.param_groups[0]["lr"])
    with torch.no_grad():
        error = (layer.get_delta_weight("default") - target).norm() / target.norm()
    return {"d": d, "rule": rule, "steps": steps, "lr": lr, "recovered": 1.0 - error.item(), "seconds": seconds}


def table(rows: list[dict], widths: list[int], steps: list[int]) -> str:
    lines = ["| d | needed mean abs(c) | fixed lr | width lr | " +
             " | ".join(f"fixed, {s} steps | width, {s} steps" for s in steps) + " |",
             "|---:|---:|---:|---:|" + "---:|---:|" * len(steps)]
    for d in widths:
        get = {(r["rule"], r["steps"]): r for r in rows if r["d"] == d}
        some = next(r for r in rows if r["d"] == d)
        cells = [f"{get[(rule, s)]['recovered']:.3f}" for s in steps for rule in ("fixed", "width")]
        lines.append(f"| {d} | {some['needed_coefficient']:.3f} | {get[('fixed', steps[0])]['lr']:.3g} | "
                     f"{get[('width', steps[0])]['lr']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[384, 1024, 2048, 4096])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 60, 200])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to others)")
    p.add_argument("--quick", action="store_true", help="d = 384, 1024 and 10, 60 steps")
    p.add_argument("--out", default=os.path.join(RESULTS, "width_sweep.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.steps = [384, 1024], [10, 60]
        args.out = args.out.replace(".json", "_quick.json")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for d in args.widths:
        model, layer, _, needed = build(d, args.seed)
        print(f"d={d}: target needs mean |c| {needed:.3f}; width rule lr {spectrum_lr(layer, 'default'):.4g}")
        for steps in args.steps:
            for rule in ("fixed", "width"):
                row = train(d, rule, steps, args.seed)
                row["needed_coefficient"] = needed
                rows.append(row)
                print(f"  {rule:5s} lr {row['lr']:.4g}, {steps:3d} steps: recovered {row['recovered']:.3f} "
                      f"({row['seconds']:.1f} s)", flush=True)
    print("\n" + table(rows, args.widths, args.steps))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"tokens_per_step": TOKENS_PER_STEP, "target_relative_size": TARGET_RELATIVE_SIZE,
            "fixed_lr": FIXED_LR, "n_frequency": 1000, "scaling": 150.0, "threads": args.threads,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "seed": args.seed}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
