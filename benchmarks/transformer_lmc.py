"""Linear mode connectivity of transformers modulo their full symmetry group (issue 15).

Run from the repository root (needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``)::

    nohup python benchmarks/transformer_lmc.py [--threads 1] > transformer_lmc.log 2>&1 &

Two model families, each trained from seeds 0 and 1 and cached in ``benchmarks/_cache`` (git-ignored;
later runs load them):

* a GPT-2-style byte-level language model (Hugging Face ``GPT2LMHeadModel``, untied LM head, no
  dropout), trained on the Python standard library's own ``*.py`` files (every 10th file, in sorted
  order, is held out as the test text);
* a small ViT (Hugging Face ``ViTForImageClassification``, 7×7 patches, no dropout) on Fashion-MNIST.

For each family it prints the test-loss barrier and the midpoint's excess loss (loss at α = ½ minus
the endpoints' mean) of ``(1-α)·A + α·B`` for: naive averaging; permutation weight / activation
matching (``symmetries="permutation"``); the generalised alignment (``symmetries="all"``: the
tracer's classes), from weights and from activations; each with
REPAIR at every α (``permerge.repair_transform``). Barriers come from ``permerge.interpolation_curve``
(the "line" definition: the worst excess over the straight line between the endpoints' losses);
nothing is re-implemented. The table goes to stdout and, with the command, to
``benchmarks/results/transformer_lmc.md``.

The classes come from the tracer (``permerge.graph.classes``): the residual stream, whose norm gains
all fold into linear layers, is orthogonal; per-head query·key and value·output groups are
invertible; the rest (heads, GELU MLP units) stay permutations.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import datetime
import logging
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # permerge, common.py

from common import cached_model, load_fashion_mnist, num_params, num_threads, save_results, train  # noqa: E402

import permerge  # noqa: E402
from permerge.errors import IllConditionedError  # noqa: E402
from permerge.repair import repair_transform  # noqa: E402

LOG = logging.getLogger("benchmarks.transformer_lmc")

VOCAB, CONTEXT = 256, 128


class Logits(nn.Module):
    """A Hugging Face model returning its ``logits`` tensor, so losses and metrics see a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def gpt2(width: int, layers: int, heads: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=width, n_layer=layers, n_head=heads, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    return Logits(GPT2LMHeadModel(config))


def vit(width: int, layers: int, heads: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=2 * width, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )  # fmt: skip
    return Logits(ViTForImageClassification(config))


# -- data -------------------------------------------------------------------------------------


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's ``*.py`` files as bytes: (train, test), every 10th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < 20:
        raise FileNotFoundError(f"expected the standard library's sources in {files[0].parent if files else '?'}")
    train_b = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10)
    test_b = b"".join(f.read_bytes() for i, f in enumerate(files) if not i % 10)
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train_b), as_tensor(test_b)


