"""NoProp-DT against its BP twin as the chain deepens: epoch time and peak memory for T blocks.

    python benchmarks/noprop_depth.py [--depths 2 5 10 20] [--shape c32,h256] [--dataset mnist]
                                      [--batch 128] [--epochs 2] [--device auto] [--parallel/--sequential]
                                      [--plot noprop_depth.png]

NoProp's claims: blocks train independently (so in parallel), with less memory, scaling better with
depth than backprop through the whole chain. Each row trains NoProp-DT (``loop: joint``; the T blocks
in one vmap'd, captured step with ``--parallel``) and BP on the identical ``noprop:T,...`` network
through ``bpfree.bench.measure`` (the engine's own loop: median epoch after a warm-up epoch; peak
memory of the training windows). Prints a markdown table and writes a plot of both against T.
"""

from __future__ import annotations

import argparse

from bpfree.bench import BenchCase, measure


def sweep(depths: list[int], shape: str, dataset: str, batch: int, epochs: int, device: str, parallel: bool) -> list[dict]:
    rows = []
    for depth in depths:
        model = f"noprop:{depth},{shape}" if shape else f"noprop:{depth}"
        noprop = measure(BenchCase("NoProp-DT", "noprop", model, batch, {"parallel": parallel}), dataset, epochs, device)
        bp = measure(BenchCase("BP", "bp", model, batch), dataset, epochs, device)
        rows.append({"T": depth, "model": model, "noprop": noprop, "bp": bp})
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| T | model | NoProp epoch s | BP epoch s | time vs BP | NoProp peak MiB | BP peak MiB | memory vs BP |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, b = r["noprop"], r["bp"]
        nm, bm = n["peak_memory_bytes"] or 0, b["peak_memory_bytes"] or 0
        lines.append(
            f"| {r['T']} | {r['model']} | {n['epoch_s']:.3f} | {b['epoch_s']:.3f} | {n['epoch_s'] / b['epoch_s']:.2f}× | "
            f"{nm / 2**20:.0f} | {bm / 2**20:.0f} | {nm / bm if bm else float('nan'):.2f}× |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r["T"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("noprop", "NoProp-DT"), ("bp", "BP twin")):
        ax_time.plot(depths, [r[key]["epoch_s"] for r in rows], marker="o", label=label)
        ax_mem.plot(depths, [(r[key]["peak_memory_bytes"] or 0) / 2**20 for r in rows], marker="o", label=label)
    ax_time.set(xlabel="blocks T", ylabel="epoch time (s)")
    ax_mem.set(xlabel="blocks T", ylabel="peak memory (MiB)")
    ax_time.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--shape", default="c32,h256", help="noprop spec options after T (paper size: c32,h256)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--plot", default="noprop_depth.png")
    args = parser.parse_args()
    rows = sweep(args.depths, args.shape, args.dataset, args.batch, args.epochs, args.device, args.parallel)
    device = rows[0]["noprop"]["device"] if rows else args.device
    print(f"NoProp-DT vs BP twin by depth ({args.dataset}, batch {args.batch}, {device}, "
          f"{'parallel' if args.parallel else 'sequential'} blocks)\n")
    print(table(rows))
    plot(rows, args.plot, f"NoProp-DT vs BP by depth ({device})")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
