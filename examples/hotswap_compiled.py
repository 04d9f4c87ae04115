"""Hot-swap FourierFT and BOFT adapters into a torch.compile'd model and count the compilations.

For each method: build a small model with an adapter, pad it with ``prepare_model_for_hotswap`` so that
smaller adapters fit, compile it, then swap in adapters of several geometries (same, fewer frequencies or
factors, another scaling, a subset of the targets) with ``hotswap_adapter``; after each swap the compiled
output is compared with a freshly loaded eager model. Dynamo's frame count and graph-break count are printed
before and after. ``--reload`` does the same with ``load_adapter`` under the existing name instead, the path
that recompiled before hot-swapping existed.

    python examples/hotswap_compiled.py [--backend aot_eager|inductor] [--reload] [--no-fullgraph]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from fourierft import BOFTConfig, FourierFTConfig, PeftModel, get_peft_model, prepare_model_for_hotswap

VARIANTS = {
    "fourierft": ([{}, {"scaling": 20.0}, {"n_frequency": 8}, {"target_modules": ["b"]}, {"n_frequency": 40}],
                  {"target_n_frequency": 40}),
    "boft": ([{}, {"boft_n_butterfly_factor": 1}, {"target_modules": ["a"]}, {"boft_n_butterfly_factor": 3}],
             {"target_n_butterfly_factor": 3}),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def config(method: str, **kw):
    if method == "fourierft":
        return FourierFTConfig(**{"target_modules": ["a", "b"], "n_frequency": 24, "init_weights": False, **kw})
    return BOFTConfig(**{"target_modules": ["a", "b"], "boft_block_size": 4, "boft_n_butterfly_factor": 2,
                         "init_weights": False, **kw})


def adapter(base: nn.Module, method: str, seed: int, **kw) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), config(method, **kw)).eval()


def run(method: str, backend: str, reload: bool, fullgraph: bool) -> None:
    torch.manual_seed(0)
    base, x = Net(), torch.randn(4, 16)
    variants, prepare = VARIANTS[method]
    if reload:  # load_adapter under the same name needs the same config: same-geometry adapters only
        variants, prepare = [{}, {}, {}], {}
    model = adapter(base, method, 1)
    if prepare:
        prepare_model_for_hotswap(model, **prepare)
    counter = CompileCounterWithBackend(backend)
    counters.clear()
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph)
    with torch.no_grad():
        for _ in range(3):  # settled: later calls of an unchanged model must not compile again
            compiled(x)
    before = counter.frame_count, sum(counters["graph_break"].values())
    worst = 0.0
    for i, kw in enumerate(variants):
        folder = tempfile.mkdtemp()
        adapter(base, method, 10 + i, **kw).save_pretrained(folder)
        if reload:
            model.load_adapter(folder, "default")
        else:
            compiled.hotswap_adapter(folder, "default")
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        with torch.no_grad():
            worst = max(worst, float((compiled(x) - reference(x)).abs().max()))
    after = counter.frame_count, sum(counters["graph_break"].values())
    how = "load_adapter (same name)" if reload else "hotswap_adapter"
    print(f"{method:9s} {how:24s} {len(variants)} swaps: compiled frames {before[0]} -> {after[0]}, graph breaks "
          f"{before[1]} -> {after[1]}, max |compiled - fresh eager| = {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--reload", action="store_true", help="use load_adapter under the same name instead")
    parser.add_argument("--no-fullgraph", dest="fullgraph", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for method in VARIANTS:
        run(method, args.backend, args.reload, args.fullgraph)


if __name__ == "__main__":
    main()
