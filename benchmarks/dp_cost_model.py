"""Communication cost model of data-parallel TENGraD with exact global-batch blocks
(docs/DESIGN.md §11), next to DDP alone and DDP + KAISA (kfac-pytorch's distributed KFAC).

    python3 benchmarks/dp_cost_model.py [--batch-per-worker 128] [--refresh 10]

Per training step and per worker, in MB of float32 (ring collectives: an allreduce of n numbers
moves 2n(P−1)/P per worker, a reduce, broadcast, gather or allgather n(P−1)/P):

* DDP:           allreduce of every gradient                                    2·D·(P−1)/P
* DDP + KAISA:   DDP, plus the owner's preconditioned gradient broadcast every step (its
                 memory-optimal mode) D·(P−1)/P, plus the Kronecker factors allreduced every
                 refresh, 2·Σ(a² + g²)·(P−1)/P / T, a = inputs (+1), g = outputs of each layer
* TENGraD:       each preconditioned gradient reduced to its layer's owner and the update
                 broadcast back, D·(P−1)/P + D·(P−1)/P (= DDP's allreduce: it replaces it), plus
                 every refresh each worker sends its m_p per-sample rows of every layer to the
                 layer's owner, which receives them from the P−1 others: on average (owners
                 balanced) 2·Σ m_p·r·(P−1)/P / T per worker; the busiest owner receives
                 (P−1)·m_p·max r / T. r = the smallest row of the layer (linear: in + out; conv:
                 min(raw C_in·H·W + C_out·L, per-sample gradient d, unfolded P̃·L + C_out·L)).
                 The integrations send raw or per-sample rows (not unfolded ones: smallest for
                 one ResNet-18 layer only). "raw rows MB": the same with raw rows for every layer.

Also printed: the owner's compute per refresh for the costliest layer (Gram m²·r + Cholesky m³/3,
m = P × batch per worker): the exact global block's price, which grows as P² and P³.
"""
import argparse


def conv(cin, cout, k, hw, stride=1, pad=None):
    pad = k // 2 if pad is None else pad
    out = (hw + 2 * pad - k) // stride + 1
    return dict(kind="conv", cin=cin, cout=cout, k=k, hw=hw, L=out * out)


def linear(i, o):
    return dict(kind="linear", cin=i, cout=o)


DEMO = [conv(1, 32, 3, 28), conv(32, 32, 3, 28), conv(32, 32, 3, 14), linear(32 * 7 * 7, 128), linear(128, 10)]


def resnet18():
    layers = [conv(3, 64, 7, 224, 2, 3)]
    hw, c = 56, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            layers.append(conv(c, cout, 3, hw, s))
            out_hw = (hw + 2 - 3) // s + 1
            layers.append(conv(cout, cout, 3, out_hw, 1))
            if s != 1 or c != cout:
                layers.append(conv(c, cout, 1, hw, s, 0))
            hw, c = out_hw, cout
    layers.append(linear(512, 1000))
    return layers


def sizes(layer):
    """(parameters d, Kronecker factor sizes a, g, smallest per-sample row r and its name, raw row)."""
    if layer["kind"] == "linear":
        i, o = layer["cin"], layer["cout"]
        return o * (i + 1), i + 1, o, i + o, "raw", i + o
    cin, cout, k, L = layer["cin"], layer["cout"], layer["k"], layer["L"]
    p = cin * k * k + 1
    d = cout * p
    rows = {"raw": cin * layer["hw"] ** 2 + cout * L, "per-sample": d, "unfolded": p * L + cout * L}
    name = min(rows, key=rows.get)
    return d, p, cout, rows[name], name, rows["raw"]


def table(name, layers, per_worker, refresh):
    D = sum(sizes(layer)[0] for layer in layers)
    factors = sum(a * a + g * g for _, a, g, _, _, _ in map(sizes, layers))
    print(f"\n{name}: {len(layers)} layers, {D / 1e6:.2f} M parameters, batch {per_worker} per worker, "
          f"refresh (and KAISA factor update) every {refresh} steps")
    picks = {}
    for layer in layers:
        picks[sizes(layer)[4]] = picks.get(sizes(layer)[4], 0) + 1
    print("rows sent per layer: " + ", ".join(f"{k} × {v}" for k, v in picks.items()))
    print(f"{'P':>4}{'DDP MB':>10}{'DDP+KAISA MB':>15}{'TENGraD avg MB':>16}{'busiest owner MB':>18}"
          f"{'avg ÷ KAISA':>13}{'raw rows MB':>13}{'owner GFLOP/refresh':>21}")
    mb = 4 / 1e6
    for P in (2, 4, 8, 16, 32, 64):
        f = (P - 1) / P
        m = P * per_worker
        ddp = 2 * D * f
        kaisa = ddp + D * f + 2 * factors * f / refresh
        rows = [sizes(layer)[3] for layer in layers]
        ours = 2 * D * f + 2 * sum(per_worker * r for r in rows) * f / refresh
        busiest = 2 * D * f + (P - 1) * per_worker * max(rows) / refresh
        raw = 2 * D * f + 2 * sum(per_worker * sizes(layer)[5] for layer in layers) * f / refresh
        worst = max(m * m * r + m ** 3 / 3 for r in rows)
        print(f"{P:>4}{ddp * mb:>10.1f}{kaisa * mb:>15.1f}{ours * mb:>16.1f}{busiest * mb:>18.1f}"
              f"{ours / kaisa:>13.2f}{raw * mb:>13.1f}{worst / 1e9:>21.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-per-worker", type=int, default=128)
    ap.add_argument("--refresh", type=int, default=10)
    args = ap.parse_args()
    table("Demo ConvNet (Fashion-MNIST, width 32)", DEMO, args.batch_per_worker, args.refresh)
    table("ResNet-18 (ImageNet, 224²)", resnet18(), args.batch_per_worker // 4, args.refresh)


if __name__ == "__main__":
    main()
