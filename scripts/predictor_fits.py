"""Which fit makes the better next-layer expert predictor: ridge (several penalties) or softmax?

Records a store's layers over the calibration text (d2moe_mlx.calibration.record_layers:
the previous MoE layer's input x_{l-1}, the layer's router logits and routed ids), the
last 20% of the sequences held out, and compares on them, per layer and mean, the
recall of layer l's top-k experts within the predicted top-k:

* ridge regression to the router logits (d2moe_mlx.predictor.Ridge) at each --alphas;
* a linear softmax model trained with MLX (Adam, full batch, --epochs) to the router's
  probabilities (cross-entropy with soft targets), started from the best ridge fit;
* the router-gate baseline (layer l's router on x_{l-1}).

Everything is held in memory (tokens x layers x (hidden + experts) floats): for small
models, e.g. the bundled one.

    python scripts/predictor_fits.py --store STORE --tokens 8192
"""

from __future__ import annotations

import argparse
import json


def collect(store: str, tokens: int | None):
    from d2moe_mlx.calibration import record_layers, token_batches
    from d2moe_mlx.convert.calibrate import default_calibration_text
    from d2moe_mlx.model import load

    model, tokenizer = load(store)
    train, test = token_batches(tokenizer, default_calibration_text(), tokens)
    return [record_layers(model, ids) for ids in train], [record_layers(model, ids) for ids in test]


def stack(recs, layer, attr):
    import numpy as np

    return np.concatenate([getattr(r[layer], attr) for r in recs])


def softmax_fit(x, logits, w0, b0, epochs: int, lr: float):
    """A linear map trained to the router's softmax (soft cross-entropy), from (w0, b0)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    xs = mx.array(x.astype(np.float32))
    target = mx.softmax(mx.array(logits.astype(np.float32)), axis=-1)
    params = {"w": mx.array(w0), "b": mx.array(b0)}

    def loss(p):
        out = xs @ p["w"] + p["b"]
        return -(target * (out - mx.logsumexp(out, axis=-1, keepdims=True))).sum(axis=-1).mean()

    opt = optim.Adam(learning_rate=lr)
    step = mx.value_and_grad(loss)
    for _ in range(epochs):
        value, grads = step(params)
        opt.update(params, grads)
        mx.eval(params, opt.state)
    return np.array(params["w"]), np.array(params["b"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--store", required=True, help="A d2moe store with a tokenizer.")
    ap.add_argument("--tokens", type=int, default=None, help="Calibration tokens (default: all).")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1e-5, 1e-3, 1e-2, 1e-1, 1.0],
                    help="Ridge penalties (relative to the mean feature energy).")
    ap.add_argument("--epochs", type=int, default=300, help="Softmax model: full-batch Adam steps.")
    ap.add_argument("--lr", type=float, default=1e-2, help="Softmax model: Adam learning rate.")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = ap.parse_args(argv)

    import numpy as np

    from d2moe_mlx import predictor as P

    train, test = collect(args.store, args.tokens)
    layers = sorted(train[0])
    k = train[0][layers[0]].ids.shape[-1]
    res: dict[str, dict] = {}
    for prev, layer in zip(layers, layers[1:]):
        x, y = stack(train, prev, "x"), stack(train, layer, "logits")
        xt, truth = stack(test, prev, "x"), stack(test, layer, "ids")
        res.setdefault("router", {})[layer] = P.recall_at(stack(test, layer, "gate_prev"), truth, k)
        best = None
        for alpha in args.alphas:
            w, b = P.fit_ridge(x, y, alpha)
            r = P.recall_at(xt @ w + b, truth, k)
            res.setdefault(f"ridge alpha={alpha:g}", {})[layer] = r
            fit_r = P.recall_at(x @ w + b, stack(train, layer, "ids"), k)  # chosen on train data
            if best is None or fit_r > best[0]:
                best = (fit_r, w, b)
        w, b = softmax_fit(x, y, best[1], best[2], args.epochs, args.lr)
        res.setdefault("softmax (from best ridge)", {})[layer] = P.recall_at(xt @ w + b, truth, k)
    print(f"held-out recall of the top-{k} within the predicted top-{k}, "
          f"{sum(len(r[layers[0]].ids) for r in train)} train / "
          f"{sum(len(r[layers[0]].ids) for r in test)} test tokens")
    for name, per in res.items():
        cells = "  ".join(f"L{l}: {v:.3f}" for l, v in per.items())
        print(f"  {name:<28} mean {np.mean(list(per.values())):.3f}   {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({n: {str(l): v for l, v in per.items()} for n, per in res.items()}, f, indent=1)


if __name__ == "__main__":
    main()
