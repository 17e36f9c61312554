#!/usr/bin/env python
"""Knowledge distillation on scikit-learn's handwritten digits with xent_triton.

A teacher MLP (64-256-256-10) is trained on the hard labels with
``xent_triton.cross_entropy``; a small student MLP (64-32-10) then learns from
the teacher's temperature-scaled probabilities (Hinton et al., 2015):

    soft = xent_triton.softmax_cross_entropy_with_logits(p_T, student_logits / T).mean() * T**2
    hard = xent_triton.cross_entropy(student_logits, y)
    loss = alpha * soft + (1 - alpha) * hard

where ``p_T = softmax(teacher_logits / T)``. The soft term is the cross entropy
H(p_T, q_T), which differs from KL(p_T || q_T) only by the teacher's entropy, a
constant: the gradients are the same. The ``T**2`` keeps the soft gradients on
the scale of the hard ones.

The data set ships inside scikit-learn (``sklearn.datasets.load_digits``,
1797 8x8 images), so nothing is downloaded. With ``--compare-torch`` the
whole run is repeated with ``torch.nn.functional.cross_entropy`` (class
indices for the hard term, class probabilities for the soft one) from the same
seeds, and the two loss curves agree to fp32 rounding.

    python examples/distill_digits.py                  # well under a minute on a CPU
    python examples/distill_digits.py --compare-torch --out curves.png

It uses CUDA when present (``--device`` overrides). Needs scikit-learn,
matplotlib and tqdm (``pip install -e .[examples]``).
"""
import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from tqdm import tqdm  # noqa: E402

import xent_triton  # noqa: E402
from xent_triton import config  # noqa: E402


# --------------------------------------------------------------------------- losses
def xent_hard(logits, y):
    return xent_triton.cross_entropy(logits, y)


def xent_soft(student_logits, teacher_probs, T):
    per_example = xent_triton.softmax_cross_entropy_with_logits(teacher_probs, student_logits / T)
    return per_example.mean() * (T * T)


def torch_hard(logits, y):
    return F.cross_entropy(logits, y)


def torch_soft(student_logits, teacher_probs, T):
    # Probability targets: the same -sum(p * log_softmax(z / T)), averaged over the batch.
    return F.cross_entropy(student_logits / T, teacher_probs) * (T * T)


LOSSES = {
    "xent_triton": (xent_hard, xent_soft),
    "torch": (torch_hard, torch_soft),
}


# --------------------------------------------------------------------------- data and models
def load_data(device, train_size=None, seed=0):
    """Standardised digits as tensors on ``device``: (X_train, y_train, X_test, y_test)."""
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    if train_size is not None and train_size < len(X_tr):
        X_tr, _, y_tr, _ = train_test_split(X_tr, y_tr, train_size=train_size, random_state=seed, stratify=y_tr)
    scaler = StandardScaler().fit(X_tr)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32, device=device)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long, device=device)  # noqa: E731
    return as_x(X_tr), as_y(y_tr), as_x(X_te), as_y(y_te)


def make_teacher():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_student():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@torch.no_grad()
def accuracy(model, X, y):
    model.eval()
    acc = (model(X).argmax(1) == y).float().mean().item()
    model.train()
    return acc


