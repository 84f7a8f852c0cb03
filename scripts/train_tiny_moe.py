"""Train the tiny Qwen3-MoE that ships in d2moe_mlx/assets/tiny-moe.

Two steps, each a subcommand:

  prepare  (here, CPU)  train the byte-level BPE tokenizer on .train/train.txt
                        (from scripts/build_corpus.py), write it to --out, and
                        pre-tokenize train/valid/heldout into uint16 .npy in .train/.
  train    (GPU)        train transformers' Qwen3MoeForCausalLM with a per-layer
                        load-balancing loss, time-limited, keeping the best weights
                        by valid loss;
                        writes model.safetensors (bf16, per-expert hub layout),
                        config.json, generation_config.json and loss.json to --out;
                        copy the first three into d2moe_mlx/assets/tiny-moe/.

Example:
  python scripts/build_corpus.py
  python scripts/train_tiny_moe.py prepare
  python scripts/train_tiny_moe.py train --out /tmp/a --aux-coef 0.05   # on the GPU
  python scripts/train_tiny_moe.py select /tmp/a /tmp/b ...           # pick one run
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".train"
ASSET = REPO / "d2moe_mlx" / "assets" / "tiny-moe"
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARCH = dict(
    vocab_size=6144, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, intermediate_size=512, moe_intermediate_size=128,
    num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=1024, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, router_aux_loss_coef=0.0,
    bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_act="silu",
    attention_bias=False, use_sliding_window=False,
)


def param_counts(a: dict = ARCH) -> dict:
    """Total and per-token active parameters of the architecture in ``a``."""
    h, L, E, k, I = (a["hidden_size"], a["num_hidden_layers"], a["num_experts"],
                     a["num_experts_per_tok"], a["moe_intermediate_size"])
    hd, nq, nkv = a["head_dim"], a["num_attention_heads"], a["num_key_value_heads"]
    attn = h * hd * (2 * nq + 2 * nkv) + 2 * hd
    expert = 3 * h * I
    per_layer_fixed = attn + h * E + 2 * h  # attention, router, two norms
    emb = a["vocab_size"] * h
    total = emb + L * (per_layer_fixed + E * expert) + h
    active = emb + L * (per_layer_fixed + k * expert) + h
    return {"total": total, "active_per_token": active, "experts": L * E * expert,
            "embedding": emb, "bf16_bytes": 2 * total}


# ----------------------------------------------------------------- prepare
def prepare(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=ARCH["vocab_size"], min_frequency=2, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(WORK / "train.txt")], trainer)
    assert tok.get_vocab_size() == ARCH["vocab_size"], tok.get_vocab_size()
    assert tok.token_to_id("<|endoftext|>") == ARCH["eos_token_id"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token=None, model_max_length=ARCH["max_position_embeddings"],
        additional_special_tokens=SPECIALS[1:])
    fast.chat_template = CHAT_TEMPLATE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.setdefault("chat_template", CHAT_TEMPLATE)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").unlink()
    eos = ARCH["eos_token_id"]
    for split in ("train", "valid", "heldout"):
        text = (WORK / f"{split}.txt").read_text(encoding="utf-8")
        docs = text.split("\n\n\n")  # build_corpus joins documents with a blank line:
        ids = []                     # treat the whole split as one stream, eos between files
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(eos)
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(WORK / f"{split}.npy", arr)
        print(f"{split}: {len(text.encode())} bytes -> {arr.size} tokens "
              f"({len(text.encode()) / arr.size:.2f} bytes/token)")
    print(json.dumps(param_counts(), indent=1))


# ------------------------------------------------------------------- train
def unfuse_state_dict(sd: dict, cfg: dict) -> dict:
    """transformers-5 state dict -> hub Qwen3-MoE layout (per-expert Linear weights)."""
    import torch

    out = {}
    I = cfg["moe_intermediate_size"]
    for k, v in sd.items():
        v = v.detach().to(torch.bfloat16).contiguous()
        if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows first
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :I].clone()
                out[f"{p}{e}.up_proj.weight"] = v[e, I:].clone()
        elif k.endswith("mlp.experts.down_proj"):  # [E, H, I]
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def write_checkpoint(model, out: Path, aux_coef: float):
    """Save bf16 safetensors in the hub layout plus a config mlx-lm reads as is."""
    from safetensors.torch import save_file

    cfg = dict(ARCH, router_aux_loss_coef=aux_coef)
    sd = unfuse_state_dict(model.state_dict(), cfg)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
               torch_dtype="bfloat16", dtype="bfloat16", use_cache=True,
               output_router_logits=False, initializer_range=0.02, attention_dropout=0.0,
               sliding_window=None, max_window_layers=ARCH["num_hidden_layers"],
               rope_scaling=None,
               rope_parameters={"rope_type": "default", "rope_theta": ARCH["rope_theta"]})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def layer_balance_loss(router_logits, k: int):
    """Switch-style load-balancing loss per layer (1.0 when balanced), mean over layers.

    transformers' own aux loss pools all layers' router logits, so it lets each layer
    starve experts as long as another layer uses them; this one balances each layer.
    """
    import torch

    losses = []
    for g in router_logits:
        p = torch.softmax(g.float(), dim=-1)  # [tokens, E]
        E = p.shape[-1]
        f = torch.zeros(E, device=p.device).scatter_add_(
            0, p.topk(k, dim=-1).indices.reshape(-1), torch.ones(p.shape[0] * k, device=p.device))
        losses.append(E * ((f / f.sum()) * p.mean(0)).sum())
    return torch.stack(losses).mean()


def train(args):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the model's own (layer-pooled) aux loss is off: layer_balance_loss replaces it
    cfg = Qwen3MoeConfig(**{**ARCH, "router_aux_loss_coef": 0.0}, output_router_logits=True)
    model = Qwen3MoeForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params} (expected {param_counts()['total']}) device {dev}")
    data = {s: torch.from_numpy(np.load(WORK / f"{s}.npy").astype(np.int64)).to(dev)
            for s in ("train", "valid", "heldout")}
    B, T = args.batch, args.seq
    n_train = data["train"].numel()
    steps_per_epoch = n_train // (B * T)
    total_steps = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.wd, fused=dev == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def lr_at(step):
        """Warmup, then cosine to 10% over whichever ends first: steps or time."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = max((step - args.warmup) / max(1, total_steps - args.warmup),
                (time.time() - t0) / (args.minutes * 60))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    @torch.no_grad()
    def evaluate(split, max_windows=256):
        model.eval()
        x = data[split]
        n = min(max_windows, (x.numel() - 1) // T)
        tot, cnt = 0.0, 0
        counts = torch.zeros(ARCH["num_hidden_layers"], ARCH["num_experts"], device=dev)
        for i in range(0, n, 32):
            idx = torch.arange(i, min(n, i + 32), device=dev)[:, None] * T
            win = x[idx + torch.arange(T + 1, device=dev)]
            with torch.autocast(dev, dtype=torch.bfloat16):
                o = model(input_ids=win[:, :-1], output_router_logits=True)
            logits = o.logits
            ce = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum")
            tot += ce.item()
            cnt += win[:, 1:].numel()
            for l, g in enumerate(o.router_logits):
                top = g.float().topk(ARCH["num_experts_per_tok"], dim=-1).indices.reshape(-1)
                counts[l] += torch.bincount(top, minlength=ARCH["num_experts"])
        model.train()
        share = (counts / counts.sum(1, keepdim=True) * ARCH["num_experts"]).cpu()
        util = {"share_min": round(float(share.min()), 4), "share_max": round(float(share.max()), 4),
                "starved": int((share < 0.25).sum())}  # experts under 1/4 of a fair share
        return tot / cnt, util

    log = {"args": vars(args), "params": n_params, "train_tokens_available": n_train,
           "steps_per_epoch": steps_per_epoch, "curve": []}
    best, best_state, bad = float("inf"), None, 0
    t0 = time.time()
    step = 0
    model.train()
    while step < total_steps and time.time() - t0 < args.minutes * 60:
        starts = torch.randint(0, n_train - T - 1, (B,), device=dev, generator=gen)
        win = data["train"][starts[:, None] + torch.arange(T + 1, device=dev)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(dev, dtype=torch.bfloat16):  # HF shifts the labels itself
            o = model(input_ids=win, labels=win)
            aux = layer_balance_loss(o.router_logits, ARCH["num_experts_per_tok"])
        loss = o.loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            rec = {"step": step, "tokens": step * B * T, "time_s": round(time.time() - t0, 1),
                   "lr": lr_at(step), "loss": loss.item(), "aux_loss": aux.item(),
                   "ce": o.loss.item()}
            if step % args.eval_every == 0:
                rec["valid_ce"], rec["valid_util"] = evaluate("valid")
                if rec["valid_ce"] < best - 1e-4:
                    best, bad = rec["valid_ce"], 0
                    log["best_step"], log["best_util"] = step, rec["valid_util"]
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    rec["best"] = True
                else:
                    bad += 1
            log["curve"].append(rec)
            print(json.dumps(rec), flush=True)
            if bad >= args.patience:
                print("early stop: valid loss has not improved", flush=True)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    log["steps"] = step
    log["train_tokens_seen"] = step * B * T
    log["best_valid_ce"] = best
    log["wall_s"] = round(time.time() - t0, 1)
    model.to(torch.bfloat16)  # what ships
    model.float()
    log["heldout_ce_bf16_weights"], log["heldout_util"] = evaluate("heldout", max_windows=args.heldout_windows)
    log["heldout_ppl_bf16_weights"] = math.exp(log["heldout_ce_bf16_weights"])
    write_checkpoint(model, out, args.aux_coef)
    (out / "loss.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=1))


def select(args):
    """Print the run dir with the lowest best valid loss among runs without starved
    experts at their best step (else the fewest starved)."""
    logs = {d: json.loads((Path(d) / "loss.json").read_text()) for d in args.runs}
    best = min(logs, key=lambda d: (logs[d].get("best_util", {}).get("starved", 99),
                                    logs[d]["best_valid_ce"]))
    print(best)


def main():
    ap = argparse.ArgumentParser(description="Train the shipped tiny Qwen3-MoE.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=str(ASSET))
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--minutes", type=float, default=8.0)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--wd", type=float, default=0.3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--patience", type=int, default=6)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--heldout-windows", type=int, default=10_000)
    t.add_argument("--aux-coef", type=float, default=0.05, help="layer_balance_loss weight")
    c = sub.add_parser("select")
    c.add_argument("runs", nargs="+")
    args = ap.parse_args()
    {"prepare": prepare, "train": train, "select": select}[args.cmd](args)


if __name__ == "__main__":
    main()
