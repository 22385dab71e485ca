"""fp32 GEMM rates on this CPU: torch's default BLAS (`F.linear`, MKL here) against oneDNN's matmul
(`vla.models.onednn_linear`), on the products of one training step of part a's model.

    python -m vla.bench.gemm [--repeats 30]

For each linear of `vla-tiny-clip` at part a's batch (128 images of 65 tokens, 128 captions of
16), the three products a training step computes — forward y = x Wᵀ, ∂x = g W, ∂W = gᵀ x — are
timed both ways, alternating, in one process, and printed as GFLOP/s with the ratio, with the
whole step's linear time summed per way. Both ways are checked to agree within float rounding.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time

WIDTH, MLP, BATCH = 128, 512, 128
ROWS = {"image": BATCH * 65, "text": BATCH * 16}
# (in, out) of each linear per layer: attention in/out projections and the MLP's two layers
LINEARS = {"qkv": (WIDTH, 3 * WIDTH), "out": (WIDTH, WIDTH), "fc": (WIDTH, MLP), "proj": (MLP, WIDTH)}
LAYERS = {"image": 4, "text": 3}


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    import torch
    import torch.nn.functional as F

    from vla.bench import alternate
    from vla.models.onednn_linear import _mm_t, available, weight_grad

    parser = argparse.ArgumentParser(prog="python -m vla.bench.gemm", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not available():
        raise SystemExit("this torch has no oneDNN: nothing to compare")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; GFLOP/s, blas (F.linear / matmul) vs oneDNN")
    print("| tower | linear | product | rows × in → out | blas | oneDNN | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    total = {"blas": 0.0, "onednn": 0.0}
    for tower, rows in ROWS.items():
        for name, (k_in, k_out) in LINEARS.items():
            x, w, g = torch.randn(rows, k_in), torch.randn(k_out, k_in), torch.randn(rows, k_out)
            products = {
                "forward": (lambda: F.linear(x, w), lambda: _mm_t(x, w)),
                "∂x": (lambda: g @ w, lambda: _mm_t(g, w.t())),
                "∂W": (lambda: g.t() @ x, lambda: weight_grad(g, x)),
            }
            for product, (blas, onednn) in products.items():
                torch.testing.assert_close(onednn(), blas(), rtol=1e-4, atol=1e-3)
                blas_runs, dnn_runs = alternate(lambda: _time(blas, args.repeats),
                                                lambda: _time(onednn, args.repeats), rounds=2)
                t_blas, t_dnn = min(blas_runs), min(dnn_runs)
                flops = 2 * rows * k_in * k_out
                total["blas"] += t_blas * LAYERS[tower]
                total["onednn"] += t_dnn * LAYERS[tower]
                print(f"| {tower} | {name} | {product} | {rows} × {k_in} → {k_out} | {flops / t_blas / 1e9:.0f} "
                      f"| {flops / t_dnn / 1e9:.0f} | {t_blas / t_dnn:.2f}× |")
    print(f"one step's linears (both towers, every layer): blas {total['blas'] * 1e3:.1f} ms, "
          f"oneDNN {total['onednn'] * 1e3:.1f} ms ({total['blas'] / total['onednn']:.2f}×)")


if __name__ == "__main__":
    main()
