"""Which of the package's own host functions a repeat call runs: the length of the route a reader follows.

    python -m perf.host_functions        # CPU, Triton interpreter; prints the functions and their modules

A warm call (the same signature called before) is traced with ``sys.setprofile`` under the Triton
interpreter, on the Triton backend; functions of ``xent_triton.kernels`` (the device code the
interpreter runs) are left out. Issue 22's goal: a training step (forward and backward of the mean
loss) runs at most 16 functions in at most 5 modules.
"""
import argparse
import os
import sys


def traced(fn):
    """{module: sorted function names} of the package's Python functions that ``fn()`` calls."""
    seen = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if module.startswith("xent_triton") and not module.startswith("xent_triton.kernels"):
            seen.setdefault(module, set()).add(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {m: sorted(f) for m, f in sorted(seen.items())}


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import xent_triton

    xent_triton.set_backend("triton")
    x = torch.randn(8, 100, requires_grad=True)
    cases = {"class indices": torch.randint(0, 100, (8,)), "probabilities": torch.softmax(torch.randn(8, 100), -1)}
    worst = 0
    for name, target in cases.items():
        def step():
            x.grad = None
            xent_triton.cross_entropy(x, target).backward()

        def forward():
            with torch.no_grad():
                xent_triton.cross_entropy(x, target)

        for pass_name, fn in (("step", step), ("forward", forward)):
            fn()
            fn()
            funcs = traced(fn)
            count = sum(len(f) for f in funcs.values())
            worst = max(worst, count) if pass_name == "step" else worst
            print(f"{name}, {pass_name}: {count} functions in {len(funcs)} modules")
            for module, names in funcs.items():
                print(f"  {module}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