def windows(text: torch.Tensor, count: int, batch: int, *, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` non-overlapping windows of ``CONTEXT`` bytes, in batches of ``(tokens, tokens)``
    (``permerge.evaluate``'s causal-LM metrics shift the targets themselves)."""
    rows = torch.stack([text[start + i * CONTEXT : start + (i + 1) * CONTEXT] for i in range(count)])
    return [(rows[i : i + batch], rows[i : i + batch]) for i in range(0, count, batch)]


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of training pairs ``(x[:-1], x[1:])``."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def window_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of a ``windows`` batch ``(tokens, tokens)``: predictions shifted."""
    return lm_loss(out[:, :-1], y[:, 1:])


def train_lm(model: nn.Module, text: torch.Tensor, seed: int, *, steps: int, batch: int, lr: float,
             threads: int) -> nn.Module:  # fmt: skip
    """AdamW on random windows of ``text`` (order from ``seed``), linear warm-up then cosine decay."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    with num_threads(threads):
        for step in range(steps):
            idx = torch.randint(0, len(text) - CONTEXT - 1, (batch,), generator=gen)
            rows = torch.stack([text[i : i + CONTEXT + 1] for i in idx.tolist()])
            loss = lm_loss(model(rows[:, :-1]), rows[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                LOG.info("lm seed %d step %d/%d loss %.3f", seed, step, steps, loss.item())
    return model.eval()


# -- the two families -------------------------------------------------------------------------


def load_gpt2(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    text, test_text = stdlib_bytes()
    w, layers, heads = args.gpt_width, args.gpt_layers, 4
    key = {"w": w, "l": layers, "h": heads, "steps": args.gpt_steps, "bs": 32, "lr": 2e-3, "ctx": CONTEXT}

    def fit(model: nn.Module, seed: int) -> nn.Module:
        return train_lm(model, text, seed, steps=args.gpt_steps, batch=32, lr=2e-3, threads=args.threads)

    a, b = (cached_model("lmc-gpt2", lambda: gpt2(w, layers, heads), s, fit, key=key) for s in (0, 1))
    data = {
        "test": windows(test_text, args.gpt_test_windows, 32),
        "stats": windows(text, 16 * args.stats_batches, 16, start=len(text) // 2),
        "example": (torch.zeros(2, CONTEXT, dtype=torch.long),),
        "metrics": "causal-lm",
        "refine": windows(text, 16 * args.refine_batches, 16),
        "loss_fn": window_loss,
    }
    return a, b, data


def load_vit(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    w, layers, heads = args.vit_width, args.vit_layers, 4
    key = {"w": w, "l": layers, "h": heads, "epochs": args.vit_epochs, "recipe": "adam", "bs": 128}

    def fit(model: nn.Module, seed: int) -> nn.Module:
        return train(model, x, y, recipe="adam", seed=seed, epochs=args.vit_epochs, threads=args.threads, quiet=True)

    a, b = (cached_model("lmc-vit", lambda: vit(w, layers, heads), s, fit, key=key) for s in (0, 1))
    data = {
        "test": [(xt[i : i + 500], yt[i : i + 500]) for i in range(0, args.vit_test_size, 500)],
        "stats": [(x[i : i + 100], y[i : i + 100]) for i in range(len(x) - 100 * args.stats_batches, len(x), 100)],
        "example": (x[:2],),
        "metrics": "classification",
        "refine": [(x[i : i + 100], y[i : i + 100]) for i in range(0, 100 * args.refine_batches, 100)],
        "loss_fn": F.cross_entropy,
    }
    return a, b, data


FAMILIES: dict[str, tuple[str, Callable[[argparse.Namespace], tuple[nn.Module, nn.Module, dict[str, Any]]]]] = {
    "gpt2": ("GPT-2-style byte LM", load_gpt2),
    "vit": ("ViT on Fashion-MNIST", load_vit),
}


METHODS = (
    ("naive", None, None, False),
    ("weight matching, permutations", "weight", "permutation", False),
    ("activation matching, permutations", "activation", "permutation", False),
    ("weight matching, orthogonal (streams and heads)", "weight", {"orthogonal"}, False),
    ("activation matching, orthogonal (streams and heads)", "activation", {"orthogonal"}, False),
    ("weight matching, all (orthogonal streams, invertible heads)", "weight", "all", False),
    ("activation matching, all (orthogonal streams, invertible heads)", "activation", "all", False),
    ("activation matching, orthogonal, + learned refinement", "activation", {"orthogonal"}, True),
    ("activation matching, all, + learned refinement", "activation", "all", True),
)
"""Rows: ``(label, align method, symmetries, refine)``; beyond permutations, each group gets the richest
class both traced and asked for (heads and GELU units stay permutations throughout). ``refine``:
the dense maps are then refined by gradient steps on the midpoint loss (``permerge.align(...,
refine=...)``, :mod:`permerge.match.refine`) on training batches disjoint from the test set."""


def measure(a: nn.Module, b: nn.Module, data: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per method: the aligned B, its curve with and without REPAIR, and timings."""
    spec = permerge.trace(a, data["example"])
    rows = []
    for label, method, symmetries, refine in METHODS:
        t0 = time.perf_counter()
        if method is None:
            aligned, report = b, {}
        else:
            options = {"refine": {"steps": args.refine_steps, "lr": args.refine_lr, "loss_fn": data["loss_fn"],
                                  "data": data["refine"]}} if refine else {}  # fmt: skip
            try:
                res = permerge.align(a, b, data["example"], method, spec=spec, symmetries=symmetries,
                                     data=data["stats"] if method == "activation" else None, quiet=True, **options)  # fmt: skip
            except IllConditionedError as e:  # reported in the table, not hidden
                LOG.warning("%s: %s", label, e)
                rows.append({"label": label, "refused": str(e).split(":")[0]})
                continue
            aligned, report = res.model, res.report
        seconds = time.perf_counter() - t0
        curve = permerge.interpolation_curve(a, aligned, data["test"], metrics=data["metrics"], alphas=args.alphas)
        fix = repair_transform(a, aligned, data["stats"], batches=args.stats_batches)
        repaired = permerge.interpolation_curve(a, aligned, data["test"], metrics=data["metrics"], alphas=args.alphas,
                                                transform=fix)  # fmt: skip
        rows.append({"label": label, "curve": curve, "repair": repaired, "seconds": seconds, "report": report})
        LOG.info("%s: barrier %.4f (REPAIR %.4f), align %.1f s", label, curve.loss_barrier, repaired.loss_barrier, seconds)
    return rows


def table(label: str, a: nn.Module, rows: list[dict[str, Any]]) -> str:
    loss = rows[0]["curve"].series("loss")
    out = [f"**{label}** ({num_params(a) / 1e3:.0f}k parameters; test loss A {loss[0]:.4f}, B {loss[-1]:.4f})", "",
           "| alignment | loss barrier | midpoint excess | + REPAIR: loss barrier | + REPAIR: midpoint excess | align s |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "refused" in r:
            out.append(f"| {r['label']} | refused: ill-conditioned least-squares map ({r['refused']}) | | | | |")
            continue
        c, rep = r["curve"], r["repair"]
        out.append(f"| {r['label']} | {c.loss_barrier:.4f} | {c.midpoint_gap():.4f} | {rep.loss_barrier:.4f} | "
                   f"{rep.midpoint_gap():.4f} | {r['seconds']:.1f} |")  # fmt: skip
    done = [r for r in rows if "curve" in r and r["label"] != "naive"]
    perm = min(r["curve"].loss_barrier for r in done if "permutations" in r["label"])
    full = min(r["curve"].loss_barrier for r in done if "permutations" not in r["label"])
    perm_r = min(r["repair"].loss_barrier for r in done if "permutations" in r["label"])
    full_r = min(r["repair"].loss_barrier for r in done if "permutations" not in r["label"])
    cut = lambda new, old: f"{100 * (1 - new / old):.0f}%" if old > 1e-9 else "n/a"  # noqa: E731
    out += ["", f"Target (generalised alignment cuts the best permutation-only loss barrier by ≥ 50%): "
            f"{perm:.4f} → {full:.4f}, cut {cut(full, perm)} ({'met' if full <= 0.5 * perm else 'not met'}); "
            f"with REPAIR {perm_r:.4f} → {full_r:.4f}, cut {cut(full_r, perm_r)}."]  # fmt: skip
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", default="gpt2,vit")
    p.add_argument("--gpt-width", type=int, default=96)
    p.add_argument("--gpt-layers", type=int, default=3)
    p.add_argument("--gpt-steps", type=int, default=1500)
    p.add_argument("--gpt-test-windows", type=int, default=128)
    p.add_argument("--vit-width", type=int, default=64)
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--vit-epochs", type=int, default=4)
    p.add_argument("--vit-test-size", type=int, default=5000)
    p.add_argument("--stats-batches", type=int, default=8)
    p.add_argument("--alphas", type=int, default=11)
    p.add_argument("--refine-steps", type=int, default=300)
    p.add_argument("--refine-lr", type=float, default=5e-3)
    p.add_argument("--refine-batches", type=int, default=32)
    p.add_argument("--train-only", action="store_true", help="train and cache the models, then stop")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start, tables = time.perf_counter(), []
    for name in args.families.split(","):
        label, load = FAMILIES[name]
        t0 = time.perf_counter()
        a, b, data = load(args)
        LOG.info("%s: %d parameters, loaded/trained in %.0f s", label, num_params(a), time.perf_counter() - t0)
        if args.train_only:
            continue
        tables.append(table(label, a, measure(a, b, data, args)))
        LOG.info("\n%s", tables[-1])
    if args.train_only:
        return
    text = "\n\n".join(tables)
    print(text)
    note = (
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPU cores, shared by several "
        f"jobs, so timings are noisy), torch {torch.__version__}, {args.threads} thread(s); {time.perf_counter() - start:.0f} s "
        f"in all (models cached). GPT-2-style: {args.gpt_layers} layers, width {args.gpt_width}, 4 heads, byte vocabulary, "
        f"context {CONTEXT}, {args.gpt_steps} AdamW steps of 32 windows; test = {args.gpt_test_windows} windows of held-out "
        f"files. ViT: {args.vit_layers} layers, width {args.vit_width}, 4 heads, 7×7 patches, {args.vit_epochs} Adam epochs "
        f"on 60k images; test = first {args.vit_test_size} test images. {args.alphas}-point α grid; activation matching "
        f"and REPAIR on {args.stats_batches} training batches; learned refinement: {args.refine_steps} Adam steps, lr "
        f"{args.refine_lr}, at α = ½ on {args.refine_batches} other training batches (16 windows / 100 images; the first 4 "
        f"held out to pick the checkpoint). Loss barrier: worst excess over the endpoints' line; "
        "midpoint excess: loss at α = ½ minus the endpoints' mean."
    )
    out = save_results("transformer_lmc", "Transformer LMC modulo the full symmetry group", text, note)
    LOG.info("wrote %s", out)


if __name__ == "__main__":
    main()