# --------------------------------------------------------------------------- training
def train(name, model, X, y, step_loss, *, epochs, batch_size, lr, seed, X_test, y_test, log_every, progress):
    """Adam on shuffled mini-batches; returns (per-epoch mean training loss, per-epoch test accuracy).

    ``step_loss(logits, index)`` gives the batch loss; the batch order comes from a
    seeded generator, so two runs with the same seed see the same batches.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    losses, accs = [], []
    bar = tqdm(range(1, epochs + 1), desc=name, unit="epoch", leave=False, disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen).to(X.device)
        total = torch.zeros((), device=X.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            loss = step_loss(model(X[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        losses.append(total.item() / n)
        accs.append(accuracy(model, X_test, y_test))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{accs[-1]:.3f}")
        if log_every and (epoch % log_every == 0 or epoch in (1, epochs)):
            tqdm.write(f"{name:>20s}  epoch {epoch:3d}/{epochs}  loss {losses[-1]:.5f}  test acc {accs[-1]:.4f}")
    bar.close()
    return losses, accs


def run(impl, data, args):
    """Teacher, then student, with the losses of ``impl`` ('xent_triton' or 'torch')."""
    hard, soft = LOSSES[impl]
    X_tr, y_tr, X_te, y_te = data
    T, alpha = args.temperature, args.alpha
    common = dict(batch_size=args.batch_size, X_test=X_te, y_test=y_te, log_every=args.log_every,
                  progress=not args.no_progress)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        teacher = make_teacher().to(X_tr.device)
    t_loss, t_acc = train(f"teacher [{impl}]", teacher, X_tr, y_tr, lambda z, idx: hard(z, y_tr[idx]),
                          epochs=args.epochs_teacher, lr=args.lr_teacher, seed=args.seed + 1, **common)

    with torch.no_grad():
        teacher.eval()
        probs_T = torch.softmax(teacher(X_tr) / T, dim=1)
        # The soft term is H(p_T, q_T) >= H(p_T): the student's loss cannot fall below this.
        floor = alpha * T * T * -(probs_T * probs_T.clamp_min(1e-30).log()).sum(1).mean().item()

    def student_loss(z, idx):
        loss = 0.0
        if alpha != 0.0:
            loss = alpha * soft(z, probs_T[idx], T)
        if alpha != 1.0:
            loss = loss + (1.0 - alpha) * hard(z, y_tr[idx])
        return loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 2)
        student = make_student().to(X_tr.device)
    s_loss, s_acc = train(f"student [{impl}]", student, X_tr, y_tr, student_loss,
                          epochs=args.epochs_student, lr=args.lr_student, seed=args.seed + 3, **common)
    return {
        "teacher": {"loss": t_loss, "test_acc": t_acc, "final_acc": accuracy(teacher, X_te, y_te)},
        "student": {"loss": s_loss, "test_acc": s_acc, "final_acc": accuracy(student, X_te, y_te),
                    "loss_floor": floor},
    }


def curve_diff(a, b):
    """(max |a - b|, max |a - b| / max |b|) over two equally long curves."""
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    return diff, diff / max(max((abs(y) for y in b), default=0.0), 1e-30)


def plot(result, path, title):
    fig, (ax_t, ax_s, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    runs = [("xent_triton", result, "-", None)]
    if result.get("torch"):
        runs.append(("F.cross_entropy", result["torch"], "--", "x"))
    for label, res, style, marker in runs:
        for who, color, ax in (("teacher", "tab:blue", ax_t), ("student", "tab:orange", ax_s)):
            epochs = range(1, len(res[who]["loss"]) + 1)
            kw = dict(color=color, linestyle=style, marker=marker, markevery=max(1, len(epochs) // 10),
                      label=f"{who} ({label})")
            ax.plot(epochs, res[who]["loss"], **kw)
            ax_acc.plot(epochs, res[who]["test_acc"], **kw)
    ax_s.axhline(result["student"]["loss_floor"], color="gray", linestyle=":",
                 label="lower bound alpha T^2 H(p_T)")
    ax_t.set(xlabel="epoch", ylabel="training loss", title="teacher: cross entropy on labels", yscale="log")
    ax_s.set(xlabel="epoch", ylabel="training loss", title="student: alpha soft + (1 - alpha) hard")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0, 1.02))
    for ax in (ax_t, ax_s, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs-teacher", type=int, default=15, help="teacher training epochs")
    p.add_argument("--epochs-student", type=int, default=30, help="student training epochs")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
    p.add_argument("--alpha", type=float, default=0.7,
                   help="weight of the soft (distillation) loss; 1 - alpha weighs the hard-label loss")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument("--lr-teacher", type=float, default=1e-3, help="teacher Adam learning rate")
    p.add_argument("--lr-student", type=float, default=5e-3, help="student Adam learning rate")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a stratified subset of this many examples (None: all 1347)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the batch order and --train-size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default); these matrices are too small to gain from more")
    p.add_argument("--out", default="distill_digits_loss.png", help="where to write the loss-curve PNG")
    p.add_argument("--compare-torch", action="store_true",
                   help="repeat the run with torch.nn.functional.cross_entropy and compare the curves")
    p.add_argument("--log-every", type=int, default=5, help="print a line every N epochs (0: only the summary)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = p.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        p.error("--alpha must lie in [0, 1]")
    if args.temperature <= 0:
        p.error("--temperature must be positive")
    return args


def main(argv=None):
    """Run the example; returns the curves and accuracies as a dict."""
    args = parse_args(argv)
    device = torch.device(args.device)
    impl = config.choose_backend(device.type, config.active)
    print(f"device {device}, xent_triton backend '{impl}', T={args.temperature}, alpha={args.alpha}", flush=True)
    t0 = time.perf_counter()

    # Seeds fix the initial weights and the batch order; the kernels used here (matmul, ReLU,
    # Adam, gathers) are deterministic for a fixed thread count, so the torch rerun sees the
    # same inputs wherever the two losses agree.
    was_threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        data = load_data(device, args.train_size, args.seed)
        print(f"digits: {data[0].shape[0]} train / {data[2].shape[0]} test examples, 64 features, 10 classes")
        result = run("xent_triton", data, args)
        result["torch"] = run("torch", data, args) if args.compare_torch else None
    finally:
        torch.set_num_threads(was_threads)

    result.update(device=str(device), backend=impl, png=os.path.abspath(args.out),
                  teacher_acc=result["teacher"]["final_acc"], student_acc=result["student"]["final_acc"],
                  max_abs_diff=None, max_rel_diff=None)
    print(f"teacher test accuracy {result['teacher_acc']:.4f}  (final loss {result['teacher']['loss'][-1]:.5f})")
    print(f"student test accuracy {result['student_acc']:.4f}  (final loss {result['student']['loss'][-1]:.5f}, "
          f"lower bound {result['student']['loss_floor']:.5f})")
    if result["torch"] is not None:
        result["max_abs_diff"], result["max_rel_diff"] = {}, {}
        for who in ("teacher", "student"):
            a, r = curve_diff(result[who]["loss"], result["torch"][who]["loss"])
            result["max_abs_diff"][who], result["max_rel_diff"][who] = a, r
            print(f"{who} loss curve, xent_triton vs F.cross_entropy: max abs diff {a:.3e} (relative {r:.3e}); "
                  f"accuracy {result[who]['final_acc']:.4f} vs {result['torch'][who]['final_acc']:.4f}")

    plot(result, args.out, f"distillation on digits: T={args.temperature}, alpha={args.alpha}, "
                           f"device {device}, backend {impl}")
    result["seconds"] = time.perf_counter() - t0
    print(f"wrote {args.out}  ({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
